"""Database models, used by the web app and the tasks alike."""
from __future__ import annotations

from datetime import datetime, timezone

from flask_login import UserMixin
from sqlalchemy import DateTime, ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.extensions import db

__all__ = ["Clip", "Job", "User"]


def _now() -> datetime:
    return datetime.now(timezone.utc)


class User(UserMixin, db.Model):
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    email: Mapped[str] = mapped_column(String(255), unique=True)
    clips: Mapped[list["Clip"]] = relationship(back_populates="owner")


class Clip(db.Model):
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    title: Mapped[str] = mapped_column(String(200))
    owner_id: Mapped[int | None] = mapped_column(ForeignKey("user.id"))
    owner: Mapped[User | None] = relationship(back_populates="clips")
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class Job(db.Model):
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    clip_id: Mapped[int] = mapped_column(ForeignKey("clip.id"))
    status: Mapped[str] = mapped_column(String(20), default="queued")
    worker_version: Mapped[str] = mapped_column(String(40))
