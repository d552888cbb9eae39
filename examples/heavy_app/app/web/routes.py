"""Pages of the web app; queueing a clip sends a task to the worker."""
from __future__ import annotations

from flask import Blueprint, redirect, render_template_string, url_for
from flask_login import current_user, login_required, login_user

from app.extensions import db, login_manager
from app.models import Clip, User
from app.web.forms import ClipForm, LoginForm

__all__ = ["main"]

main = Blueprint("main", __name__)


@login_manager.user_loader
def load_user(user_id: str) -> User | None:
    return db.session.get(User, int(user_id))


@main.route("/")
@login_required
def index():
    clips = db.session.scalars(db.select(Clip).filter_by(owner_id=current_user.id)).all()
    return render_template_string("{% for c in clips %}{{ c.title }}\n{% endfor %}", clips=clips)


@main.route("/login", methods=["GET", "POST"])
def login():
    form = LoginForm()
    if form.validate_on_submit():
        user = db.session.scalar(db.select(User).filter_by(email=form.email.data))
        if user is not None:
            login_user(user)
            return redirect(url_for("main.index"))
    return render_template_string("<form method=post>{{ form.hidden_tag() }}</form>", form=form)


@main.route("/clips", methods=["POST"])
@login_required
def queue_clip():
    form = ClipForm()
    if form.validate_on_submit():
        from app.tasks.media import record_clip

        record_clip.delay(form.title.data)
    return redirect(url_for("main.index"))
