"""A conflicting redis-py, as a real project's pins gave it (issue 10): redis 5.0.1 beside
kombu 5.7, whose Redis transport refuses it at the worker's start."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

__all__ = ["OLD_REDIS", "install_old_redis"]

OLD_REDIS = "redis==5.0.1"


def install_old_redis(directory: Path) -> Path:
    """Install redis 5.0.1 alone into ``directory`` (never into the test venv); put it first
    on a worker's PYTHONPATH to give that worker the conflicting pin.

    Returns:
        The directory to put on PYTHONPATH.
    """
    target = directory / "old-redis"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--disable-pip-version-check", "--target", str(target), OLD_REDIS],
                   check=True, capture_output=True, timeout=300, stdin=subprocess.DEVNULL)
    return target
