"""A heavier example project for syncagent, shaped like a real Flask + Celery web app.

Its worker imports what such a worker imports: this package (Flask and its extensions, through
``app.extensions``), the SQLAlchemy models, structlog and the task modules. The web-only modules
(``app.web``: routes, forms, admin views) are imported only by :func:`create_app`, which the
worker never calls. Tests and benchmarks use it where the tiny demo app starts too fast to be
representative.
"""
from __future__ import annotations

from flask import Flask

from app.config import Config
from app.extensions import csrf, db, login_manager, migrate

__all__ = ["create_app"]


def create_app(config: type[Config] = Config) -> Flask:
    """The web application (the worker does not build one)."""
    flask_app = Flask(__name__)
    flask_app.config.from_object(config)
    db.init_app(flask_app)
    migrate.init_app(flask_app, db)
    login_manager.init_app(flask_app)
    csrf.init_app(flask_app)
    from app.web import register_blueprints

    register_blueprints(flask_app)
    return flask_app
