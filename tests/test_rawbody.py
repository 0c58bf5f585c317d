"""
Tests for L{mproxy.http.rawbody}: where a read is split after its head,
and the countdown of a Content-Length body that bypasses the parser.
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from mproxy.http.rawbody import VIEW_MIN, RawBody, head_end

HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: 99999\r\nServer: x\r\n\r\n"
BODY = bytes(range(256)) * 80  # 20,480 bytes: over VIEW_MIN


class HeadEndTests(SynchronousTestCase):
    def test_head_then_body(self) -> None:
        """
        A head with Content-Length followed by at least VIEW_MIN bytes:
        the offset right after the head.
        """
        self.assertEqual(head_end(HEAD + BODY), len(HEAD))
        self.assertEqual(head_end(HEAD + BODY[:VIEW_MIN]), len(HEAD))
        req = b"POST /x HTTP/1.1\r\nHost: a\r\ncOnTeNt-LeNgTh: 5\r\n\r\n"
        self.assertEqual(head_end(req + BODY), len(req))

    def test_not_split(self) -> None:
        """
        0 (the read goes to the parser whole) when too little follows the
        head, when the head has no Content-Length, or no head end is found.
        """
        self.assertEqual(head_end(HEAD + BODY[:VIEW_MIN - 1]), 0)
        self.assertEqual(head_end(HEAD + b"x" * 100), 0)
        chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        self.assertEqual(head_end(chunked + BODY), 0)
        self.assertEqual(head_end(BODY + BODY), 0)
        # a Content-Length line in the body, not in the head
        self.assertEqual(head_end(chunked + b"\ncontent-length:" + BODY), 0)


class Sink:
    def __init__(self) -> None:
        self.pieces: list[Any] = []
        self.ended = 0
        self.errors: list[Exception] = []
        self.fail_on: bytes | None = None
        self.raw = RawBody(self.deliver, self.end, self.errors.append)

    def deliver(self, piece: Any) -> None:
        if self.fail_on is not None and piece == self.fail_on:
            raise ValueError("boom")
        self.pieces.append(piece)

    def end(self) -> None:
        self.ended += 1


class RawBodyTests(SynchronousTestCase):
    def test_pieces_as_they_are(self) -> None:
        """
        Each piece is passed on as the same object; the body ends at its
        length, and what follows it is given back.
        """
        s = Sink()
        s.raw.start(10)
        a, b = bytes(bytearray(b"abcd")), bytes(bytearray(b"efgh"))
        self.assertEqual(s.raw.take(a), b"")
        self.assertEqual(s.raw.take(b), b"")
        self.assertEqual((s.raw.left, s.ended), (2, 0))
        self.assertEqual(s.raw.take(b"ijNEXT"), b"NEXT")
        self.assertIs(s.pieces[0], a)
        self.assertIs(s.pieces[1], b)
        self.assertEqual(s.pieces[2], b"ij")
        self.assertEqual((s.raw.left, s.ended), (0, 1))

    def test_exact_end(self) -> None:
        s = Sink()
        s.raw.start(4)
        self.assertEqual(s.raw.take(b"abcd"), b"")
        self.assertEqual((s.pieces, s.ended), ([b"abcd"], 1))

    def test_views_kept(self) -> None:
        """
        A memoryview piece of at least VIEW_MIN bytes reaches a consumer
        that takes views as it is (not copied); what follows the body is
        bytes.
        """
        data = HEAD + BODY + b"NEXT"
        s = Sink()
        s.raw.start(len(BODY), views=True)
        rest = s.raw.take(memoryview(data)[len(HEAD):])
        self.assertEqual(rest, b"NEXT")
        self.assertIs(type(rest), bytes)
        (piece,) = s.pieces
        self.assertIs(type(piece), memoryview)
        self.assertIs(piece.obj, data)
        self.assertEqual(piece, BODY)

    def test_views_copied(self) -> None:
        """
        Consumers that do not take views, and small view pieces, get bytes.
        """
        data = HEAD + BODY
        s = Sink()
        s.raw.start(len(BODY) + 10)
        s.raw.take(memoryview(data)[len(HEAD):])
        self.assertIs(type(s.pieces[0]), bytes)
        self.assertEqual(s.pieces[0], BODY)
        s2 = Sink()
        s2.raw.start(VIEW_MIN - 1, views=True)
        s2.raw.take(memoryview(data)[len(HEAD):])
        self.assertIs(type(s2.pieces[0]), bytes)
        self.assertEqual(s2.pieces[0], BODY[:VIEW_MIN - 1])

    def test_failure(self) -> None:
        """
        A piece that fails ends the body: the failure is reported, nothing
        is given back, and the next body can start.
        """
        s = Sink()
        s.fail_on = b"boom"
        s.raw.start(10)
        self.assertEqual(s.raw.take(b"boom"), b"")
        self.assertEqual(s.raw.left, 0)
        self.assertEqual([str(e) for e in s.errors], ["boom"])
        self.assertEqual(s.ended, 0)
        s.fail_on = None
        s.raw.start(2)
        self.assertEqual(s.raw.take(b"okMORE"), b"MORE")
        self.assertEqual(s.ended, 1)

    def test_failing_end(self) -> None:
        """
        An end that raises is reported like a failing piece.
        """
        errors: list[Exception] = []

        def end() -> None:
            raise RuntimeError("end")

        raw = RawBody(lambda piece: None, end, errors.append)
        raw.start(2)
        self.assertEqual(raw.take(b"abXY"), b"")
        self.assertEqual([str(e) for e in errors], ["end"])
