"""Command line of the remote runtime: ``python -m worker run|doctor|configure``.

Exit codes: 0 ok, 1 a check failed / worker failed, 2 invalid environment or usage.
Only the ``__main__`` guard calls ``sys.exit``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from worker import env as envmod

__all__ = ["main"]

log = logging.getLogger("worker")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m worker",
                                     description="syncagent remote worker runtime")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="install requirements if changed, run the Celery worker")
    run.add_argument("--no-install", action="store_true", help="skip the requirements step")
    run.add_argument("--full-start", action="store_true",
                     help="keep Celery mingle and gossip on (slower start)")
    doctor = sub.add_parser("doctor", help="check broker, API, storage, GPU/NVENC, and the "
                            "worker's start short of consuming (app, include modules, transport)")
    doctor.add_argument("--json", action="store_true", help="print one JSON object")
    conf = sub.add_parser("configure", help="write supervisord configs, start or reload "
                          "supervisord (prints one JSON object; the agent starts the worker)")
    conf.add_argument("--venv", required=True, help="virtualenv with supervisord")
    conf.add_argument("--name", default="worker", help="program group name")
    conf.add_argument("--pythonpath", default=None, help="PYTHONPATH of the worker programs")
    conf.add_argument("--timeout", type=float, default=60.0,
                      help="seconds to wait for supervisord")
    sub.add_parser("requirements", help="build the env for the current requirements if it is "
                   "missing (installer output on stderr, one JSON object on stdout)")
    write_env = sub.add_parser("write-env", help="merge JSON {KEY: value} from stdin into "
                               ".env.worker, validate, write 0600 (one JSON object)")
    write_env.add_argument("mode", choices=("create", "update"))
    boot = sub.add_parser("boot", help="install the systemd unit that starts supervisord at "
                          "boot, or say how (one JSON object); --check only reports")
    boot.add_argument("--venv", required=True, help="virtualenv with supervisord")
    boot.add_argument("--name", default="worker", help="program group name")
    boot.add_argument("--check", action="store_true", help="only say whether it is enabled")
    return parser


def _boot(root: Path, args: argparse.Namespace) -> int:
    import json

    from worker import boot
    from worker import supervisor_conf as sc

    layout = sc.Layout(root=str(root.resolve()),
                       venv=os.path.abspath(os.path.expanduser(args.venv)), name=args.name)
    print(json.dumps(boot.state(layout.root) if args.check else boot.install(layout)))
    return 0


def _requirements(root: Path) -> int:
    import json

    from worker import envs

    result = envs.ensure_env(root, on_line=lambda line: print(line, file=sys.stderr,
                                                              flush=True))
    print(json.dumps(result.to_json()))
    return 1 if result.action == "failed" else 0


def _write_env(root: Path, mode: str) -> int:
    import json

    from worker import env_file

    pairs = json.loads(sys.stdin.read() or "{}")
    if not isinstance(pairs, dict) or not all(isinstance(v, str) for v in pairs.values()):
        print(json.dumps({"status": "invalid", "problems": ["expected a JSON object of "
                                                            "strings"]}))
        return 2
    result = env_file.write_env(root, pairs, mode)
    print(json.dumps(result))
    return 2 if result["status"] == "invalid" else 0


def _configure(root: Path, args: argparse.Namespace) -> int:
    import json

    from worker import supervise
    from worker import supervisor_conf as sc

    layout = sc.Layout(root=str(root.resolve()),
                       venv=os.path.abspath(os.path.expanduser(args.venv)), name=args.name)
    extra = {"PYTHONPATH": args.pythonpath} if args.pythonpath else {}
    try:
        result = supervise.configure(layout, extra, timeout=args.timeout)
    except Exception as exc:  # one JSON object whatever happens; never a secret in it
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(result))
    return 0 if result.get("ok") else 1


def _load(root: Path) -> envmod.EnvReport:
    values = envmod.load_values(root)
    envmod.apply_to_process(values)
    return envmod.validate(values)


def _print_problems(report: envmod.EnvReport) -> None:
    print("invalid worker environment (.env.worker / process env):", file=sys.stderr)
    for problem in report.problems:
        print(f"  - {problem}", file=sys.stderr)


def _doctor(root: Path, as_json: bool) -> int:
    from worker import preflight

    report = _load(root)
    if report.env is None:
        if as_json:
            print(preflight.render_json([], report.problems))
        else:
            _print_problems(report)
        return 2
    checks = preflight.run_checks(report.env, root)
    if as_json:
        print(preflight.render_json(checks))
    else:
        preflight.render_table(checks)
    return 1 if any(c.status == "fail" for c in checks) else 0


def _run(root: Path, install: bool, full_start: bool) -> int:
    from worker import launch, ready

    report = _load(root)
    warning = envmod.env_file_mode_warning(root)
    if warning:
        log.warning("%s; run: chmod 600 %s", warning, root / envmod.ENV_FILE_NAME)
    if report.env is None:
        return _invalid_env(root, report)
    for message in report.warnings:
        log.warning("%s", message)
    try:
        colour = ready.colour_from_env()
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    return launch.run_worker(report.env, root, install=install, full_start=full_start,
                             colour=colour)


def _invalid_env(root: Path, report: envmod.EnvReport) -> int:
    """A slot that cannot start for its .env.worker has failed to start like any other: its
    error line is recorded (``status`` says "worker failing", a restart names it) and after
    MAX_STARTS supervisord leaves it down. Run by hand (not under supervisord): exit 2."""
    from worker import ready

    _print_problems(report)
    if not os.environ.get("SUPERVISOR_ENABLED"):
        return 2
    try:
        colour = ready.colour_from_env()
    except ValueError:
        return 2
    error = envmod.redact_text("invalid .env.worker: " + "; ".join(report.problems),
                               set(envmod.secrets_of(envmod.load_values(root))))
    count = ready.record_failed_start(root, colour, ready.read_revision(root), error,
                                      os.getppid())
    return ready.GAVE_UP_EXIT if count >= ready.MAX_STARTS else ready.FAILED_START_EXIT


def _enter_ready_env(root: Path, argv: list[str]) -> None:
    """Re-exec into the env of the current requirements when it is built (doctor checks what
    the worker will import); stay here when there is none."""
    from worker import envs

    env = envs.ready_env(root)
    if env is not None:
        log.info("running in %s (the env of the current requirements)", env)
        python = str(env / "bin" / "python")
        sys.stderr.flush()
        os.execv(python, [python, "-m", "worker", *argv])


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run ``run`` or ``doctor`` in the cwd (the project root).

    Returns:
        The exit code.
    """
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse exits on usage errors and --help
        return 0 if exc.code in (0, None) else 2
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="[%(asctime)s: %(levelname)s/syncagent-worker] %(message)s")
    root = Path(os.getcwd())
    if args.command == "doctor":
        _enter_ready_env(root, sys.argv[1:] if argv is None else argv)
        return _doctor(root, args.json)
    if args.command == "configure":
        return _configure(root, args)
    if args.command == "requirements":
        return _requirements(root)
    if args.command == "write-env":
        return _write_env(root, args.mode)
    if args.command == "boot":
        return _boot(root, args)
    return _run(root, install=not args.no_install, full_start=args.full_start)


if __name__ == "__main__":
    sys.exit(main())
