"""Celery tasks of the demo app."""
