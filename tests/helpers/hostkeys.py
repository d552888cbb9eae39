"""A changed host key, as the user would meet it: known_hosts names another key."""

from __future__ import annotations

import subprocess
from pathlib import Path


def replace_host_key(known: Path, scratch: Path) -> None:
    """Rewrite ``known`` so that its (first) host is named with a key made in ``scratch``."""
    other = scratch / "other_host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)],
                   check=True)
    host = known.read_text().split()[0]
    pub = Path(f"{other}.pub").read_text().split()
    known.write_text(f"{host} {pub[0]} {pub[1]}\n")
