"""
Unit tests of L{mproxy.signals}: repeated stop signals are harmless.
"""

from __future__ import annotations

import signal
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from mproxy.logging import ListLogger
from mproxy.signals import StopSignals, install_stop_signals


class FakeReactor:
    """
    The reactor methods the stop-signal handlers use, recording calls.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.triggers: list[tuple[str, str, Any]] = []
        self.from_thread: list[tuple[Any, tuple[Any, ...], dict[str, Any]]] = []

    def sigTerm(self, number: int, frame: Any = None) -> None:
        self.calls.append(("sigTerm", number))

    def sigInt(self, number: int, frame: Any = None) -> None:
        self.calls.append(("sigInt", number))

    def addSystemEventTrigger(self, phase: str, event: str, f: Any) -> None:
        self.triggers.append((phase, event, f))

    def callFromThread(self, f: Any, *args: Any, **kw: Any) -> None:
        self.from_thread.append((f, args, kw))

    def run_thread_calls(self) -> None:
        calls, self.from_thread = self.from_thread, []
        for f, args, kw in calls:
            f(*args, **kw)

    def begin_shutdown(self) -> None:
        for phase, event, f in self.triggers:
            if (phase, event) == ("before", "shutdown"):
                f()


class StopSignalsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = FakeReactor()
        self.logger = ListLogger()
        self.handlers = StopSignals(self.reactor, self.logger)

    def test_first_signal_stops_like_the_reactor(self) -> None:
        self.handlers.handle(signal.SIGTERM)
        self.assertEqual(self.reactor.calls, [("sigTerm", signal.SIGTERM)])
        self.assertTrue(self.handlers.stopping)

    def test_first_sigint_uses_the_reactors_sigint(self) -> None:
        self.handlers.handle(signal.SIGINT)
        self.assertEqual(self.reactor.calls, [("sigInt", signal.SIGINT)])

    def test_second_signal_is_only_logged(self) -> None:
        self.handlers.handle(signal.SIGTERM)
        self.handlers.handle(signal.SIGTERM)
        self.handlers.handle(signal.SIGINT)
        self.assertEqual(self.reactor.calls, [("sigTerm", signal.SIGTERM)])
        self.assertEqual(self.logger.records, [])  # logged from the reactor thread
        self.reactor.run_thread_calls()
        self.assertEqual(
            [(r["level"], r["msg"], r["signal"]) for r in self.logger.records],
            [("INFO", "Already shutting down", "SIGTERM"),
             ("INFO", "Already shutting down", "SIGINT")],
        )

    def test_signal_after_a_shutdown_begun_otherwise(self) -> None:
        """
        A stop signal arriving after the reactor began stopping for another
        reason does not stop it again.
        """
        self.reactor.begin_shutdown()
        self.handlers.handle(signal.SIGTERM)
        self.assertEqual(self.reactor.calls, [])
        self.reactor.run_thread_calls()
        self.assertEqual([r["msg"] for r in self.logger.records], ["Already shutting down"])


class InstallTests(SynchronousTestCase):
    def test_replaces_only_the_reactors_handlers(self) -> None:
        reactor = FakeReactor()
        other = object()
        current = {signal.SIGTERM: reactor.sigTerm, signal.SIGINT: other}
        installed: dict[int, Any] = {}
        handlers = install_stop_signals(
            reactor, ListLogger(), install=installed.__setitem__, current=current.__getitem__
        )
        assert handlers is not None
        self.assertEqual(list(installed), [signal.SIGTERM])
        self.assertEqual(installed[signal.SIGTERM], handlers.handle)

    def test_nothing_to_replace(self) -> None:
        """
        A reactor running without signal handlers keeps none.
        """
        reactor = FakeReactor()
        installed: dict[int, Any] = {}
        result = install_stop_signals(
            reactor, ListLogger(), install=installed.__setitem__,
            current=lambda n: signal.SIG_DFL,
        )
        self.assertIsNone(result)
        self.assertEqual(installed, {})
        self.assertEqual(reactor.triggers, [])
