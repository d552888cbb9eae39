"""Celery tasks of the heavy app."""
