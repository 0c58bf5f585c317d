"""Deterministic generated body stream shared by bench/bodies.py and
bench/body_upstream.py (nothing is read from or written to disk).

Chunk i (1 MiB) is an 8-byte big-endian counter followed by a fixed
pseudo-random block, so reordered, duplicated or dropped chunks change the
sha256 even though generation is cheap."""

from __future__ import annotations

import hashlib
import random
from typing import Iterator

CHUNK = 1 << 20
_BASE: dict[int, bytes] = {}


def _base(seed: int) -> bytes:
    if seed not in _BASE:
        _BASE[seed] = random.Random(seed).randbytes(CHUNK)
    return _BASE[seed]


def chunks(n: int, seed: int = 0) -> Iterator[bytes]:
    """Yield n bytes in chunks of (at most) 1 MiB."""
    tail = _base(seed)[8:]
    i = sent = 0
    while sent < n:
        c = i.to_bytes(8, "big") + tail
        take = min(CHUNK, n - sent)
        if take < CHUNK:
            c = c[:take]
        yield c
        sent += take
        i += 1


def expected_sha256(n: int, seed: int = 0) -> str:
    h = hashlib.sha256()
    for c in chunks(n, seed):
        h.update(c)
    return h.hexdigest()
