"""Admin views: which workers answer, and on which version."""
from __future__ import annotations

from flask import Blueprint, jsonify
from flask_login import login_required

from app.version import VERSION

__all__ = ["admin"]

admin = Blueprint("admin", __name__)


@admin.route("/workers")
@login_required
def workers():
    from app.tasks.celery_app import celery_app

    replies = celery_app.control.ping(timeout=1) or []
    nodes = [node for reply in replies for node in reply]
    return jsonify({"version": VERSION, "workers": nodes})
