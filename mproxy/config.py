"""
Server configuration: the options of C{mproxy run} and C{twistd mproxy}, their
defaults, and their environment variables (C{MPROXY_<NAME>} first, then
C{<NAME>}; an explicit flag beats both).  One table, L{SERVER_OPTIONS}, feeds
both command-line parsers.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping

from attrs import frozen

from mproxy.errors import InvalidOptions
from mproxy.spec import parse_duration

#: How long a stop lets in-flight requests finish (not an option).
SHUTDOWN_GRACE = 10.0

LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"
LETS_ENCRYPT_STAGING = "https://acme-staging-v02.api.letsencrypt.org/directory"

_TRUE = {"1", "t", "true", "yes", "on"}
_FALSE = {"0", "f", "false", "no", "off"}


def parse_bool(text: str) -> bool:
    v = text.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(f"invalid boolean {text!r}")


def parse_port(text: str) -> int:
    try:
        port = int(text.strip(), 10)
    except ValueError:
        raise ValueError(f"invalid port {text!r}")
    if not 0 <= port < 65536:
        raise ValueError(f"invalid port {text!r}: must be 0-65535")
    return port


def parse_str(text: str) -> str:
    return text


def usable_cpus() -> int:
    """
    The CPUs this process may run on (its affinity mask), at least one.
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


#: The most worker processes C{--workers} accepts.
MAX_WORKERS = 64


def parse_workers(text: str) -> int:
    """
    C{--workers}: a number of worker processes (1 to L{MAX_WORKERS}), or
    C{auto} for one per usable CPU.
    """
    v = text.strip().lower()
    if v == "auto":
        return usable_cpus()
    try:
        n = int(v, 10)
    except ValueError:
        raise ValueError(f"invalid number of workers {text!r}: expected a number or auto")
    if not 1 <= n <= MAX_WORKERS:
        raise ValueError(f"invalid number of workers {text!r}: must be 1-{MAX_WORKERS} or auto")
    return n


def parse_cluster_url(text: str) -> str:
    """
    C{redis://[user:password@]host:port/db} or C{rediss://...} (TLS); empty
    means no cluster.
    """
    from urllib.parse import urlsplit

    text = text.strip()
    if not text:
        return ""
    try:
        parts = urlsplit(text)
        parts.port  # a port that is not a number raises here
    except ValueError:
        raise ValueError(f"invalid cluster URL {text!r}")
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ValueError(
            f"invalid cluster URL {text!r}: expected redis://[user:password@]host:port/db or rediss://..."
        )
    db = parts.path.lstrip("/")
    if db and not db.isdigit():
        raise ValueError(f"invalid cluster URL {text!r}: the database must be a number")
    return text


@frozen
class OptionSpec:
    name: str  # flag name without dashes, e.g. "http-port"
    parse: Callable[[str], Any]
    default: Any
    env: str  # e.g. "HTTP_PORT"
    help: str
    flag: bool = False  # a boolean switch

    @property
    def attr(self) -> str:
        return self.name.replace("-", "_")


