"""Tiny demo project for syncagent: a Celery app laid out like Clippy-Front."""
