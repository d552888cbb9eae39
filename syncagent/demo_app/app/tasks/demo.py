"""Demo tasks: ``add`` and ``version`` (returns the code version that is live)."""
from app.tasks.celery_app import celery_app
from app.version import VERSION

__all__ = ["add", "version", "work"]


@celery_app.task(name="app.tasks.demo.add")
def add(x: int, y: int) -> int:
    """Return x + y."""
    return x + y


@celery_app.task(name="app.tasks.demo.version")
def version() -> str:
    """Return the VERSION constant of the code this worker runs."""
    return VERSION


@celery_app.task(name="app.tasks.demo.work", bind=True)
def work(self, seconds: float) -> dict:
    """A job that takes ``seconds`` (a stand-in for an encode). Each start and each completed
    execution is recorded in the broker's Redis lists ``demo:started`` and ``demo:executions``,
    so a test can count tasks interrupted and tasks run twice."""
    import os
    import time

    import redis

    started = time.time()
    client = redis.Redis.from_url(os.environ["CELERY_BROKER_URL"])
    try:
        client.rpush("demo:started", self.request.id)
        time.sleep(seconds)
        client.rpush("demo:executions", self.request.id)
    finally:
        client.close()
    return {"id": self.request.id, "pid": os.getpid(), "version": VERSION,
            "seconds": round(time.time() - started, 3)}
