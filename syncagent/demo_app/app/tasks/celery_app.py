"""The demo Celery app, configured from the environment like Clippy-Front's.

It sets none of the no-task-loss settings on purpose: ``python -m worker run`` applies them.
"""
import os

from celery import Celery

__all__ = ["celery_app"]

celery_app = Celery(
    "demo_app",
    broker=os.environ.get("CELERY_BROKER_URL", "redis://localhost:6379/0"),
    backend=os.environ.get("CELERY_RESULT_BACKEND", "redis://localhost:6379/0"),
    include=["app.tasks.demo"],
)
celery_app.conf.update(
    task_default_queue="celery",
    broker_connection_retry_on_startup=True,
    result_expires=3600,
)