SERVER_OPTIONS: tuple[OptionSpec, ...] = (
    OptionSpec("http-port", parse_port, 80, "HTTP_PORT", "Port to serve HTTP traffic on"),
    OptionSpec("https-port", parse_port, 443, "HTTPS_PORT", "Port to serve HTTPS traffic on"),
    OptionSpec(
        "metrics-port", parse_port, 0, "METRICS_PORT",
        "Port to serve Prometheus metrics on (0 disables metrics)",
    ),
    OptionSpec(
        "bind", parse_str, "", "BIND",
        "Address to listen on for HTTP, HTTPS and metrics (default: all interfaces)",
    ),
    OptionSpec(
        "socket", parse_str, "", "SOCKET",
        "Control socket path (default: $XDG_RUNTIME_DIR/mproxy.sock or /tmp/mproxy.sock)",
    ),
    OptionSpec(
        "state-dir", parse_str, "", "STATE_DIR",
        "Directory for the state file and certificates (default: ~/.config/mproxy)",
    ),
    OptionSpec(
        "acme-directory", parse_str, LETS_ENCRYPT, "ACME_DIRECTORY",
        "ACME directory URL (default: Let's Encrypt production)",
    ),
    OptionSpec("acme-email", parse_str, "", "ACME_EMAIL", "Contact e-mail for the ACME account"),
    OptionSpec(
        "acme-ca-bundle", parse_str, "", "ACME_CA_BUNDLE",
        "PEM file of CA certificates to trust for the ACME server (default: system trust)",
    ),
    OptionSpec(
        "http-header-timeout", parse_duration, 30.0, "HTTP_HEADER_TIMEOUT",
        "Time a client has to send a request's header section, in seconds or 30s/1m (408)",
    ),
    OptionSpec(
        "http-idle-timeout", parse_duration, 75.0, "HTTP_IDLE_TIMEOUT",
        "Time an idle keep-alive client connection is kept open, in seconds or 75s/2m",
    ),
    OptionSpec(
        "cluster", parse_cluster_url, "", "CLUSTER",
        "Share ACME certificates with other mproxy nodes through Redis: "
        "redis://[user:password@]host:port/db or rediss://... (default: no cluster)",
    ),
    OptionSpec(
        "cluster-ca-bundle", parse_str, "", "CLUSTER_CA_BUNDLE",
        "PEM file of CA certificates to trust for a rediss:// cluster store (default: system trust)",
    ),
    OptionSpec(
        "cluster-node", parse_str, "", "CLUSTER_NODE",
        "This node's name in the cluster, shown by list (default: the host name)",
    ),
    OptionSpec(
        "http3", parse_bool, False, "HTTP3",
        "Also serve HTTP/3 (QUIC) on UDP at the HTTPS port", flag=True,
    ),
    OptionSpec("debug", parse_bool, False, "DEBUG", "Log at DEBUG level", flag=True),
    OptionSpec(
        "workers", parse_workers, "auto", "WORKERS",
        "Worker processes serving HTTP and HTTPS: a number, or auto for one per usable CPU",
    ),
)


@frozen
class ServerConfig:
    http_port: int = 80
    https_port: int = 443
    metrics_port: int = 0
    bind: str = ""
    socket: str = ""
    state_dir: str = ""
    acme_directory: str = LETS_ENCRYPT
    acme_email: str = ""
    acme_ca_bundle: str = ""
    http_header_timeout: float = 30.0
    http_idle_timeout: float = 75.0
    cluster: str = ""
    cluster_ca_bundle: str = ""
    cluster_node: str = ""
    http3: bool = False
    debug: bool = False
    #: data-plane worker processes; 0 serves in this process (no workers)
    workers: int = 0


def resolve_config(
    explicit: Mapping[str, Any], environ: Mapping[str, str] = os.environ
) -> ServerConfig:
    """
    Combine flags given on the command line (C{explicit}, keyed by attribute
    name, only those given) with the environment and the defaults.

    @raise InvalidOptions: when an environment value does not parse.
    """
    values: dict[str, Any] = {}
    for spec in SERVER_OPTIONS:
        if spec.attr in explicit and explicit[spec.attr] is not None:
            values[spec.attr] = explicit[spec.attr]
            continue
        for var in ("MPROXY_" + spec.env, spec.env):
            raw = environ.get(var)
            if raw is None or raw == "":
                continue
            try:
                values[spec.attr] = spec.parse(raw)
            except ValueError as e:
                raise InvalidOptions(f"invalid value for ${var}: {e}")
            break
        else:
            default = spec.default
            # a default given as text (C{auto}) is resolved as if it were given
            values[spec.attr] = spec.parse(default) if spec.parse is parse_workers else default
    values["socket"] = socket_path(values["socket"], environ)
    values["state_dir"] = state_dir(values["state_dir"], environ)
    return ServerConfig(**values)


def socket_path(explicit: str = "", environ: Mapping[str, str] = os.environ) -> str:
    """
    The control socket: the flag, else C{$MPROXY_SOCKET} (then C{$SOCKET},
    as the server reads it), else C{$XDG_RUNTIME_DIR/mproxy.sock}, else
    C{/tmp/mproxy.sock}.  Clients and the server resolve it the same way.
    """
    if explicit:
        return explicit
    for var in ("MPROXY_SOCKET", "SOCKET"):
        if environ.get(var):
            return environ[var]
    if environ.get("XDG_RUNTIME_DIR"):
        return os.path.join(environ["XDG_RUNTIME_DIR"], "mproxy.sock")
    return "/tmp/mproxy.sock"


def state_dir(explicit: str = "", environ: Mapping[str, str] = os.environ) -> str:
    if explicit:
        return explicit
    if environ.get("MPROXY_STATE_DIR"):
        return environ["MPROXY_STATE_DIR"]
    if environ.get("XDG_CONFIG_HOME"):
        return os.path.join(environ["XDG_CONFIG_HOME"], "mproxy")
    return os.path.join(os.path.expanduser("~"), ".config", "mproxy")
