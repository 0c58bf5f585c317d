"""
Tests for C{examples/webapp.py}, the demo web app of the compose file.
"""

from __future__ import annotations

import importlib.util
import io
import os
import socket
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_webapp() -> Any:
    spec = importlib.util.spec_from_file_location(
        "webapp", os.path.join(HERE, "examples", "webapp.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class CountingSocket(socket.socket):
    """
    A socket that counts the send calls made on it.
    """

    sends = 0

    def send(self, data: Any, *args: Any) -> int:
        CountingSocket.sends += 1
        return super().send(data, *args)

    def sendall(self, data: Any, *args: Any) -> None:
        CountingSocket.sends += 1
        return super().sendall(data, *args)


class WebappTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.webapp = load_webapp()

    def connected(self) -> tuple[socket.socket, CountingSocket]:
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname())
        self.addCleanup(client.close)
        accepted, _ = listener.accept()
        server_side = CountingSocket(fileno=accepted.detach())
        self.addCleanup(server_side.close)
        return client, server_side

    def test_one_write_per_response_and_no_nagle(self) -> None:
        """
        Two keep-alive requests get two responses, each sent in one write
        (headers and body together), on a socket with TCP_NODELAY: two writes
        per response with Nagle on cost a delayed ACK (~40 ms) each.
        """
        client, server_side = self.connected()
        client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /up HTTP/1.1\r\nHost: x\r\n\r\n")
        client.shutdown(socket.SHUT_WR)
        CountingSocket.sends = 0
        self.patch(self.webapp.sys, "stderr", io.StringIO())  # its request log
        self.webapp.Handler(server_side, ("127.0.0.1", 1), object())
        self.assertEqual(CountingSocket.sends, 2)
        self.assertNotEqual(server_side.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 0)
        server_side.close()
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
        self.assertEqual(answer.count(b"HTTP/1.1 200 OK"), 2)
        self.assertIn(b"Hello from ", answer)
        self.assertTrue(answer.endswith(b"OK\n"))

    def test_bind_host_and_port(self) -> None:
        args = self.webapp.parse_args(["--host", "127.0.0.1", "--port", "3001"])
        self.assertEqual((args.host, args.port), ("127.0.0.1", 3001))
        self.patch(os, "environ", {"HOST": "::1", "PORT": "4000"})
        args = self.webapp.parse_args([])
        self.assertEqual((args.host, args.port), ("::1", 4000))
        self.patch(os, "environ", {})
        args = self.webapp.parse_args([])
        self.assertEqual((args.host, args.port), ("0.0.0.0", 3000))
