"""
Command-line parsing for every C{mproxy} command.

Flags follow the conventions of kamal-proxy (cobra): C{--flag value} or
C{--flag=value}; booleans bare (C{--tls}) or explicit (C{--tls=false}); list
flags repeat and/or take comma-separated values.  Errors raise L{UsageError}
with the message the user sees after C{Error: }.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable, Sequence

from mproxy.config import SERVER_OPTIONS, parse_bool
from mproxy import spec
from mproxy.spec import format_duration, parse_duration


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # type: ignore[override]
        raise UsageError(message)

    def exit(self, status: int = 0, message: str | None = None) -> Any:  # type: ignore[override]
        if status:
            raise UsageError((message or "").strip())
        raise SystemExit(status)


def _typed(parse: Callable[[str], Any], what: str) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            reason = str(e)
            if not reason.startswith("invalid"):
                reason = f"invalid {what} {text!r}"
            raise argparse.ArgumentTypeError(reason)

    convert.__name__ = what
    return convert


duration = _typed(parse_duration, "duration")
_d = format_duration
integer = _typed(lambda s: int(s, 10), "integer")


def _nonneg_int(text: str) -> int:
    v = integer(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: must not be negative")
    return v


def _with_default(help: str, default: str | None) -> str:
    """
    A flag's help with its default, said once: not appended when the text
    already says it (C{(default: the target's port)}).
    """
    if default is None or "(default" in help:
        return help
    return f"{help} (default {default})"


class Command:
    """
    One subcommand: its parser and which of its flags were given explicitly.
    """

    def __init__(self, name: str, summary: str, usage: str) -> None:
        self.name = name
        self.summary = summary
        self.parser = _Parser(
            prog=f"mproxy {name}", usage=usage, description=summary, add_help=True
        )
        self.bools: set[str] = set()
        self.lists: set[str] = set()
        self.valued: set[str] = set()

    def flag(self, name: str, help: str, default: bool = False) -> None:
        dest = name.replace("-", "_")
        self.parser.add_argument(
            f"--{name}", dest=dest, action="store_const", const=True, default=None,
            help=_with_default(help, str(default).lower()),
        )
        self.parser.add_argument(
            f"--no-{name}", dest=dest, action="store_const", const=False,
            help=argparse.SUPPRESS,
        )
        self.bools.add(name)

    def option(self, name: str, help: str, type: Any = str, default: Any = None,
               aliases: Sequence[str] = (), metavar: str | None = None) -> None:
        dest = name.replace("-", "_")
        shown = None if default in (None, "", 0, ()) else str(default)
        self.valued.update(f"--{n}" for n in (name, *aliases))
        self.parser.add_argument(
            f"--{name}", *[f"--{a}" for a in aliases], dest=dest, type=type,
            default=None, help=_with_default(help, shown),
            metavar=metavar or name.split("-")[-1].upper(),
        )

    def list_option(self, name: str, help: str, metavar: str | None = None) -> None:
        dest = name.replace("-", "_")
        self.valued.add(f"--{name}")
        self.parser.add_argument(
            f"--{name}", dest=dest, action="append", default=None, help=help,
            metavar=metavar or name.split("-")[-1].upper(),
        )
        self.lists.add(dest)

    def alias_flag(self, alias: str, name: str) -> None:
        dest = name.replace("-", "_")
        self.parser.add_argument(
            f"--{alias}", dest=dest, action="store_const", const=True, help=f"Same as --{name}"
        )
        self.parser.add_argument(
            f"--no-{alias}", dest=dest, action="store_const", const=False, help=argparse.SUPPRESS
        )
        self.bools.add(alias)

    def parse(self, argv: Sequence[str]) -> argparse.Namespace:
        args: list[str] = []
        rest = list(argv)
        while rest:
            a = rest.pop(0)
            if a in self.valued and rest:
                # The next word is this option's value even when it starts
                # with "-" (--drain-timeout -1s is a negative duration, not
                # a missing value).
                args.append(f"{a}={rest.pop(0)}")
                continue
            if a.startswith("--") and "=" in a:
                name, _, value = a[2:].partition("=")
                if name in self.bools:
                    try:
                        on = parse_bool(value)
                    except ValueError:
                        raise UsageError(
                            f'invalid argument "{value}" for "--{name}" flag: '
                            "expected true or false"
                        )
                    args.append(f"--{name}" if on else f"--no-{name}")
                    continue
            args.append(a)
        ns = self.parser.parse_args(args)
        for dest in self.lists:
            values = getattr(ns, dest)
            if values is not None:
                setattr(
                    ns, dest,
                    [v.strip() for item in values for v in item.split(",") if v.strip()],
                )
        return ns

    def help(self) -> str:
        return self.parser.format_help()


def run_command() -> Command:
    cmd = Command("run", "Run the proxy server in the foreground", "mproxy run [options]")
    for option in SERVER_OPTIONS:
        env = f" [env MPROXY_{option.env} or {option.env}]"
        if option.flag:
            cmd.flag(option.name, option.help + env, option.default)
        else:
            shown = option.default if option.default not in ("", None) else None
            if isinstance(shown, float):
                shown = format_duration(shown)
            cmd.option(
                option.name,
                option.help + env,
                type=_typed(option.parse, option.name.split("-")[-1]),
                default=shown,
            )
    return cmd


def deploy_command() -> Command:
    cmd = Command(
        "deploy",
        "Deploy a target (or targets) to a service, wait until healthy, switch "
        "traffic and drain the old targets",
        "mproxy deploy HOST:PORT [options]\n"
        "       mproxy deploy SERVICE --target HOST:PORT[,HOST:PORT...] [options]",
    )
    p = cmd.parser
    p.add_argument("positional", metavar="TARGET|SERVICE")
    cmd.list_option("target", "Target host:port to route traffic to (repeatable)", "HOST:PORT")
    cmd.list_option("read-target", "Read-only target host:port (repeatable)", "HOST:PORT")
    cmd.list_option("host", "Host name(s) to serve this service on (default: any host)", "HOST")
    cmd.list_option("path-prefix", "Path prefix(es) to serve this service on (default /)", "PATH")
    cmd.flag("strip-path-prefix", "Strip the matched path prefix before forwarding", True)
    cmd.flag("tls", "Serve over HTTPS with an automatic certificate")
    cmd.alias_flag("ssl", "tls")
    cmd.flag("tls-staging", "Use Let's Encrypt staging for certificates")
    cmd.alias_flag("ssl-staging", "tls-staging")
    cmd.option("tls-certificate-path", "PEM certificate file (instead of ACME)", metavar="FILE")
    cmd.option("tls-private-key-path", "PEM private key file (instead of ACME)", metavar="FILE")
    cmd.option("tls-on-demand-url", "URL or path asked whether a host may get a certificate",
               metavar="URL")
    cmd.flag("tls-redirect", "Redirect plain HTTP to HTTPS when TLS is on", True)
    cmd.option("canonical-host", "Redirect other hosts of this service to this one", metavar="HOST")
    _deploy_target_flags(cmd)
    cmd.option("socket", "Control socket path", metavar="PATH")
    return cmd


def _deploy_target_flags(cmd: Command) -> None:
    """
    The C{deploy} flags about the targets: waits, health checks, timeouts,
    buffering, logging, forwarded headers.
    """
    cmd.option("deploy-timeout", "Maximum time to wait for the new targets to become healthy",
               type=duration, default=_d(spec.DEFAULT_DEPLOY_TIMEOUT), aliases=("timeout",),
               metavar="DURATION")
    cmd.option("drain-timeout", "Maximum time to let in-flight requests on old targets finish",
               type=duration, default=_d(spec.DEFAULT_DRAIN_TIMEOUT), metavar="DURATION")
    cmd.flag("force", "Switch traffic without waiting for health checks")
    cmd.option("health-check-path", "Path to health-check", default=spec.DEFAULT_HEALTH_PATH,
               metavar="PATH")
    cmd.option("health-check-interval", "Time between health checks", type=duration,
               default=_d(spec.DEFAULT_HEALTH_INTERVAL), metavar="DURATION")
    cmd.option("health-check-timeout", "Time allowed for one health check", type=duration,
               default=_d(spec.DEFAULT_HEALTH_TIMEOUT), metavar="DURATION")
    cmd.option("health-check-port", "Port to health-check (default: the target's port)",
               type=_nonneg_int, metavar="PORT")
    cmd.option("health-check-host", "Host header for health checks (default: target address)",
               metavar="HOST")
    cmd.option("target-timeout", "Maximum wait for a target's response headers",
               type=duration, default=_d(spec.DEFAULT_TARGET_TIMEOUT), metavar="DURATION")
    cmd.option("retry-timeout", "How long a request that could not be delivered may wait for "
               "a healthy target before a 503 page (0s: one immediate retry on another "
               "target, if there is one)",
               type=duration, default=_d(spec.DEFAULT_RETRY_TIMEOUT), metavar="DURATION")
    cmd.option("writer-affinity-timeout", "Keep a client's reads on writers this long after a write",
               type=duration, default=_d(spec.DEFAULT_WRITER_AFFINITY), metavar="DURATION")
    cmd.flag("read-target-websockets", "Allow WebSocket connections to go to read targets")
    cmd.flag("buffer-requests", "Read whole request bodies before forwarding")
    cmd.flag("buffer-responses", "Read whole response bodies before sending them")
    cmd.option("buffer-memory", "Bytes of a buffered body kept in memory before spilling to disk",
               type=_nonneg_int, default=spec.DEFAULT_BUFFER_MEMORY, metavar="BYTES")
    cmd.option("max-request-body", "Largest request body allowed (0: unlimited; needs "
               "--buffer-requests)", type=_nonneg_int, metavar="BYTES")
    cmd.option("max-response-body", "Largest response body allowed (0: unlimited; needs "
               "--buffer-responses)", type=_nonneg_int, metavar="BYTES")
    cmd.option("error-pages", "Directory of custom error page templates", metavar="DIR")
    cmd.list_option("log-request-header", "Request header to include in request logs", "NAME")
    cmd.list_option("log-response-header", "Response header to include in request logs", "NAME")
    cmd.list_option("exclude-metrics-path", "Path not counted in metrics", "PATH")
    cmd.flag("forward-headers", "Forward client X-Forwarded-* headers (default: on unless --tls)")
    cmd.option("client-ip-header", "Header holding the real client IP", metavar="NAME")
    cmd.flag("scope-cookie-paths", "Scope Set-Cookie paths to the path prefix")


def simple_command(name: str, summary: str, *, service: bool = True) -> Command:
    usage = f"mproxy {name} SERVICE [options]" if service else f"mproxy {name} [options]"
    cmd = Command(name, summary, usage)
    if service:
        cmd.parser.add_argument("service", metavar="SERVICE")
    cmd.option("socket", "Control socket path", metavar="PATH")
    return cmd


def pause_command() -> Command:
    cmd = simple_command("pause", "Pause a service: hold new requests until it is resumed")
    cmd.option("drain-timeout", "Time to let in-flight requests finish", type=duration,
               default=_d(spec.DEFAULT_DRAIN_TIMEOUT), metavar="DURATION")
    cmd.option("max-pause", "How long a request is held before it fails with 504",
               type=duration, default=_d(spec.DEFAULT_PAUSE_TIMEOUT), metavar="DURATION")
    return cmd


def stop_command() -> Command:
    cmd = simple_command("stop", "Stop a service: answer every request with a 503 page")
    cmd.option("drain-timeout", "Time to let in-flight requests finish", type=duration,
               default=_d(spec.DEFAULT_DRAIN_TIMEOUT), metavar="DURATION")
    cmd.option("message", "Message shown on the 503 page", metavar="TEXT")
    return cmd


def list_command() -> Command:
    cmd = simple_command("list", "List the services", service=False)
    cmd.flag("json", "Print JSON for scripts")
    return cmd


def rollout_deploy_command() -> Command:
    cmd = simple_command("rollout deploy", "Deploy targets to the rollout slot of a service")
    cmd.list_option("target", "Target host:port (repeatable)", "HOST:PORT")
    cmd.list_option("read-target", "Read-only target host:port (repeatable)", "HOST:PORT")
    cmd.option("deploy-timeout", "Maximum time to wait for health", type=duration,
               default=_d(spec.DEFAULT_DEPLOY_TIMEOUT), aliases=("timeout",),
               metavar="DURATION")
    cmd.option("drain-timeout", "Time to let in-flight requests finish", type=duration,
               default=_d(spec.DEFAULT_DRAIN_TIMEOUT), metavar="DURATION")
    return cmd


def rollout_set_command() -> Command:
    cmd = simple_command("rollout set", "Send a share of traffic to the rollout slot")
    cmd.option("percent", "Percentage of cookie-carrying requests to send to the rollout "
               "(chosen by a hash of the mproxy-rollout cookie value, so a value always "
               "gets the same side)",
               type=integer, metavar="PERCENT")
    cmd.list_option("list", "Values of the mproxy-rollout cookie always sent to the rollout",
                    "VALUE")
    return cmd


def rollout_stop_command() -> Command:
    return simple_command("rollout stop", "Send all traffic back to the active slot")


def upgrade_command() -> Command:
    cmd = Command(
        "upgrade",
        "Replace the running server by the code installed now, without dropping a "
        "connection (the server keeps its PID, sockets and state)",
        "mproxy upgrade [options]",
    )
    cmd.option("drain-timeout", "Time to let the old server's in-flight requests finish",
               type=duration, default=_d(10.0))
    cmd.option("socket", "Control socket path", metavar="PATH")
    return cmd
