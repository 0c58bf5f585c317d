"""
HTTP/2 through a real C{mproxy run} (TLS, ALPN h2): request bodies larger
than any window stream to the target under flow control, on concurrent
streams of one connection, and are logged like other requests.
"""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
from typing import Any

import h2.connection
import h2.events
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from mproxy.tls.testing import make_ca, make_certificate, pem_pair
from tests.test_streaming_integration import StreamingMixin, sleep

HOST = "up.test"


def h2_uploads(port: int, cafile: str, bodies: dict[int, tuple[bytes, bool]]) -> dict[int, Any]:
    """
    POST each body (stream id -> (body, with Content-Length)) to /upload on
    one connection, all at once, sending as the windows allow; returns per
    stream the status and the response body.
    """
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.set_alpn_protocols(["h2"])
    out: dict[int, Any] = {sid: {"status": 0, "body": b""} for sid in bodies}
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw, \
            ctx.wrap_socket(raw, server_hostname=HOST) as s:
        conn = h2.connection.H2Connection()
        conn.initiate_connection()
        left = {}
        for sid, (body, declared) in bodies.items():
            headers = [(":method", "POST"), (":path", "/upload"), (":scheme", "https"),
                       (":authority", HOST)]
            if declared:
                headers.append(("content-length", str(len(body))))
            conn.send_headers(sid, headers)
            left[sid] = memoryview(body)
        open_streams = set(bodies)

        def send_some() -> None:
            for sid, rest in list(left.items()):
                while rest:
                    n = min(len(rest), conn.local_flow_control_window(sid),
                            conn.max_outbound_frame_size)
                    if n <= 0:
                        break
                    conn.send_data(sid, rest[:n].tobytes())
                    rest = rest[n:]
                left[sid] = rest
                if not rest:
                    conn.end_stream(sid)
                    del left[sid]

        send_some()
        s.sendall(conn.data_to_send())
        while open_streams:
            data = s.recv(65536)
            if not data:
                break
            for event in conn.receive_data(data):
                sid = getattr(event, "stream_id", None)
                if isinstance(event, h2.events.ResponseReceived):
                    out[sid]["status"] = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived):
                    out[sid]["body"] += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, sid)
                elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                    open_streams.discard(sid)
            send_some()
            s.sendall(conn.data_to_send())
        conn.close_connection()
        s.sendall(conn.data_to_send())
    return out


class H2UploadTests(StreamingMixin, TestCase):
    @inlineCallbacks
    def test_large_uploads_stream(self) -> Any:
        """
        Two 3 MiB uploads on one connection, one with a Content-Length and
        one without (streamed to the target with its length unknown),
        arrive whole; the log has the declared length or -1.
        """
        work = os.path.abspath(self.mktemp())
        os.makedirs(work)
        ca = make_ca()
        chain, key = pem_pair(make_certificate([HOST], issuer=ca))
        paths = {}
        for name, data in (("ca.pem", pem_pair(ca)[0]), ("cert.pem", chain), ("key.pem", key)):
            paths[name] = os.path.join(work, name)
            with open(paths[name], "wb") as f:
                f.write(data)
        app, addr = self.upstream("one")
        p = yield self.proxy()
        yield self.deploy(p, addr, "--host", HOST, "--tls",
                          "--tls-certificate-path", paths["cert.pem"],
                          "--tls-private-key-path", paths["key.pem"])
        big = os.urandom(3 << 20)
        other = os.urandom(3 << 20)
        results = yield deferToThread(h2_uploads, p.https_port, paths["ca.pem"],
                                      {1: (big, True), 3: (other, False)})
        for sid, body in ((1, big), (3, other)):
            self.assertEqual(results[sid]["status"], 200)
            self.assertEqual(results[sid]["body"],
                             hashlib.sha256(body).hexdigest().encode() + b" %d" % len(body))
        for _ in range(50):
            if len(self.requests_logged(p)) >= 2:
                break
            yield sleep(0.1)
        logged = sorted((r["req_content_length"], r["proto"], r["status"], r["method"])
                        for r in self.requests_logged(p))
        self.assertEqual(logged, [(-1, "HTTP/2.0", 200, "POST"),
                                  (3 << 20, "HTTP/2.0", 200, "POST")])
