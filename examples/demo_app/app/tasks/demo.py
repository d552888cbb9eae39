"""Demo tasks: ``add`` and ``version`` (returns the code version that is live)."""
from app.tasks.celery_app import celery_app
from app.version import VERSION

__all__ = ["add", "version"]


@celery_app.task(name="app.tasks.demo.add")
def add(x: int, y: int) -> int:
    """Return x + y."""
    return x + y


@celery_app.task(name="app.tasks.demo.version")
def version() -> str:
    """Return the VERSION constant of the code this worker runs."""
    return VERSION
