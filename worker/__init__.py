"""Remote worker runtime for syncagent: ``python -m worker run|doctor``.

Modules: :mod:`worker.env` (``.env.worker`` load and validation), :mod:`worker.preflight`
(doctor checks), :mod:`worker.launch` (the Celery launcher), :mod:`worker.ready` (state paths
and the readiness marker), :mod:`worker.supervisor_conf` (supervisord/systemd configs).
"""
__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run the ``python -m worker`` command line; returns the exit code."""
    from worker.__main__ import main as cli_main

    return cli_main(argv)
