"""
L{WorkerSettings}, what a worker process is told on its command line, and
L{child_descriptors}, where its inherited descriptors go.  A module of its
own, light to import: C{mproxy run} starts its first workers before it
imports the rest of itself (L{mproxy.workers.prestart}).
"""

from __future__ import annotations

import json

from attrs import frozen


@frozen
class WorkerSettings:
    """
    What a worker is told on its command line: its slot, the ports (for
    redirects and Alt-Svc), the HTTP timeouts, whether metrics and HTTP/3
    are on, and its inherited descriptors: the channel, the listening TCP
    sockets by kind (C{[(fd, family, owner), ...]}: C{owner} the slot whose
    own socket it is, C{-1} (or left out) for one shared by every worker),
    the UDP socket for HTTP/3.  C{log} is C{"fd"} (write JSON lines to
    descriptor 1) or C{"channel"}.  C{acceptors}: how many workers accept
    on a shared socket (C{0}: not known), which sets how many queued
    connections a wake-up takes there.
    """

    slot: int
    channel: int
    http_port: int
    https_port: int
    header_timeout: float
    idle_timeout: float
    sockets: dict[str, list[tuple[int, ...]]]
    udp: list[tuple[int, int]] = []
    metrics: bool = False
    debug: bool = False
    log: str = "fd"
    grace: float = 10.0
    acceptors: int = 0

    def to_json(self) -> str:
        return json.dumps({
            "slot": self.slot, "channel": self.channel, "http_port": self.http_port,
            "https_port": self.https_port, "header_timeout": self.header_timeout,
            "idle_timeout": self.idle_timeout,
            "sockets": {k: [list(s) for s in v] for k, v in self.sockets.items()},
            "udp": [list(s) for s in self.udp], "metrics": self.metrics,
            "debug": self.debug, "log": self.log, "grace": self.grace,
            "acceptors": self.acceptors,
        })

    @classmethod
    def from_json(cls, text: str) -> WorkerSettings:
        d = json.loads(text)
        d["sockets"] = {k: [tuple(s) for s in v] for k, v in d["sockets"].items()}
        d["udp"] = [tuple(s) for s in d["udp"]]
        return cls(**d)


def child_descriptors(
    channel: int, devnull: int, log_to_fd: bool, listening: dict[str, list[tuple[int, ...]]],
    udp: list[tuple[int, int]],
) -> tuple[dict[int, int], int, dict[str, list[tuple[int, ...]]], list[tuple[int, int]]]:
    """
    Where a worker's descriptors go: C{{child's fd: ours}} (stdin from
    C{devnull}, stdout ours or C{devnull}, stderr ours, the channel, the
    listening sockets), then the child's numbers of its channel, of its TCP
    sockets by kind (C{[(fd, family, ...), ...]}: the rest of each entry as
    given) and of its UDP sockets.
    """
    sources = [channel, devnull] + [s[0] for entries in listening.values() for s in entries] + [
        fd for fd, _ in udp]
    # the child's numbers are above every one of ours: no mapping
    # overwrites a descriptor another one is still to be copied from
    n = max(3, *sources) + 1
    channel_fd = n
    fds = {0: devnull, 1: 1 if log_to_fd else devnull, 2: 2, channel_fd: channel}
    n += 1
    sockets: dict[str, list[tuple[int, ...]]] = {}
    for kind, entries in listening.items():
        for fd, *rest in entries:
            fds[n] = fd
            sockets.setdefault(kind, []).append((n, *rest))
            n += 1
    child_udp = []
    for fd, family in udp:
        fds[n] = fd
        child_udp.append((n, family))
        n += 1
    return fds, channel_fd, sockets, child_udp
