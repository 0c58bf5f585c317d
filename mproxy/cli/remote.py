"""
The commands that talk to a running server (C{deploy}, C{list}, C{remove},
C{pause}, C{stop}, C{resume}, C{rollout ...}, C{upgrade}): one function per command over
a L{ControlClient}, and L{run_client}, which runs one on a reactor and turns
its outcome into an exit status.

A command the server refuses because an upgrade is about to re-execute it
(L{UpgradeInProgress}: nothing was done) is held: the client says it waits,
reconnects and sends it again until the new server answers it (for up to
L{HOLD_TIMEOUT} seconds).

Ctrl-C (SIGINT) ends a command with C{interrupted} and exit status 130; the
connection closes with the process, and the server then cancels a deploy
that has not switched traffic yet.
"""

from __future__ import annotations

import json
import signal
from typing import Any, Callable

from twisted.internet.defer import inlineCallbacks
from twisted.internet.error import ConnectionClosed
from twisted.protocols import amp

from mproxy.cli.output import ProgressPrinter, can_colour, deploy_summary, format_table
from mproxy.cli.requests import deploy_request
from mproxy.cli.streams import Streams, fail
from mproxy.config import socket_path
from mproxy.control import commands as c
from mproxy.control.client import ControlClient, connect
from mproxy.controlsocket import UntrustedSocket
from mproxy.errors import InvalidOptions, MproxyError
from mproxy.spec import given
from mproxy.upgrade import OPERATIONS_TIMEOUT, UpgradeInProgress

INTERRUPTED = 130


@inlineCallbacks
def _deploy(client: ControlClient, ns: Any, out: ProgressPrinter, clock: Any) -> Any:
    req = deploy_request(ns)
    started = clock.seconds()
    answer = yield client.deploy(req)
    out.summary(deploy_summary(req.service, answer, clock.seconds() - started))


@inlineCallbacks
def _rollout_deploy(client: ControlClient, ns: Any, out: ProgressPrinter, clock: Any) -> Any:
    if not ns.target:
        raise InvalidOptions('required flag(s) "target" not set')
    started = clock.seconds()
    answer = yield client.call(
        c.RolloutDeploy, service=ns.service, targets=ns.target,
        **given(readers=ns.read_target, deploy_timeout=ns.deploy_timeout,
                 drain_timeout=ns.drain_timeout),
    )
    out.summary(deploy_summary(ns.service, answer, clock.seconds() - started, rollout=True))


@inlineCallbacks
def _list(client: ControlClient, ns: Any, out: ProgressPrinter, clock: Any) -> Any:
    rows = yield client.list_services()
    if ns.json:
        out.out.write(json.dumps(rows, indent=2) + "\n")
    else:
        out.out.write(format_table(rows, can_colour(out.out)))


def _pause(client: ControlClient, ns: Any, out: ProgressPrinter, clock: Any) -> Any:
    return client.call(c.Pause, service=ns.service,
                       **given(drain_timeout=ns.drain_timeout, max_pause=ns.max_pause))


def _stop(client: ControlClient, ns: Any, out: ProgressPrinter, clock: Any) -> Any:
    return client.call(c.Stop, service=ns.service,
                       **given(drain_timeout=ns.drain_timeout, message=ns.message))


def _rollout_set(client: ControlClient, ns: Any, out: ProgressPrinter, clock: Any) -> Any:
    if ns.percent is None and ns.list is None:
        raise InvalidOptions("at least one of the flags in the group [percent list] is required")
    return client.call(c.RolloutSet, service=ns.service, percentage=ns.percent or 0,
                       allowlist=ns.list or [])


def _by_service(command: type[amp.Command]) -> Callable[..., Any]:
    def run(client: ControlClient, ns: Any, out: ProgressPrinter, clock: Any) -> Any:
        return client.call(command, service=ns.service)

    return run


#: Seconds the upgrade waits for the new server to answer.
UPGRADE_RECONNECT = 60.0


@inlineCallbacks
def _upgrade(client: ControlClient, ns: Any, out: ProgressPrinter, clock: Any) -> Any:
    """
    Ask for the upgrade; the server answers only if it cannot be done.
    Otherwise the exec closes the connection: reconnect (the socket is the
    same) and ask the new server how the upgrade went.
    """
    import uuid

    id = uuid.uuid4().hex
    try:
        yield client.call(c.Upgrade, id=id, **given(drain_timeout=ns.drain_timeout))
    except (ConnectionClosed, ConnectionError):
        pass
    else:
        raise MproxyError("the server did not restart for the upgrade")
    out("wait", "Waiting for the new server")
    new = yield reconnect(clock, client.path, out, UPGRADE_RECONNECT)
    try:
        answer = yield new.call(c.UpgradeStatus, id=id)
    finally:
        new.close()
    out.summary(f"Upgraded to mproxy {answer['server']} (pid {answer['pid']})")


