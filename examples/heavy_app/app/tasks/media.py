"""Tasks of the heavy app: they use the models through a plain SQLAlchemy session (no Flask
app context, so the worker never builds the web app)."""
from __future__ import annotations

import sys

from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session

from app.config import INSTANCE, database_url
from app.extensions import db
from app.logs import get_logger
from app.models import Clip, Job
from app.tasks.celery_app import celery_app
from app.version import VERSION

__all__ = ["imported", "record_clip", "version"]

log = get_logger(__name__)
_engine = None


def _session() -> Session:
    global _engine
    if _engine is None:
        INSTANCE.mkdir(exist_ok=True)
        _engine = create_engine(database_url())
        db.metadata.create_all(_engine)
    return Session(_engine)


@celery_app.task(name="app.tasks.media.version")
def version() -> str:
    """Return the VERSION constant of the code this worker runs."""
    return VERSION


@celery_app.task(name="app.tasks.media.record_clip")
def record_clip(title: str) -> dict:
    """Store a clip and its job; return what was stored and how many clips there are."""
    with _session() as session, session.begin():
        clip = Clip(title=title)
        session.add(clip)
        session.flush()
        session.add(Job(clip_id=clip.id, status="done", worker_version=VERSION))
        count = session.scalar(select(func.count()).select_from(Clip))
        clip_id = clip.id
    log.info("clip recorded", clip_id=clip_id, count=count)
    return {"id": clip_id, "title": title, "clips": count, "version": VERSION}


@celery_app.task(name="app.tasks.media.imported")
def imported() -> list[str]:
    """The project modules this worker process has imported (tests check app.web is not)."""
    return sorted(name for name in sys.modules if name == "app" or name.startswith("app."))
