#!/usr/bin/env python3
"""A tiny web app for trying mproxy out (used by compose.yaml's `web` service).

  GET /up  -> 200 "OK"                      (mproxy's default health check)
  GET /    -> 200 "Hello from <hostname>"   (so you can see which instance answered)
  anything else -> 404

Standard library only. Listens on 0.0.0.0:$PORT (default 3000).
"""

import os
import signal
import socket
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOSTNAME = socket.gethostname()


class Handler(BaseHTTPRequestHandler):
    server_version = "webapp"
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/up":
            self._send(200, "OK\n")
        elif path == "/":
            self._send(200, f"Hello from {HOSTNAME}\n")
        else:
            self._send(404, "Not found\n")

    def do_HEAD(self):
        self.do_GET()

    def _send(self, status, text):
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, fmt, *args):
        # One line per request on stderr, without the health-check noise.
        if not self.path.startswith("/up"):
            sys.stderr.write(f"{self.address_string()} {fmt % args}\n")


def main():
    port = int(os.environ.get("PORT", "3000"))
    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    server.daemon_threads = True
    # `docker stop` sends SIGTERM; exit promptly instead of waiting for SIGKILL.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"webapp {HOSTNAME} listening on :{port}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
