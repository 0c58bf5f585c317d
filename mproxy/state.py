"""
The state file: what every service is, as typed records, kept in one JSON
document.

L{ServiceRecord} is one service as saved (its options, the addresses of its
active and rollout slots, its split and its pause state) with its JSON codec.
L{StateStore} writes the records atomically (temporary file, fsync, rename,
fsync of the directory), so a crash at any moment leaves either the old or
the new file, never a torn one, and reads them back checked, so that a bad
file is refused whole before anything is restored.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import attrs
from attrs import field, frozen

from mproxy.errors import InvalidOptions, InvalidTarget, StateError
from mproxy.fileutil import atomic_write
from mproxy.balancer import LoadBalancer
from mproxy.service import PauseState, RolloutSplit, Service
from mproxy.spec import (
    DEFAULT_PAUSE_TIMEOUT,
    ServiceOptions,
    TargetOptions,
    from_json,
    parse_target,
    to_json,
)

STATE_VERSION = 1
STATE_FILENAME = "mproxy.state"


@frozen
class Slot:
    """
    The addresses of one deployment of a service (its active or rollout
    load balancer).
    """

    writers: tuple[str, ...] = field(converter=tuple)
    readers: tuple[str, ...] = field(default=(), converter=tuple)


@frozen
class PauseRecord:
    state: PauseState = PauseState.RUNNING
    max_pause: float = DEFAULT_PAUSE_TIMEOUT
    stop_message: str = ""


@frozen
class ServiceRecord:
    """
    One service as the state file keeps it.
    """

    name: str
    options: ServiceOptions
    target_options: TargetOptions
    active: Slot
    rollout: Slot | None = None
    split: RolloutSplit | None = None
    pause: PauseRecord = field(factory=PauseRecord)

    @classmethod
    def of(cls, service: Service) -> ServiceRecord:
        """
        The record of a live service.
        """

        def slot(lb: LoadBalancer) -> Slot:
            return Slot(lb.writer_addresses, lb.reader_addresses)

        return cls(
            name=service.name,
            options=service.options,
            target_options=service.target_options,
            active=slot(service.active),
            rollout=slot(service.rollout) if service.rollout is not None else None,
            split=service.split,
            pause=PauseRecord(
                service.pause.state, service.pause.max_pause, service.pause.stop_message
            ),
        )

    def to_json(self) -> dict[str, Any]:
        rollout = self.rollout
        return {
            "name": self.name,
            "options": to_json(self.options),
            "target_options": to_json(self.target_options),
            "active_targets": list(self.active.writers),
            "active_readers": list(self.active.readers),
            "rollout_targets": list(rollout.writers) if rollout else None,
            "rollout_readers": list(rollout.readers) if rollout else None,
            "pause": {
                "state": int(self.pause.state),
                "stop_message": self.pause.stop_message,
                "max_pause": self.pause.max_pause,
            },
            "rollout_split": (
                {"percentage": self.split.percentage, "allowlist": list(self.split.allowlist)}
                if self.split
                else None
            ),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ServiceRecord:
        """
        Check and decode one saved service completely.

        @raise InvalidOptions: for an invalid record (its message names the
            service and what is wrong).
        """
        name = data["name"]
        try:
            return cls._decode(name, data)
        except (InvalidOptions, InvalidTarget) as e:
            raise InvalidOptions(f"service {name!r}: {e}")
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise InvalidOptions(f"service {name!r}: {e.__class__.__name__}: {e}")

    @classmethod
    def _decode(cls, name: str, data: dict[str, Any]) -> ServiceRecord:
        mapping = _reader(data)
        options = from_json(ServiceOptions, mapping("options"))
        target_options = from_json(TargetOptions, mapping("target_options"))
        if "/" in options.path_prefixes:
            options.validate()
        else:
            # Path services' TLS flags are inherited from their host's root
            # service (Router._inherit_tls), not set by the user.
            attrs.evolve(options, tls_enabled=False, tls_redirect=True).validate()
        active = Slot(_addresses(data, "active_targets"), _addresses(data, "active_readers"))
        if not active.writers:
            raise InvalidOptions("no active targets")
        rollout = Slot(_addresses(data, "rollout_targets"), _addresses(data, "rollout_readers"))
        split = None
        if data.get("rollout_split"):
            s = mapping("rollout_split")
            split = RolloutSplit(int(s.get("percentage", 0)), tuple(s.get("allowlist") or ()))
        pause = mapping("pause")
        return cls(
            name=name,
            options=options,
            target_options=target_options,
            active=active,
            rollout=rollout if rollout.writers else None,
            split=split,
            pause=PauseRecord(
                state=PauseState(int(pause.get("state", 0))),
                max_pause=float(pause.get("max_pause", DEFAULT_PAUSE_TIMEOUT)),
                stop_message=str(pause.get("stop_message", "")),
            ),
        )


def _reader(data: dict[str, Any]) -> Callable[[str], dict[str, Any]]:
    def mapping(key: str) -> dict[str, Any]:
        v = data.get(key) or {}
        if not isinstance(v, dict):
            raise TypeError(f"{key} is not an object")
        return v

    return mapping


def _addresses(data: dict[str, Any], key: str) -> tuple[str, ...]:
    v = tuple(data.get(key) or ())
    for t in v:
        parse_target(t)
    return v


class StateStore:
    def __init__(self, path: str) -> None:
        self.path = path

    def load(self) -> list[ServiceRecord] | None:
        """
        The saved services, or C{None} when there is no state file yet.

        @raise StateError: naming the file, when it exists but cannot be read
            or parsed, or a record is invalid.  The file is left untouched.
        """
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StateError(f"cannot read state file {self.path}: {e.strerror or e}")
        services = self._services(raw)
        try:
            return [ServiceRecord.from_json(s) for s in services]
        except InvalidOptions as e:
            raise StateError(f"state file {self.path} is invalid: {e}")

    def _services(self, raw: bytes) -> list[dict[str, Any]]:
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

    def save(self, records: list[ServiceRecord]) -> None:
        """
        Replace the file with C{records}, durably.

        @raise OSError: when it cannot be written; the old file is then intact.
        """
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, mode=0o700, exist_ok=True)
        services = [r.to_json() for r in records]
        data = json.dumps(
            {"version": STATE_VERSION, "services": services}, indent=1, sort_keys=True
        ).encode("utf-8") + b"\n"
        atomic_write(self.path, data, 0o600)
