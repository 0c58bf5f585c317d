"""
The C{mproxy} console script: which command runs (help, version, C{run},
or one of the client commands of L{mproxy.cli.remote}) and its exit status.

Every expected failure prints C{Error: <message>} on stderr and exits 1; no
traceback reaches the user for a bad flag, an unreachable server or a failed
deploy.

Each command imports only what it needs: C{--version} and the help import
next to nothing, a client command neither the server nor TLS (see
L{without_tls}), and C{run} the server (L{mproxy.server}).
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Sequence

import mproxy
from mproxy.cli.streams import Streams, fail


def _simple(name: str, summary: str) -> Callable[[], Any]:
    def command() -> Any:
        from mproxy.cli import parsing

        return parsing.simple_command(name, summary)

    return command


def _parser(name: str) -> Callable[[], Any]:
    """
    The factory C{name} of L{mproxy.cli.parsing}, imported when called.
    """

    def command() -> Any:
        from mproxy.cli import parsing

        return getattr(parsing, name)()

    return command


#: command name -> a factory of its L{mproxy.cli.parsing.Command}
COMMANDS: dict[str, Callable[[], Any]] = {
    "run": _parser("run_command"),
    "deploy": _parser("deploy_command"),
    "remove": _simple("remove", "Remove a service"),
    "list": _parser("list_command"),
    "pause": _parser("pause_command"),
    "resume": _simple("resume", "Resume a paused or stopped service"),
    "stop": _parser("stop_command"),
    "rollout deploy": _parser("rollout_deploy_command"),
    "rollout set": _parser("rollout_set_command"),
    "rollout stop": _parser("rollout_stop_command"),
    "upgrade": _parser("upgrade_command"),
}

#: Commands run by mproxy itself, not shown in the help.
HIDDEN = {
    "upgrade-check": _parser("run_command"),
}

#: The commands that run here rather than talk to a server.
LOCAL = frozenset(["run", "upgrade-check"])

ALIASES = {"rm": "remove", "ls": "list"}

OVERVIEW = f"""\
mproxy {mproxy.__version__}: an HTTP proxy for zero-downtime deployments

Usage:
  mproxy COMMAND [options]

Commands:
  run                 Run the proxy server in the foreground
  deploy              Deploy a target to a service (waits for health, switches, drains)
  list (ls)           List the services
  remove (rm)         Remove a service
  pause               Hold a service's requests until it is resumed
  resume              Resume a paused or stopped service
  stop                Answer a service's requests with a 503 page
  rollout deploy      Deploy targets to a service's rollout slot
  rollout set         Send a share of traffic to the rollout slot
  rollout stop        Send all traffic back to the active slot
  upgrade             Replace the running server by the installed code, dropping nothing
  help [COMMAND]      Show help for a command

Flags:
  --version           Print the version
  -h, --help          Show this help

Examples:
  mproxy run --http-port 8080
  mproxy deploy web-1:3000
  mproxy deploy web-1:3000 --host app1.example.com --ssl
  mproxy deploy app --target web-1:3000,web-2:3000 --host app.example.com
  mproxy list
  mproxy upgrade
"""


def split_command(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    if not argv:
        return None, []
    first = ALIASES.get(argv[0], argv[0])
    if first == "rollout":
        if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
            return "rollout", list(argv[1:])
        return f"rollout {argv[1]}", list(argv[2:])
    return first, list(argv[1:])


def show_help(topic: str | None, streams: Streams) -> int:
    if topic is None:
        streams.out.write(OVERVIEW)
        return 0
    topic = ALIASES.get(topic, topic)
    if topic == "rollout":
        streams.out.write(
            "Usage:\n  mproxy rollout deploy|set|stop SERVICE [options]\n\n"
            "Subcommands:\n  deploy  Deploy targets to the rollout slot\n"
            "  set     Send a share of traffic to the rollout slot\n"
            "  stop    Send all traffic back to the active slot\n"
        )
        return 0
    factory = COMMANDS.get(topic)
    if factory is None:
        return -1
    streams.out.write(factory().help())
    return 0


def main(argv: Sequence[str], streams: Streams | None = None, reactor: Any = None) -> int:
    """
    Run one command; returns the exit status.
    """
    streams = streams or Streams(sys.stdout, sys.stderr)
    name, rest = split_command(argv)
    if name is None or name in ("-h", "--help"):
        return show_help(None, streams)
    if name == "--version" or name == "version":
        streams.out.write(f"mproxy {mproxy.__version__}\n")
        return 0
    if name == "help":
        topic = " ".join(rest) if rest else None
        status = show_help(topic, streams)
        if status < 0:
            return fail(streams, f'unknown help topic "{topic}"')
        return status
    if name == "rollout":
        return show_help("rollout", streams)
    factory = COMMANDS.get(name) or HIDDEN.get(name)
    if factory is None and name.startswith("rollout "):
        sub = name.split(" ", 1)[1]
        return fail(streams, f'unknown command "{sub}" for "mproxy rollout"')
    if factory is None:
        return fail(streams, f'unknown command "{name}" for "mproxy" (see `mproxy help`)')
    from mproxy.cli.parsing import UsageError

    cmd = factory()
    if "-h" in rest or "--help" in rest:
        streams.out.write(cmd.help())
        return 0
    try:
        ns = cmd.parse(rest)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except UsageError as e:
        return fail(streams, str(e))
    if name == "run":
        from mproxy.server import run_server

        return run_server(ns, streams, run_args=rest)
    if name == "upgrade-check":
        from mproxy.upgrade import check_installed

        return check_installed(ns, streams)
    from mproxy.errors import MproxyError

    if name == "deploy":
        from mproxy.cli.requests import deploy_request

        try:
            deploy_request(ns)
        except MproxyError as e:
            return fail(streams, str(e))
    from mproxy.cli.remote import run_client

    return run_client(name, ns, streams, reactor)


def without_tls() -> None:
    """
    Make this process run as if pyOpenSSL were not installed.  A client
    command talks to the server over a UNIX socket and never uses TLS, but
    Twisted loads pyOpenSSL and cryptography wherever it can (for AMP's
    StartTLS, TLS transports, endpoints): about a third of a command's
    start-up.  Every such import of Twisted's is optional (it falls back to
    no TLS); a C{None} in C{sys.modules} makes it fail as if the package
    were missing.  Only for a process that has not imported it already.
    """
    sys.modules.setdefault("OpenSSL", None)  # type: ignore[arg-type]


def run() -> None:
    """
    Console-script entry point.
    """
    from mproxy import collector

    collector.pause()  # until the command has imported what it runs
    argv = sys.argv[1:]
    if split_command(argv)[0] not in LOCAL:
        without_tls()
    try:
        status = main(argv)
    except KeyboardInterrupt:
        status = 130
    sys.exit(status)
