"""syncagent: push code to a remote Celery GPU worker over one SSH connection."""

__version__ = "0.1.0"
