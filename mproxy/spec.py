"""
Plain value types describing what a service is: the routing table is built from
these and the state file stores them.  Everything here is immutable and
JSON-serialisable through L{to_json} / L{from_json}.
"""

from __future__ import annotations

import re
from typing import Any

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
        if value < 0 or value != value or value == float("inf"):
            raise ValueError(f"invalid duration {text!r}")
        return value
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


def parse_target(text: str) -> tuple[str, int]:
    """
    Split a target C{host[:port]} into host and port (80 when absent).

    IPv6 literals are accepted in brackets (C{[::1]:3000}).

    @raise InvalidTarget: for anything else.
    """
    m6 = _IPV6_TARGET.match(text)
    if m6:
        port = int(m6.group(2)) if m6.group(2) else 80
        if not 0 < port < 65536:
            raise InvalidTarget(f"{text} :invalid host pattern")
        return m6.group(1), port
    if not _TARGET.match(text):
        raise InvalidTarget(f"{text} :invalid host pattern")
    host, sep, port_text = text.rpartition(":")
    if not sep:
        return text, 80
    port = int(port_text)
    if not 0 < port < 65536:
        raise InvalidTarget(f"{text} :invalid host pattern")
    return host, port


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


@frozen
class HealthCheckConfig:
    path: str = DEFAULT_HEALTH_PATH
    port: int = 0
    interval: float = DEFAULT_HEALTH_INTERVAL
    timeout: float = DEFAULT_HEALTH_TIMEOUT
    host: str = ""


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
        Check the options against each other (reference section 1.12).

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
    service they belong to.
    """

    service: str
    targets: tuple[str, ...] = field(converter=tuple)
    readers: tuple[str, ...] = field(default=(), converter=tuple)
    options: ServiceOptions = field(factory=ServiceOptions)
    target_options: TargetOptions = field(factory=TargetOptions)
    deploy_timeout: float = DEFAULT_DEPLOY_TIMEOUT
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    force: bool = False

    def validate(self) -> None:
        if not self.service:
            raise InvalidOptions("service name must not be empty")
        if not self.targets:
            raise InvalidOptions('required flag(s) "target" not set')
        for t in self.targets + self.readers:
            parse_target(t)
        self.options.validate()


def to_json(value: Any) -> Any:
    """
    Turn one of the value types above into JSON-ready data (tuples → lists).
    """
    return attr.asdict(value, retain_collection_types=False)


def options_from_json(cls: type, data: dict[str, Any]) -> Any:
    """
    Build C{cls} from a JSON mapping, ignoring unknown keys so that newer state
    files stay readable, and recursing into nested value types.
    """
    kwargs: dict[str, Any] = {}
    for a in attrs.fields(cls):
        if a.name not in data:
            continue
        v = data[a.name]
        if a.name == "health_check" and isinstance(v, dict):
            v = options_from_json(HealthCheckConfig, v)
        kwargs[a.name] = v
    return cls(**kwargs)
