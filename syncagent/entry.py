"""The console entry point: a command a warm holder answers skips the CLI's own imports.

A ``push`` (or ``status``, ``restart``, ``logs``) answered by the target's holder
(``syncagent.holder``) spends most of its time in the holder; in this process, importing click
and the command module was about 30 ms of it. Here the few arguments that choose the target
(``TARGET``, ``--path``, ``--remote-path``, ``--identity``, ``--all``) are read with the very
functions the CLI uses (``syncagent.config``), and the whole argv goes to the holder, which
parses it with click like any command. Only ``push`` goes to a holder for several targets (a
fleet's); the other commands hand over one target's. Anything else (another option, no holder,
an error while finding the target) goes to the full CLI, which then finds the same holder or
runs the command itself: this path only ever saves time, it decides nothing.
"""

from __future__ import annotations

import sys

# The options of the holder's commands, by what this reading does with them
# (tests/test_holder.py checks the lists against the CLI's commands):
TARGET_OPTIONS = ("--path", "--remote-path", "--identity")  # read: they choose the target
TARGET_FLAGS = ("--all",)  # read: every configured target (a fleet)
PLAIN_FLAGS = ("--json", "--no-restart", "--dry-run", "--restart-on-any-change",
               "--allow-mass-delete", "--trust-new-host")  # passed on as they are
VALUE_OPTIONS = ("--mode", "--policy", "--timeout", "--lines", "-n")  # passed on, with a value
FULL_CLI = ("--no-holder", "--follow", "-f")  # no holder, a stream
COMMANDS = ("push", "status", "restart", "logs")  # what a holder runs for a client
FLEET_COMMANDS = ("push",)  # those a holder runs for several targets


def main() -> int:
    argv = sys.argv[1:]
    if argv == ["--version"]:  # click's own wording, without importing click and the CLI
        from . import __version__

        print(f"syncagent, version {__version__}")
        return 0
    answer = _held(argv)
    if answer is None:
        from .cli import main as cli_main

        return cli_main(argv)
    for stream, text in ((sys.stdout, answer.out), (sys.stderr, answer.err)):
        stream.buffer.write(text.encode("utf-8", "backslashreplace"))
        stream.flush()
    return answer.code


def _held(argv: list[str]):
    """The holder's answer to ``argv``, or None: not a holder command, an argument this
    reading does not know, several targets for a command other than ``push``, no holder
    serving the target(s). A route (``syncagent.wire``) is tried first: it needs no config."""
    if not argv or argv[0] not in COMMANDS:  # --version, --help: not even the holder's imports
        return None
    if _read(argv[1:])[0] is None:
        return None
    from . import wire

    if not wire.env_allows():
        return None
    answer = wire.run_routed(argv)
    if answer is not None:
        return answer
    from . import holder

    found = resolve(argv)
    if found is None or not holder.enabled(found[0]):
        return None
    return holder.forward(found[0].root, found[1], argv)


def resolve(argv: list[str]):
    """(project, targets) that ``argv`` (a holder command) names, read here as the CLI reads
    them; None where this reading stops (an argument it does not know, several targets for
    a command other than ``push``, an error: the full CLI says what is wrong)."""
    specs, options = _read(argv[1:])
    if specs is None:
        return None
    fleet_ok = argv[0] in FLEET_COMMANDS
    if not fleet_ok and (len(specs) > 1 or "--all" in options):
        return None
    from .config import expand_specs, find_root, load_project, resolve_target

    try:
        project = load_project(find_root(explicit=options.get("--path")))
        names = expand_specs(project, tuple(specs), "--all" in options)
        if len(names) > 1 and (not fleet_ok or "--remote-path" in options):
            return None  # (--remote-path with several targets: the CLI's usage error)
        targets = [resolve_target(name, project, remote_path=options.get("--remote-path"),
                                  identity=options.get("--identity")) for name in names]
    except Exception:  # the full CLI says what is wrong, as it always has
        return None
    return project, targets


def _read(args: list[str]) -> tuple[list[str] | None, dict[str, str]]:
    """(target specs, target options) of ``args``; specs None when an argument is not one
    of the few this reading knows."""
    specs: list[str] = []
    options: dict[str, str] = {}
    it = iter(args)
    for arg in it:
        name, eq, value = arg.partition("=")
        if name in TARGET_OPTIONS:
            value = value if eq else next(it, "")
            if not value.strip():  # the CLI's usage error, not ours to word
                return None, {}
            options[name] = value
        elif arg in TARGET_FLAGS:
            options[arg] = ""
        elif arg in PLAIN_FLAGS:
            continue
        elif name in VALUE_OPTIONS:
            if not eq and next(it, None) is None:
                return None, {}
        elif arg.startswith("-"):
            return None, {}
        else:
            specs.append(arg)
    return specs, options


if __name__ == "__main__":
    sys.exit(main())
