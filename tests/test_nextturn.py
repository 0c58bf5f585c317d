"""
Tests for L{mproxy.nextturn}.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mproxy.nextturn import next_iteration_for


class Queued:
    def __init__(self, calls: list[str], name: str) -> None:
        self.calls, self.name = calls, name

    def flush(self) -> None:
        self.calls.append(self.name)


class NextIterationTests(SynchronousTestCase):
    def test_one_call_for_every_object(self) -> None:
        """
        Objects queued during an iteration are run once each, in the order
        first queued, by one C{callLater(0)}; a discarded one is not.
        """
        clock = Clock()
        runs = next_iteration_for(clock, "flush")
        calls: list[str] = []
        a, b, c = Queued(calls, "a"), Queued(calls, "b"), Queued(calls, "c")
        for obj in (a, b, a, c):
            runs.add(obj)
        runs.discard(b)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        self.assertEqual(calls, [])
        clock.advance(0)
        self.assertEqual(calls, ["a", "c"])
        runs.add(b)
        clock.advance(0)
        self.assertEqual(calls, ["a", "c", "b"])

    def test_one_queue_per_reactor_and_method(self) -> None:
        clock, other = Clock(), Clock()
        self.assertIs(next_iteration_for(clock, "flush"), next_iteration_for(clock, "flush"))
        self.assertIsNot(next_iteration_for(clock, "flush"), next_iteration_for(clock, "run"))
        self.assertIsNot(next_iteration_for(clock, "flush"), next_iteration_for(other, "flush"))
