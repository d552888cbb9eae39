"""`make demo`: the main job on the local sandbox.

    python examples/demo.py            sandbox up (sshd, Redis, supervised demo worker), then
                                       `syncagent watch` on the demo project until Ctrl-C
    python examples/demo.py task       send app.tasks.demo.version through the sandbox broker
    python examples/demo.py task add 2 3
    python examples/demo.py down       stop everything the sandbox started

The sandbox lives in ~/.local/state/syncagent/sandbox/demo (XDG_STATE_HOME is honoured).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from syncagent import sandbox
from syncagent.cli import main as syncagent

NAME = "demo"


def up() -> int:
    box = sandbox.up(NAME, provision=True)
    project = Path(box.project)
    here = Path(sys.argv[0]).resolve()
    print(f"""
sandbox '{NAME}' is up: sshd on 127.0.0.1:{box.port}, Redis {box.redis_url},
the demo Celery app pushed to {box.remote_root}/project and running under supervisord.

Now watching {project}. In another terminal:
  1. see what the worker answers:   {sys.executable} {here} task
  2. edit the code:                 $EDITOR {project}/app/version.py   (change VERSION)
  3. ask again: the new code is live; the line below shows how long it took.
  on the "remote":                  {box.supervisorctl}
Ctrl-C stops watching (the sandbox keeps running; `{sys.executable} {here} down` stops it).
""", flush=True)
    return syncagent(["watch", NAME, "--path", str(project)])


def task(args: list[str]) -> int:
    box = sandbox.status(NAME)
    if box is None or not box.running or not box.redis_url:
        print("the demo sandbox is not running: run `make demo` first", file=sys.stderr)
        return 1
    client = sandbox.demo_client(box)
    name, params = (args[0], [int(a) for a in args[1:]]) if args else ("version", [])
    try:
        print(client.send_task(f"app.tasks.demo.{name}", args=params).get(timeout=30))
    finally:
        client.close()
    return 0


def down() -> int:
    stopped = sandbox.down(NAME)
    print(f"stopped pids {stopped}" if stopped else "nothing was running")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    command = sys.argv[1] if len(sys.argv) > 1 else "up"
    if command == "task":
        sys.exit(task(sys.argv[2:]))
    sys.exit(down() if command == "down" else up())
