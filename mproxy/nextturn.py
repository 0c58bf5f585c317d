"""
L{NextIteration}: calls one method of every object queued during a reactor
iteration, at the start of the next one, with one C{callLater(0)} for all
of them (none created or cancelled per object).  The HTTP/2 connections'
send loops and the TLS connections' encryption use one each per reactor
(L{next_iteration_for}).

    runs = next_iteration_for(reactor, "_flush_plaintext")
    runs.add(conn)        # conn._flush_plaintext() in the next iteration
    runs.discard(conn)    # not any more
"""

from __future__ import annotations

import weakref
from operator import methodcaller
from typing import Any

__all__ = ["NextIteration", "next_iteration_for"]


class NextIteration:
    """
    The objects queued for the next iteration, each once, in the order
    they were first queued; C{method} is called on each.
    """

    def __init__(self, reactor: Any, method: str) -> None:
        self.reactor = reactor
        self.pending: dict[Any, None] = {}
        self._call: Any = None
        self._run_one = methodcaller(method)

    def add(self, obj: Any) -> None:
        self.pending[obj] = None
        if self._call is None:
            self._call = self.reactor.callLater(0, self.run)

    def discard(self, obj: Any) -> None:
        self.pending.pop(obj, None)

    def run(self) -> None:
        self._call = None
        pending, self.pending = self.pending, {}
        run_one = self._run_one
        for obj in pending:
            run_one(obj)


_queues: weakref.WeakKeyDictionary[Any, dict[str, NextIteration]] = (
    weakref.WeakKeyDictionary())


def next_iteration_for(reactor: Any, method: str) -> NextIteration:
    """
    The reactor's L{NextIteration} for C{method} (one per reactor and
    method, so that one call per iteration serves every object).
    """
    queues = _queues.get(reactor)
    if queues is None:
        queues = _queues[reactor] = {}
    q = queues.get(method)
    if q is None:
        q = queues[method] = NextIteration(reactor, method)
    return q