@inlineCallbacks
def reconnect(
    clock: Any, path: str, on_progress: Callable[[str, str], None], within: float
) -> Any:
    """
    Connect to the server at C{path}, retrying until it answers or
    C{within} seconds have passed.
    """
    from twisted.internet.task import deferLater

    deadline = clock.seconds() + within
    while True:
        try:
            return (yield connect(clock, path, on_progress))
        except (MproxyError, ConnectionClosed, ConnectionError) as e:
            if isinstance(e, UntrustedSocket) or clock.seconds() >= deadline:
                raise MproxyError(
                    f"the server did not come back within {within:g}s after the upgrade: {e}"
                )
        yield deferLater(clock, 0.2, lambda: None)


COMMANDS: dict[str, Callable[[ControlClient, Any, ProgressPrinter, Any], Any]] = {
    "deploy": _deploy,
    "list": _list,
    "remove": _by_service(c.Remove),
    "pause": _pause,
    "stop": _stop,
    "resume": _by_service(c.Resume),
    "rollout deploy": _rollout_deploy,
    "rollout set": _rollout_set,
    "rollout stop": _by_service(c.RolloutStop),
    "upgrade": _upgrade,
}


#: Seconds a command refused during an upgrade is sent again for: the
#: upgrade may wait for the commands in progress, then the new server starts.
HOLD_TIMEOUT = OPERATIONS_TIMEOUT + UPGRADE_RECONNECT

#: Seconds between two tries of a held command.
HOLD_INTERVAL = 0.5


@inlineCallbacks
def client_command(reactor: Any, name: str, ns: Any, streams: Streams) -> Any:
    from twisted.internet.task import deferLater

    printer = ProgressPrinter(streams.out)
    path = socket_path(ns.socket or "")
    client = yield connect(reactor, path, printer)
    deadline = None
    try:
        while True:
            try:
                yield COMMANDS[name](client, ns, printer, reactor)
                return
            except UpgradeInProgress as e:
                now = reactor.seconds()
                if deadline is None:
                    deadline = now + HOLD_TIMEOUT
                    printer("held", "Waiting for the upgrade in progress to finish")
                elif now >= deadline:
                    raise MproxyError(f"{e} (still upgrading after {HOLD_TIMEOUT:g}s)")
            client.close()
            yield deferLater(reactor, HOLD_INTERVAL, lambda: None)
            client = yield reconnect(reactor, path, printer, max(0.0, deadline - reactor.seconds()))
    finally:
        printer.finish()
        client.close()


def _error_message(f: Any) -> str:
    if f.check(MproxyError):
        return str(f.value)
    if f.check(amp.RemoteAmpError):
        return str(f.value.description or f.value)
    if f.check(ConnectionClosed, ConnectionError, amp.ProtocolSwitched):
        return "connection to mproxy lost: the server closed it (stopped or crashed?)"
    return f"{f.type.__name__}: {f.getErrorMessage()}"


def _on_interrupt(reactor: Any, interrupted: Callable[[], None]) -> None:
    def handler(signum: int, frame: Any) -> None:
        reactor.callFromThread(interrupted)

    signal.signal(signal.SIGINT, handler)


def run_client(name: str, ns: Any, streams: Streams, reactor: Any = None) -> int:
    """
    Run client command C{name} to its end; returns the exit status.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
        _on_interrupt(reactor, lambda: finished(INTERRUPTED))
    result: dict[str, int] = {}

    def finished(status: int) -> None:
        if "status" in result:
            return
        result["status"] = status
        if status == INTERRUPTED:
            streams.err.write("interrupted" + (
                " (the server cancels the deploy unless traffic had switched)"
                if name in ("deploy", "rollout deploy") else "") + "\n")
            streams.err.flush()
        if reactor.running:
            reactor.stop()

    def failed(f: Any) -> None:
        finished(fail(streams, _error_message(f)))

    def start() -> None:
        d = client_command(reactor, name, ns, streams)
        d.addCallbacks(lambda _: finished(0), failed)

    reactor.callWhenRunning(start)
    from mproxy import collector

    collector.resume()
    reactor.run(installSignalHandlers=False)
    return result.get("status", INTERRUPTED)
