"""
The state file: a JSON document holding every service, written atomically
(temporary file, fsync, rename, fsync of the directory) after each change, so
a crash at any moment leaves either the old or the new file, never a torn one.
"""

from __future__ import annotations

import json
import os
from typing import Any

from mproxy.errors import StateError
from mproxy.fileutil import atomic_write

STATE_VERSION = 1
STATE_FILENAME = "mproxy.state"


class StateStore:
    def __init__(self, path: str) -> None:
        self.path = path

    def load(self) -> list[dict[str, Any]] | None:
        """
        The saved service records, or C{None} when there is no state file yet.

        @raise StateError: naming the file, when it exists but cannot be read
            or parsed.  The file is left untouched.
        """
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StateError(f"cannot read state file {self.path}: {e.strerror or e}")
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise StateError(f"state file {self.path} is corrupt: {e}")
        if isinstance(data, list):
            services = data
        elif isinstance(data, dict) and isinstance(data.get("services"), list):
            version = data.get("version", STATE_VERSION)
            if not isinstance(version, int) or version > STATE_VERSION:
                raise StateError(
                    f"state file {self.path} has unsupported version {version!r}"
                )
            services = data["services"]
        else:
            raise StateError(f"state file {self.path} is corrupt: not a list of services")
        for s in services:
            if not isinstance(s, dict) or not isinstance(s.get("name"), str):
                raise StateError(
                    f"state file {self.path} is corrupt: bad service record {s!r:.80}"
                )
        return services

    def save(self, services: list[dict[str, Any]]) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, mode=0o700, exist_ok=True)
        data = json.dumps(
            {"version": STATE_VERSION, "services": services}, indent=1, sort_keys=True
        ).encode("utf-8") + b"\n"
        atomic_write(self.path, data, 0o600)
