"""The heavy app's Celery app, configured from the environment like the demo's.

Importing it imports the ``app`` package (Flask and its extensions), as a real project's
worker does; ``python -m worker run`` applies the no-task-loss settings.
"""
import os

from celery import Celery

from app.logs import configure

__all__ = ["celery_app"]

configure()
celery_app = Celery(
    "heavy_app",
    broker=os.environ.get("CELERY_BROKER_URL", "redis://localhost:6379/0"),
    backend=os.environ.get("CELERY_RESULT_BACKEND", "redis://localhost:6379/1"),
    include=["app.tasks.media"],
)
celery_app.conf.update(
    task_default_queue="celery",
    broker_connection_retry_on_startup=True,
    result_expires=3600,
)
