"""
Read sizes for busy connections.

Twisted reads at most C{bufferSize} (64 KiB) bytes per C{recv}, and each
read costs a trip through the protocol's Python code (parser, relay,
write).  A connection whose reads fill that buffer (a large body arriving
faster than we handle it) is given a larger one, doubling up to
L{MAX_READ}; connections that read little never allocate more.

    if len(data) >= READ_GROW_AT:
        grow_reads(self.transport, len(data))

A body whose length is known can have its last read fitted to it
(L{body_read_size}): a response head shifts the end of a body past a
multiple of the read size, and its last few bytes (as many as the head
took from the first read) would otherwise come in a read of their own, and
go on in a send (and a TLS record) of their own.

After a body whose rest was spliced, the connection's next response is
read with a first read of L{HEAD_READ} bytes: a larger one would copy a
large body's start instead of leaving it to the splice.
"""

from __future__ import annotations

from typing import Any

#: the largest read a busy connection grows to
MAX_READ = 262144
#: reads this large may have filled the buffer (Twisted's default size)
READ_GROW_AT = 65536
#: the rest of a body at most this many bytes larger than a read is read
#: in one read (more than most response heads)
READ_TAIL = 8192
#: the first read of a response on a connection whose last body was spliced
#: (L{mproxy.http.splice}): a 64 KiB body fits in it with its head; of a
#: larger one only what this read took is copied, the rest is spliced
HEAD_READ = READ_GROW_AT + READ_TAIL


def grow_reads(transport: Any, n: int) -> None:
    """
    A read of C{n} bytes filled C{transport}'s read buffer: read twice as
    much at a time from now on (up to L{MAX_READ}).  Transports without a
    C{bufferSize} (TLS, in-memory) are left alone.
    """
    size = getattr(transport, "bufferSize", None)
    if size is not None:
        grown = grown_size(size, n)
        if grown != size:
            transport.bufferSize = grown


def grown_size(size: int, n: int) -> int:
    """
    The read size after a read of C{n} bytes on a connection that reads
    C{size} bytes at a time: twice as much when the read filled it (up to
    L{MAX_READ}), else the same.
    """
    if n >= size and size < MAX_READ:
        return min(size * 2, MAX_READ)
    return size


def body_read_size(size: int, left: int) -> int:
    """
    The next read's size on a connection that reads C{size} bytes at a
    time and has C{left} bytes of a body still to come: all of them when
    they are at most L{READ_TAIL} bytes more than C{size}, else C{size}.
    """
    if size < left <= size + READ_TAIL:
        return left
    return size
