"""Tiny local wheels, written directly (no build backend, no network): an offline package
index for installer tests, served with ``--find-links`` and ``--no-index``."""
from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path
from typing import Mapping, Sequence

__all__ = ["write_wheel", "offline_index_env"]


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def write_wheel(directory: Path, name: str, version: str, requires: Sequence[str] = ()) -> Path:
    """Write ``<name>-<version>-py3-none-any.whl`` (one empty module) into ``directory``."""
    module = name.replace("-", "_")
    dist_info = f"{module}-{version}.dist-info"
    metadata = "".join([f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
                        *(f"Requires-Dist: {r}\n" for r in requires)])
    files = {f"{module}/__init__.py": b"",
             f"{dist_info}/METADATA": metadata.encode(),
             f"{dist_info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: tests\n"
                                   b"Root-Is-Purelib: true\nTag: py3-none-any\n"}
    record = [_record_line(n, d) for n, d in files.items()] + [f"{dist_info}/RECORD,,"]
    files[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for n, d in files.items():
            wheel.writestr(n, d)
    return path


def offline_index_env(directory: Path) -> Mapping[str, str]:
    """Environment that points pip and uv at ``directory`` alone (no index, no config file's
    extra index)."""
    return {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(directory), "PIP_CONFIG_FILE": "/dev/null",
            "UV_NO_INDEX": "1", "UV_FIND_LINKS": str(directory), "UV_NO_CONFIG": "1"}
