"""
The C{mproxy} console script: which command runs (help, version, C{run},
or one of the client commands of L{mproxy.cli.remote}) and its exit status.

Every expected failure prints C{Error: <message>} on stderr and exits 1; no
traceback reaches the user for a bad flag, an unreachable server or a failed
deploy.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Sequence

import mproxy
from mproxy.cli import parsing
from mproxy.cli.parsing import UsageError
from mproxy.cli.remote import run_client
from mproxy.cli.requests import deploy_request
from mproxy.cli.streams import Streams, fail
from mproxy.errors import MproxyError

COMMANDS: dict[str, Callable[[], parsing.Command]] = {
    "run": parsing.run_command,
    "deploy": parsing.deploy_command,
    "remove": lambda: parsing.simple_command("remove", "Remove a service"),
    "list": parsing.list_command,
    "pause": parsing.pause_command,
    "resume": lambda: parsing.simple_command("resume", "Resume a paused or stopped service"),
    "stop": parsing.stop_command,
    "rollout deploy": parsing.rollout_deploy_command,
    "rollout set": parsing.rollout_set_command,
    "rollout stop": parsing.rollout_stop_command,
    "upgrade": parsing.upgrade_command,
}

#: Commands run by mproxy itself, not shown in the help.
HIDDEN = {
    "upgrade-check": parsing.run_command,
}
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
    if name == "deploy":
        try:
            deploy_request(ns)
        except MproxyError as e:
            return fail(streams, str(e))
    return run_client(name, ns, streams, reactor)


def run() -> None:
    """
    Console-script entry point.
    """
    try:
        status = main(sys.argv[1:])
    except KeyboardInterrupt:
        status = 130
    sys.exit(status)
