# -*- test-case-name: tests.test_rawbody -*-
"""
Content-Length bodies that bypass httptools.

httptools copies every body piece it hands to C{on_body}.  Once a
message's head is parsed and its body is framed by a Content-Length, the
rest of that body needs no parsing: the readers of requests
(L{mproxy.http.parsing}) and of responses (L{mproxy.http.upstream}) count
it down with a L{RawBody}, which passes its pieces on as they arrived and
gives back what follows the body, for the parser.

    raw = RawBody(deliver, ended, failed)
    raw.start(left, views=False)    # the head is parsed; left: body bytes to come
    rest = raw.take(data)           # while raw.left: b"" or the bytes after the body

A large read that holds a head and the start of its body is split where
the head ends (L{head_end}): the parser gets the head alone (a memoryview
of the read, not copied) and the body's part of the read goes to
L{RawBody.take} as a memoryview too.  A piece is handed on as such a
memoryview only to a consumer that takes them (C{views}) and only when it
has at least L{VIEW_MIN} bytes; else it is copied into C{bytes}.  What
follows a body is always C{bytes}.
"""

from __future__ import annotations

import re
from typing import Callable

#: the smallest memoryview piece handed on (a piece this large goes
#: straight to the socket, see L{mproxy.http.batch.SEND_NOW})
VIEW_MIN = 16384

# a Content-Length header line (in a head: after a line end)
_LENGTH_LINE = re.compile(rb"\ncontent-length:", re.IGNORECASE)


def head_end(data: bytes) -> int:
    """
    Where the head at the start of C{data} ends, when C{data} is that head
    (with C{Content-Length}) followed by at least L{VIEW_MIN} bytes; else
    0: C{data} goes to the parser as it is.

    Any offset is a correct place to split a read (the parser is
    incremental); this one gives the parser the head alone.
    """
    n = len(data)
    if n < VIEW_MIN + 16:
        return 0
    end = data.find(b"\r\n\r\n", 0, n - VIEW_MIN)
    if end < 0 or _LENGTH_LINE.search(data, 0, end) is None:
        return 0
    return end + 4


class RawBody:
    """
    The rest of one Content-Length body at a time: see the module
    docstring.  C{deliver(piece)} gets each piece, C{ended()} is called
    after the last one, C{failed(exception)} instead of the rest when one
    of them raised (the body is then abandoned).

    @ivar left: body bytes still to come (0: no body is being read).
    """

    __slots__ = ("left", "views", "_deliver", "_ended", "_failed")

    def __init__(self, deliver: Callable[[bytes], None], ended: Callable[[], None],
                 failed: Callable[[Exception], None]) -> None:
        self.left = 0
        self.views = False
        self._deliver = deliver
        self._ended = ended
        self._failed = failed

    def start(self, left: int, views: bool = False) -> None:
        """
        A body with C{left} bytes still to come bypasses the parser from
        now on; C{views}: its consumer takes memoryview pieces.
        """
        self.left = left
        self.views = views

    def take(self, data: bytes | memoryview) -> bytes:
        """
        Pass on the body's part of C{data}; the bytes after the body's end
        (b"" for none, and when a piece failed).
        """
        left = self.left
        n = len(data)
        rest = b""
        if n < left:
            self.left = left - n
        else:
            self.left = 0
            if n > left:
                rest = bytes(data[left:])
                data = data[:left]
        if type(data) is memoryview and (not self.views or len(data) < VIEW_MIN):
            data = bytes(data)
        try:
            self._deliver(data)  # type: ignore[arg-type]
            if not self.left:
                self._ended()
        except Exception as e:
            self.left = 0
            self._failed(e)
            return b""
        return rest


__all__ = ["RawBody", "head_end", "VIEW_MIN"]
