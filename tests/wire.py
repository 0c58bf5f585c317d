"""
Reading HTTP/1.1 responses off blocking sockets, for the integration tests
whose clients run in threads.
"""

from __future__ import annotations

import re
import socket


def read_response(s: socket.socket, rest: bytes = b"") -> tuple[bytes, bytes, bytes]:
    """
    Head, Content-Length body and what followed them, from a blocking
    socket (C{rest}: bytes already read).
    """
    buf = rest
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {buf[:200]!r}")
        buf += chunk
    head, buf = buf.split(b"\r\n\r\n", 1)
    m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    n = int(m.group(1)) if m else 0
    chunks = [buf]
    got = len(buf)
    while got < n:
        chunk = s.recv(1 << 20)
        if not chunk:
            raise ConnectionError(f"closed in body after {got} of {n} bytes")
        chunks.append(chunk)
        got += len(chunk)
    data = b"".join(chunks)
    return head, data[:n], data[n:]


def read_one_response(s: socket.socket) -> tuple[bytes, bytes]:
    """
    Head and Content-Length body of the one response C{s} is to get.
    """
    head, body, rest = read_response(s)
    return head, body + rest
