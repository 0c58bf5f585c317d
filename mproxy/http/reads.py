"""
Read sizes for busy connections.

Twisted reads at most C{bufferSize} (64 KiB) bytes per C{recv}, and each
read costs a trip through the protocol's Python code (parser, relay,
write).  A connection whose reads fill that buffer (a large body arriving
faster than we handle it) is given a larger one, doubling up to
L{MAX_READ}; connections that read little never allocate more.

    if len(data) >= READ_GROW_AT:
        grow_reads(self.transport, len(data))
"""

from __future__ import annotations

from typing import Any

#: the largest read a busy connection grows to
MAX_READ = 262144
#: reads this large may have filled the buffer (Twisted's default size)
READ_GROW_AT = 65536


def grow_reads(transport: Any, n: int) -> None:
    """
    A read of C{n} bytes filled C{transport}'s read buffer: read twice as
    much at a time from now on (up to L{MAX_READ}).  Transports without a
    C{bufferSize} (TLS, in-memory) are left alone.
    """
    size = getattr(transport, "bufferSize", None)
    if size is not None and n >= size and size < MAX_READ:
        transport.bufferSize = min(size * 2, MAX_READ)
