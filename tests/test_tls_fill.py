"""
L{mproxy.tls.fill}: a C{bytes} object written in place and shrunk.
"""

from __future__ import annotations

import gc
import sys
import tracemalloc

from twisted.trial.unittest import SynchronousTestCase

from mproxy.tls import fill

if not fill.available():
    skip = "bytes cannot be filled in place on this Python"


class FillingTests(SynchronousTestCase):
    def test_takeShrinks(self) -> None:
        """
        What was written through the view, shrunk to the length given, is
        an ordinary C{bytes} referenced only by its holder.
        """
        for size, n in ((400, 5), (262144, 100000), (20000, 16384)):
            f = fill.Filling(size)
            piece = bytes(range(256)) * (n // 256) + bytes(n % 256)
            f.view[:n] = piece
            got = f.take(n)
            self.assertIs(type(got), bytes)
            self.assertEqual(got, piece)
            self.assertEqual(len(got), n)
            self.assertEqual(sys.getrefcount(got), 2)
            self.assertEqual({got: 1}[piece], 1)  # hashes as the same bytes

    def test_takeWhole(self) -> None:
        f = fill.Filling(1000)
        f.view[:] = b"a" * 1000
        got = f.take(1000)
        self.assertEqual(got, b"a" * 1000)
        self.assertEqual(sys.getrefcount(got), 2)

    def test_takeNothing(self) -> None:
        f = fill.Filling(65536)
        self.assertEqual(f.take(0), b"")

    def test_viewReleasedOnTake(self) -> None:
        """
        Once taken, the object cannot be written any more.
        """
        f = fill.Filling(100)
        view = f.view
        f.take(10)
        self.assertRaises(ValueError, view.__setitem__, 0, 1)

    def test_notTakenIsFreed(self) -> None:
        """
        A filling dropped without take (an exception on the way) frees its
        object; taken ones are freed with the last reference to them.
        """
        def churn() -> None:
            for _ in range(200):
                fill.Filling(262144)
                f = fill.Filling(300)
                f.view[:3] = b"abc"
                f.take(3)

        churn()
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            churn()
            gc.collect()
            after = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        self.assertLess(after - before, 65536)
