"""
What a deploy asks for, as plain immutable values, and every rule about them.

This module owns the deploy vocabulary: durations, target addresses, the
option types (L{HealthCheckConfig}, L{TargetOptions}, L{ServiceOptions}), the
L{DeployRequest} that carries them, their defaults (spelled here and nowhere
else), their validation (the server runs it, so every control client gets the
same answers), and their JSON form (L{to_json} / L{from_json}), shared by the
control protocol and the state file.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

import attr
import attrs
from attrs import field, frozen

from mproxy.errors import InvalidOptions, InvalidTarget

DEFAULT_DEPLOY_TIMEOUT = 30.0
DEFAULT_DRAIN_TIMEOUT = 30.0
DEFAULT_PAUSE_TIMEOUT = 30.0
DEFAULT_HEALTH_PATH = "/up"
DEFAULT_HEALTH_INTERVAL = 1.0
DEFAULT_HEALTH_TIMEOUT = 5.0
DEFAULT_TARGET_TIMEOUT = 30.0
DEFAULT_BUFFER_MEMORY = 1 << 20
DEFAULT_WRITER_AFFINITY = 1.0
DEFAULT_RETRY_TIMEOUT = 0.0

T = TypeVar("T")

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """
    Parse a duration such as C{500ms}, C{30s}, C{1m30s}, C{2h} or bare seconds
    (C{30}, C{0.5}) into seconds.

    @raise ValueError: when C{text} is not a duration.
    """
    s = text.strip()
    if not s:
        raise ValueError(f"invalid duration {text!r}")
    try:
        value = float(s)
    except ValueError:
        pass
    else:
        if value < 0:
            raise ValueError(f"invalid duration {text!r}: must not be negative")
        if value != value or value == float("inf"):
            raise ValueError(f"invalid duration {text!r}")
        return value
    if s.startswith("-"):
        raise ValueError(f"invalid duration {text!r}: must not be negative")
    pos = 0
    total = 0.0
    while pos < len(s):
        m = _DURATION_PART.match(s, pos)
        if m is None:
            raise ValueError(f"invalid duration {text!r}")
        total += float(m.group(1)) * _UNIT[m.group(2)]
        pos = m.end()
    return total


def format_duration(seconds: float) -> str:
    """
    Format seconds the way users typed them: C{30s}, C{500ms}, C{1m30s}.
    """
    if seconds and seconds < 1:
        ms = seconds * 1000
        return f"{ms:g}ms"
    whole = int(seconds)
    if whole != seconds:
        return f"{seconds:g}s"
    h, rest = divmod(whole, 3600)
    m, s = divmod(rest, 60)
    out = ""
    if h:
        out += f"{h}h"
    if m:
        out += f"{m}m"
    if s or not out:
        out += f"{s}s"
    return out


_TARGET = re.compile(r"^\w[-_.\w+]+(:\d+)?$")
_IPV6_TARGET = re.compile(r"^\[([0-9A-Fa-f:.]+)\](?::(\d+))?$")
_TARGET_FORM = (
    "use host:port (a host name or IPv4 address, or an IPv6 address in brackets; "
    "port 1-65535; no scheme or path)"
)


def _bad_target(text: str) -> InvalidTarget:
    if not text:
        return InvalidTarget(f"empty target: {_TARGET_FORM}")
    return InvalidTarget(f"invalid target {text!r}: {_TARGET_FORM}")


def parse_target(text: str) -> tuple[str, int]:
    """
    Split a target C{host[:port]} into host and port (80 when absent).

    IPv6 literals are accepted in brackets (C{[::1]:3000}).

    @raise InvalidTarget: for anything else, saying what is allowed.
    """
    m6 = _IPV6_TARGET.match(text)
    if m6:
        port = int(m6.group(2)) if m6.group(2) else 80
        if not 0 < port < 65536:
            raise _bad_target(text)
        return m6.group(1), port
    if not _TARGET.match(text):
        raise _bad_target(text)
    host, sep, port_text = text.rpartition(":")
    if not sep:
        return text, 80
    port = int(port_text)
    if not 0 < port < 65536:
        raise _bad_target(text)
    return host, port


def unique(values: Any) -> tuple[str, ...]:
    """
    The values in their first order, each once (C{--target X --target X}
    is one target).
    """
    return tuple(dict.fromkeys(values or ()))


def validate_targets(writers: tuple[str, ...], readers: tuple[str, ...]) -> None:
    """
    @raise InvalidOptions: when there is no writer, or an address is both a
        writer and a reader.
    @raise InvalidTarget: for an address that is not C{host[:port]}.
    """
    if not writers:
        raise InvalidOptions('required flag(s) "target" not set')
    for t in writers + readers:
        parse_target(t)
    both = [t for t in readers if t in writers]
    if both:
        raise InvalidOptions(f"{both[0]} is given both as a target and as a read target")


def normalise_hosts(hosts: Any) -> tuple[str, ...]:
    """
    Hosts are matched case-insensitively, so they are stored lower-cased.  No
    hosts means the default host C{""}.
    """
    out = tuple(h.strip().lower().rstrip(".") for h in hosts if h is not None)
    return out or ("",)


def normalise_prefix(prefix: str) -> str:
    return "/" + prefix.strip("/")


def normalise_prefixes(prefixes: Any) -> tuple[str, ...]:
    out = tuple(dict.fromkeys(normalise_prefix(p) for p in prefixes))
    return out or ("/",)


def _tuple(value: Any) -> tuple[str, ...]:
    return tuple(value or ())


def given(**values: Any) -> dict[str, Any]:
    """
    The values that are not C{None}, as keyword arguments: pass only what
    a client gave, and the rest take the defaults declared here.
    """
    return {k: v for k, v in values.items() if v is not None}


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise InvalidOptions(f"{name} must be greater than zero")


def _not_negative(name: str, value: float) -> None:
    if value < 0:
        raise InvalidOptions(f"{name} must not be negative")


@frozen
class HealthCheckConfig:
    path: str = DEFAULT_HEALTH_PATH
    port: int = 0
    interval: float = DEFAULT_HEALTH_INTERVAL
    timeout: float = DEFAULT_HEALTH_TIMEOUT
    host: str = ""

    def validate(self) -> None:
        """
        @raise InvalidOptions: naming the first value out of range.
        """
        if not 0 <= self.port <= 65535:
            raise InvalidOptions(f"invalid health-check-port {self.port}")
        _positive("health-check-interval", self.interval)
        _positive("health-check-timeout", self.timeout)


@frozen
class TargetOptions:
    health_check: HealthCheckConfig = field(factory=HealthCheckConfig)
    target_timeout: float = DEFAULT_TARGET_TIMEOUT
    buffer_requests: bool = False
    buffer_responses: bool = False
    buffer_memory: int = DEFAULT_BUFFER_MEMORY
    max_request_body: int = 0
    max_response_body: int = 0
    log_request_headers: tuple[str, ...] = field(default=(), converter=_tuple)
    log_response_headers: tuple[str, ...] = field(default=(), converter=_tuple)
    forward_headers: bool = True
    scope_cookie_paths: bool = False
    #: how long a request that could not be delivered (or found no healthy
    #: target) may wait for a healthy one; 0: one immediate retry on another
    #: target, if there is one
    retry_timeout: float = DEFAULT_RETRY_TIMEOUT

    def validate(self) -> None:
        """
        @raise InvalidOptions: naming the first value out of range.
        """
        self.health_check.validate()
        _positive("target-timeout", self.target_timeout)
        _not_negative("retry-timeout", self.retry_timeout)
        _not_negative("buffer-memory", self.buffer_memory)
        _not_negative("max-request-body", self.max_request_body)
        _not_negative("max-response-body", self.max_response_body)


@frozen
class ServiceOptions:
    hosts: tuple[str, ...] = field(default=("",), converter=normalise_hosts)
    path_prefixes: tuple[str, ...] = field(default=("/",), converter=normalise_prefixes)
    strip_prefix: bool = True
    tls_enabled: bool = False
    tls_certificate_path: str = ""
    tls_private_key_path: str = ""
    tls_on_demand_url: str = ""
    tls_redirect: bool = True
    tls_staging: bool = False
    canonical_host: str = ""
    error_pages: str = ""
    writer_affinity_timeout: float = DEFAULT_WRITER_AFFINITY
    read_targets_accept_websockets: bool = False
    exclude_metrics_paths: tuple[str, ...] = field(default=(), converter=_tuple)
    client_ip_header: str = ""

    @property
    def has_configured_hosts(self) -> bool:
        return bool(self.hosts) and all(h != "" for h in self.hosts)

    def validate(self) -> None:
        """
        Check the options against each other (the rules kamal-proxy applies).

        @raise InvalidOptions: naming the first problem found.
        """

        def bad(msg: str) -> InvalidOptions:
            return InvalidOptions("service options invalid: " + msg)

        if self.tls_on_demand_url and not self.tls_enabled:
            raise bad("TLS must be enabled to use a TLS on-demand URL")
        if self.tls_enabled:
            if self.tls_on_demand_url:
                if self.has_configured_hosts:
                    raise bad("cannot set hosts when using a TLS on-demand URL")
                if self.tls_certificate_path or self.tls_private_key_path:
                    raise bad("cannot use a custom TLS certificate with a TLS on-demand URL")
                if self.canonical_host:
                    raise bad("cannot set a canonical host when using a TLS on-demand URL")
                _validate_on_demand_url(self.tls_on_demand_url, bad)
            elif not self.has_configured_hosts:
                raise bad("host must be set when using TLS")
            if "/" not in self.path_prefixes:
                raise bad("TLS settings must be specified on the root path service")
        if bool(self.tls_certificate_path) != bool(self.tls_private_key_path):
            raise bad(
                "tls-certificate-path and tls-private-key-path must be given together"
            )
        for h in self.hosts:
            if h and not _HOST.match(h):
                raise bad(f"invalid host {h!r}")
        if self.canonical_host and self.hosts and self.hosts[0]:
            if self.canonical_host.lower() not in self.hosts:
                listed = " ".join(self.hosts)
                raise bad(
                    f"canonical-host '{self.canonical_host}' must be present in the "
                    f"hosts list: [{listed}]"
                )


_HOST = re.compile(r"^(\*\.)?[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*$")


def _validate_on_demand_url(url: str, bad: Any) -> None:
    from urllib.parse import urlsplit

    if url.startswith("//"):
        raise bad("tls-on-demand-url must be a path or an absolute http(s) URL")
    if url.startswith("/"):
        return
    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise bad(f"unable to parse tls-on-demand-url: {e}")
    if not parts.scheme:
        raise bad(f"unable to parse tls-on-demand-url: {url!r} is not an absolute URL")
    if parts.scheme not in ("http", "https"):
        raise bad(f'unsupported scheme "{parts.scheme}" in tls-on-demand-url')
    if not parts.hostname:
        raise bad("missing host in tls-on-demand-url")


@frozen
class DeployRequest:
    """
    Everything a deploy asks for: the new targets plus the options of the
    service they belong to.  Repeated addresses count once.
    """

    service: str
    targets: tuple[str, ...] = field(converter=unique)
    readers: tuple[str, ...] = field(default=(), converter=unique)
    options: ServiceOptions = field(factory=ServiceOptions)
    target_options: TargetOptions = field(factory=TargetOptions)
    deploy_timeout: float = DEFAULT_DEPLOY_TIMEOUT
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    force: bool = False

    def validate(self) -> None:
        """
        Every check a deploy must pass before anything is health-checked.

        @raise InvalidOptions: naming the first problem.
        @raise InvalidTarget: for a malformed address.
        """
        if not self.service:
            raise InvalidOptions("service name must not be empty")
        validate_targets(self.targets, self.readers)
        validate_timeouts(self.deploy_timeout, self.drain_timeout, self.force)
        self.options.validate()
        self.target_options.validate()


def validate_timeouts(deploy_timeout: float, drain_timeout: float, force: bool = False) -> None:
    """
    The waits of a deploy (or rollout deploy).  Without C{force}, a deploy
    timeout of 0 would fail even a healthy target before its first check
    answers, so it is refused.

    @raise InvalidOptions: naming the first one out of range.
    """
    if not force:
        _positive("deploy-timeout", deploy_timeout)
    _not_negative("drain-timeout", drain_timeout)


def validate_drain(drain_timeout: float, max_pause: float = 0.0) -> None:
    """
    The durations of C{pause} and C{stop}.

    @raise InvalidOptions: for a negative one.
    """
    _not_negative("drain-timeout", drain_timeout)
    _not_negative("max-pause", max_pause)


def validate_percentage(percentage: int) -> None:
    """
    @raise InvalidOptions: unless 0 <= C{percentage} <= 100.
    """
    if not 0 <= percentage <= 100:
        raise InvalidOptions("percent must be between 0 and 100")


def to_json(value: Any) -> Any:
    """
    Turn one of the value types above into JSON-ready data (tuples → lists).
    """
    return attr.asdict(value, retain_collection_types=False)


def from_json(cls: type[T], data: Any) -> T:
    """
    Build C{cls} (one of the value types above) from its JSON form: missing
    keys take their defaults, unknown keys are ignored (so newer state files
    stay readable), nested value types are decoded too, and every value must
    have its field's type.

    @raise TypeError: naming the field whose value has the wrong type.
    """
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__} must be an object, not {type(data).__name__}")
    kwargs: dict[str, Any] = {}
    for a in attrs.fields(attrs.resolve_types(cls)):  # type: ignore[arg-type]
        if a.name in data:
            kwargs[a.name] = _decode(a.type, data[a.name], a.name)
    return cls(**kwargs)


def _decode(kind: Any, value: Any, name: str) -> Any:
    if attrs.has(kind):
        return from_json(kind, value)
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind is str:
        ok = isinstance(value, str)
    else:  # tuple[str, ...]
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        value = tuple(value) if ok else value
    if not ok:
        raise TypeError(f"{name} has the wrong type ({type(value).__name__})")
    return value
