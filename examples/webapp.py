#!/usr/bin/env python3
"""A tiny web app for trying mproxy out (used by compose.yaml's `web` service).

  GET /up  -> 200 "OK"                      (mproxy's default health check)
  GET /    -> 200 "Hello from <hostname>"   (so you can see which instance answered)
  anything else -> 404

Standard library only. Listens on $HOST:$PORT (default 0.0.0.0:3000), or
--host/--port:

  python3 examples/webapp.py --host 127.0.0.1 --port 3000

Each response leaves in one write (headers and body together) with Nagle's
algorithm off, so keep-alive clients behind a proxy do not wait for a
delayed ACK (about 40 ms per request) between the two halves.
"""

import argparse
import os
import signal
import socket
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOSTNAME = socket.gethostname()


class Handler(BaseHTTPRequestHandler):
    server_version = "webapp"
    protocol_version = "HTTP/1.1"
    # Buffer the response (the server flushes it once per request), and send
    # it at once.
    wbufsize = 64 * 1024
    disable_nagle_algorithm = True

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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="A tiny web app for trying mproxy out.")
    parser.add_argument("--host", default=os.environ.get("HOST", "0.0.0.0"),
                        help="address to listen on (default $HOST or 0.0.0.0)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "3000")),
                        help="port to listen on (default $PORT or 3000)")
    return parser.parse_args(argv)


class Server6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def main(argv=None):
    args = parse_args(argv)
    host, port = args.host.strip("[]"), args.port
    server = (Server6 if ":" in host else ThreadingHTTPServer)((host, port), Handler)
    server.daemon_threads = True
    # `docker stop` sends SIGTERM; exit promptly instead of waiting for SIGKILL.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"webapp {HOSTNAME} listening on {host}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
