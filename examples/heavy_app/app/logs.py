"""structlog set-up for the worker and the web app."""
from __future__ import annotations

import logging

import structlog

__all__ = ["configure", "get_logger"]


def configure(level: int = logging.INFO) -> None:
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.TimeStamper("iso"),
                    structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(level),
    )


def get_logger(name: str):
    return structlog.get_logger(name)
