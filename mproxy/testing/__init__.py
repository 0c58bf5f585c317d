"""
Public helpers for testing deploy tooling against mproxy with trial.

In memory, synchronous: L{ProxyHarness} runs the real router, controller
(health checks, switches, drains) and proxy on a L{MemoryReactorClock},
with in-memory upstream apps; no sockets, no sleeps.

    from mproxy.testing import ProxyHarness

    class DeployTests(SynchronousTestCase):
        def test_deploy(self):
            harness = ProxyHarness()
            web = harness.upstream("web-1")
            self.successResultOf(harness.deploy("app", web, host="app.example"))
            response = harness.request(b"GET", b"/", host="app.example")
            self.assertEqual(self.successResultOf(response).body, b"web-1")

For real: L{MproxyProcess} runs the real C{mproxy run} in a child process
on free loopback ports and runs C{mproxy} commands against it;
L{listen_upstream} serves an L{UpstreamApp} (a small web application whose
health answer can be scripted, and which can hold requests open) on a
loopback port.  L{LoadClient} keeps many keep-alive clients busy against a
real server and counts failed requests (it checks an idle connection before
reusing it, as urllib3 does); L{open_websocket} and L{WebSocketUpstream} are
a WebSocket client and an echoing app, L{encode_websocket_frame},
L{decode_websocket_frames} and L{websocket_accept_key} the framing they
use, for an app of a test's own; L{H3Client} is an HTTP/3 client (on
aioquic) for a server started with C{--http3}.

    class DeployTests(TestCase):
        @inlineCallbacks
        def test_deploy(self):
            app, port = listen_upstream(reactor, "web-1")
            self.addCleanup(port.stopListening)
            proxy = MproxyProcess(reactor, self.mktemp())
            yield proxy.start()
            self.addCleanup(proxy.stop)
            result = yield proxy.command("deploy", f"127.0.0.1:{port.getHost().port}")
            self.assertEqual(result.status, 0)
"""

from mproxy.testing._h3client import H3Client, H3ConnectionLost, H3Response
from mproxy.testing._harness import MemoryUpstream, ProxyHarness, Response
from mproxy.testing._load import LoadClient, LoadReport
from mproxy.testing._network import MemoryNetwork, MemoryTransport
from mproxy.testing._process import (
    CommandProtocol,
    CommandResult,
    MproxyProcess,
    ServerProtocol,
    child_env,
    run_mproxy,
)
from mproxy.testing._upstream import UpstreamApp, listen_upstream
from mproxy.testing._websocket import (
    WebSocketClient,
    WebSocketUpstream,
    decode_websocket_frames,
    encode_websocket_frame,
    listen_websocket_upstream,
    open_websocket,
    websocket_accept_key,
)

__all__ = [
    "CommandProtocol",
    "CommandResult",
    "H3Client",
    "H3ConnectionLost",
    "H3Response",
    "LoadClient",
    "LoadReport",
    "MemoryNetwork",
    "MemoryTransport",
    "MemoryUpstream",
    "MproxyProcess",
    "ProxyHarness",
    "Response",
    "ServerProtocol",
    "UpstreamApp",
    "WebSocketClient",
    "WebSocketUpstream",
    "child_env",
    "decode_websocket_frames",
    "encode_websocket_frame",
    "listen_upstream",
    "listen_websocket_upstream",
    "open_websocket",
    "run_mproxy",
    "websocket_accept_key",
]
