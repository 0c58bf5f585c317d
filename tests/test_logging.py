"""
Tests for L{mproxy.logging}: the JSON line format and its time stamps.
"""

from __future__ import annotations

import datetime
import io
import json
import re
from types import SimpleNamespace
from typing import Any
from unittest import mock

from twisted.trial.unittest import SynchronousTestCase

from mproxy import logging as mlogging
from mproxy.logging import JSONLogger


class TimeStampTests(SynchronousTestCase):
    def at(self, ns: int) -> str:
        with mock.patch.object(mlogging.time, "time_ns", return_value=ns):
            return mlogging._now_rfc3339()

    def expected(self, ns: int) -> str:
        whole = datetime.datetime.fromtimestamp(ns // 10**9, datetime.timezone.utc)
        exact = whole.replace(microsecond=ns % 10**9 // 1000)
        return exact.astimezone().isoformat()

    def test_matches_isoformat(self) -> None:
        """
        The stamp is the local time as C{isoformat} writes it, microseconds
        truncated, also for a second already formatted and a new one.
        """
        for ns in (1_764_592_000_123_456_789, 1_764_592_000_999_999_999,
                   1_764_592_001_000_001_000, 1_764_592_001_000_000_999,
                   1_700_000_000_500_000_000):
            self.assertEqual(self.at(ns), self.expected(ns))

    def test_whole_second(self) -> None:
        """
        No fraction when the microseconds are zero.
        """
        stamp = self.at(1_764_592_005_000_000_123)
        self.assertRegex(stamp, r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d$")
        self.assertEqual(stamp, self.expected(1_764_592_005_000_000_123))

    def test_now(self) -> None:
        """
        Without a patched clock the stamp is close to now.
        """
        stamp = datetime.datetime.fromisoformat(mlogging._now_rfc3339())
        now = datetime.datetime.now(datetime.timezone.utc)
        self.assertLess(abs((now - stamp).total_seconds()), 5)


class LineTests(SynchronousTestCase):
    def test_line(self) -> None:
        """
        One JSON object per line: time, level, msg, then the attributes in
        order; non-ASCII text stays as it is and other objects are written
        as their C{str}.
        """
        out = io.StringIO()
        logger = JSONLogger(out, now=lambda: "T")

        class Thing:
            def __str__(self) -> str:
                return "thing"

        logger.info("Request", host="é.example", n=3, d=1.5, none=None, thing=Thing(),
                    nested={"a": [1, True]})
        line = out.getvalue()
        self.assertTrue(line.endswith("}\n"))
        self.assertEqual(line.count("\n"), 1)
        self.assertEqual(
            line,
            '{"time": "T", "level": "INFO", "msg": "Request", "host": "é.example", "n": 3, '
            '"d": 1.5, "none": null, "thing": "thing", "nested": {"a": [1, true]}}\n')
        self.assertEqual(json.loads(line)["host"], "é.example")

    def test_control_characters_escaped(self) -> None:
        """
        A newline or quote in a value cannot break the line.
        """
        out = io.StringIO()
        JSONLogger(out, now=lambda: "T").warn("x", path='a\n"b\x00')
        self.assertEqual(out.getvalue().count("\n"), 1)
        self.assertEqual(json.loads(out.getvalue())["path"], 'a\n"b\x00')

    def test_level(self) -> None:
        """
        Records below the logger's level are not written.
        """
        out = io.StringIO()
        logger = JSONLogger(out, level="WARN", now=lambda: "T")
        logger.info("quiet")
        logger.error("loud")
        self.assertEqual([json.loads(x)["msg"] for x in out.getvalue().splitlines()], ["loud"])
        self.assertTrue(re.match(r"\{", out.getvalue()))


class SurrogateTests(SynchronousTestCase):
    """
    A path with an undecodable %-escape (C{/%ff}) is a string with a lone
    surrogate: its line is still written, as UTF-8, with the same value.
    """

    def strict_stream(self) -> tuple[io.BytesIO, io.TextIOWrapper]:
        raw = io.BytesIO()
        return raw, io.TextIOWrapper(raw, encoding="utf-8", errors="strict",
                                     write_through=True)

    def test_log(self) -> None:
        raw, stream = self.strict_stream()
        JSONLogger(stream, now=lambda: "T").info("Request", path="/x\udcff", host="é")
        line = raw.getvalue().decode("utf-8")
        self.assertEqual(line.count("\n"), 1)
        self.assertIn('"path": "/x\\udcff"', line)
        self.assertEqual(json.loads(line)["path"], "/x\udcff")
        self.assertEqual(json.loads(line)["host"], "é")

    def test_log_encoded(self) -> None:
        raw, stream = self.strict_stream()
        JSONLogger(stream, now=lambda: "T").log_encoded(
            "INFO", "Request", ', "path": %s' % mlogging.encode_string("/\udcff\udc80"))
        self.assertEqual(json.loads(raw.getvalue().decode("utf-8"))["path"], "/\udcff\udc80")

    def test_worker_descriptor_stream(self) -> None:
        """
        The same through a worker's descriptor stream (bytes to a pipe).
        """
        import os

        from mproxy.workers.worker import FDLines

        r, w = os.pipe()
        os.set_blocking(r, False)  # no line written: an error, not a hang
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        JSONLogger(FDLines(w), now=lambda: "T").warn("x", path="/%\udcff")
        self.assertEqual(json.loads(os.read(r, 65536).decode("utf-8"))["path"], "/%\udcff")

    def test_other_lines_untouched(self) -> None:
        self.assertEqual(mlogging.escape_surrogates('{"a": "é\\udcff"}'), '{"a": "é\\udcff"}')


class EncodedLineTests(SynchronousTestCase):
    def test_same_line_as_log(self) -> None:
        """
        C{log_encoded} with attributes encoded as C{log} would writes the
        line C{log} writes (time, level and msg escaped the same way).
        """
        now = lambda: 'T "1"\n'  # noqa: E731
        a, b = io.StringIO(), io.StringIO()
        JSONLogger(a, now=now).log_encoded("WARN", 'm"sg', ', "k": "v\\"", "n": 3')
        JSONLogger(b, now=now).warn('m"sg', k='v"', n=3)
        self.assertEqual(a.getvalue(), b.getvalue())

    def test_level(self) -> None:
        """
        Below the logger's level nothing is written.
        """
        out = io.StringIO()
        JSONLogger(out, level="ERROR").log_encoded("INFO", "x", ', "k": 1')
        self.assertEqual(out.getvalue(), "")

    def test_later_same_line_made_when_written(self) -> None:
        """
        C{log_encoded_later} on a stream that makes lines later: the
        attributes are encoded when the stream writes, the line is the one
        C{log_encoded} writes, with the time of the call.
        """
        times = iter(["T1", "T2"])

        class Later:
            def __init__(self) -> None:
                self.makers: list[Any] = []

            def write_later(self, make: Any) -> None:
                self.makers.append(make)

        stream = Later()
        calls: list[str] = []

        def fields() -> str:
            calls.append("fields")
            return ', "k": "v\\"", "n": 3'

        JSONLogger(stream, now=lambda: next(times)).log_encoded_later(  # type: ignore[arg-type]
            "WARN", 'm"sg', fields)
        self.assertEqual(calls, [])
        out = io.StringIO()
        JSONLogger(out, now=lambda: "T1").log_encoded("WARN", 'm"sg', ', "k": "v\\"", "n": 3')
        self.assertEqual([m() for m in stream.makers], [out.getvalue().encode("utf-8")])

    def test_later_lone_surrogate_escaped(self) -> None:
        made: list[Any] = []
        stream = SimpleNamespace(write_later=made.append)
        JSONLogger(stream, now=lambda: "T").log_encoded_later(  # type: ignore[arg-type]
            "INFO", "Request", lambda: ', "path": %s' % mlogging.encode_string("/\udcff"))
        self.assertEqual(json.loads(made[0]().decode("utf-8"))["path"], "/\udcff")

    def test_later_on_other_streams_now(self) -> None:
        out = io.StringIO()
        JSONLogger(out, now=lambda: "T").log_encoded_later("INFO", "x", lambda: ', "k": 1')
        self.assertEqual(json.loads(out.getvalue())["k"], 1)

    def test_later_below_level_not_encoded(self) -> None:
        out = io.StringIO()
        JSONLogger(out, level="ERROR").log_encoded_later(
            "INFO", "x", lambda: self.fail("encoded"))  # type: ignore[arg-type,return-value]
        self.assertEqual(out.getvalue(), "")

    def test_list_logger_keeps_the_record_later(self) -> None:
        logger = mlogging.ListLogger()
        logger.log_encoded_later("INFO", "Request", lambda: ', "status": 200')
        self.assertEqual(logger.records, [{"level": "INFO", "msg": "Request", "status": 200}])

    def test_list_logger_keeps_the_record(self) -> None:
        """
        The test logger decodes the attributes into its record.
        """
        logger = mlogging.ListLogger()
        logger.log_encoded("INFO", "Request", ', "path": "/a\\"b", "status": 200')
        self.assertEqual(logger.records, [
            {"level": "INFO", "msg": "Request", "path": '/a"b', "status": 200}])
