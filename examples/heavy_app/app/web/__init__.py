"""Web-only modules: routes, forms, admin views. The worker never imports this package."""
from __future__ import annotations

from flask import Flask

__all__ = ["register_blueprints"]


def register_blueprints(flask_app: Flask) -> None:
    from app.web.admin import admin
    from app.web.routes import main

    flask_app.register_blueprint(main)
    flask_app.register_blueprint(admin, url_prefix="/admin")
