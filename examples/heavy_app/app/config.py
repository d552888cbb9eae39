"""Settings from the environment, shared by the web app and the worker."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["Config", "database_url", "INSTANCE"]

INSTANCE = Path(__file__).resolve().parents[1] / "instance"  # remote-only, never synced


def database_url() -> str:
    return os.environ.get("DATABASE_URL", f"sqlite:///{INSTANCE / 'heavy-app.db'}")


class Config:
    SECRET_KEY = os.environ.get("SECRET_KEY", "dev-only-secret")
    SQLALCHEMY_DATABASE_URI = database_url()
    SQLALCHEMY_TRACK_MODIFICATIONS = False
    WTF_CSRF_TIME_LIMIT = 3600
