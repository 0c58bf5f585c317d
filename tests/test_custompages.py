"""
Tests for L{mproxy.http.custompages}: custom error pages per service
(C{--error-pages DIR}), in unit, in the proxy resource and end to end.
"""

from __future__ import annotations

import os
import signal
import socket
from typing import Any

from twisted.internet import error
from twisted.internet.defer import inlineCallbacks
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mproxy.errors import ErrorPagesError
from mproxy.http import custompages
from mproxy.http.custompages import Template, TemplateError, load, render_for, validate
from mproxy.http.pages import render_page
from mproxy.spec import ServiceOptions
from tests.test_integration import IntegrationMixin
from tests.test_proxy import Harness, Refusal

# The page kamal-proxy ships (its markup trimmed): Kamal users bring these.
KAMAL_503 = """<!doctype html>
<html lang="en">
  <head><title>503 — Service Temporarily Unavailable</title></head>
  <body>
    <main>
      <article>
        {{ if .Message }}
        <p>{{ .Message }}</p>
        {{ else }}
        <p><strong>The service is temporarily unavailable.</strong></p>
        {{ end }}
      </article>
    </main>
  </body>
</html>
"""


class Service:
    def __init__(self, error_pages: str = "") -> None:
        self.options = ServiceOptions(error_pages=error_pages)


class Pages:
    """
    Helpers writing page directories under a test's temp dir.
    """

    def pages(self, files: dict[str, str | bytes]) -> str:
        d = os.path.abspath(self.mktemp())  # type: ignore[attr-defined]
        os.makedirs(d)
        for name, content in files.items():
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(os.path.join(d, name), mode) as f:
                f.write(content)
        return d

    def assertLoadFails(self, directory: str, *fragments: str) -> None:
        e = self.assertRaises(ErrorPagesError, load, directory)  # type: ignore[attr-defined]
        self.assertTrue(  # type: ignore[attr-defined]
            str(e).startswith("unable to load error pages: "), str(e)
        )
        for f in fragments:
            self.assertIn(f, str(e))  # type: ignore[attr-defined]


class TemplateTests(SynchronousTestCase):
    def render(self, source: str, message: str = "") -> str:
        return Template(source).render(message).decode("utf-8")

    def test_placeholders(self) -> None:
        """
        C{{{ Message }}}, C{{{.Message}}}, C{{{ .Message }}} and
        C{{{message}}} all insert the message.
        """
        for tpl in ("{{ Message }}", "{{.Message}}", "{{ .Message }}", "{{message}}",
                    "{{\n\t.Message\n}}"):
            self.assertEqual(self.render(f"<p>{tpl}</p>", "hi"), "<p>hi</p>", tpl)
            self.assertEqual(self.render(f"<p>{tpl}</p>"), "<p></p>", tpl)

    def test_escaping(self) -> None:
        """
        The message is HTML-escaped, quotes included.
        """
        self.assertEqual(
            self.render('<a title="{{.Message}}">{{ Message }}</a>', "Back <soon> & \"x\" 'y'"),
            '<a title="Back &lt;soon&gt; &amp; &quot;x&quot; &#x27;y&#x27;">'
            "Back &lt;soon&gt; &amp; &quot;x&quot; &#x27;y&#x27;</a>",
        )

    def test_no_code_execution(self) -> None:
        """
        A message that looks like a template is inserted as text, not
        expanded again.
        """
        self.assertEqual(self.render("{{.Message}}", "{{.Message}}"), "{{.Message}}")

    def test_if_else(self) -> None:
        """
        C{{{ if .Message }}} picks its first part with a message, the
        C{{{ else }}} part without; blocks nest; C{else} is optional.
        """
        src = "[{{ if .Message }}m={{.Message}}{{ else }}none{{ end }}]"
        self.assertEqual(self.render(src, "x"), "[m=x]")
        self.assertEqual(self.render(src), "[none]")
        nested = "{{if Message}}a{{if .Message}}b{{end}}{{else}}c{{end}}"
        self.assertEqual(self.render(nested, "x"), "ab")
        self.assertEqual(self.render(nested), "c")
        self.assertEqual(self.render("{{if .Message}}only{{end}}!"), "!")

    def test_kamal_proxy_page(self) -> None:
        """
        kamal-proxy's own 503 page works unchanged.
        """
        with_msg = self.render(KAMAL_503, "Deploying <now>")
        self.assertIn("<p>Deploying &lt;now&gt;</p>", with_msg)
        self.assertNotIn("temporarily unavailable.", with_msg)
        without = self.render(KAMAL_503)
        self.assertIn("The service is temporarily unavailable.", without)
        self.assertNotIn("{{", without)

    def test_comments_and_trim_markers(self) -> None:
        """
        Comments are dropped; C{{{-} and C{-}}} trim the whitespace around.
        """
        self.assertEqual(self.render("a{{/* note */}}b"), "ab")
        self.assertEqual(self.render("a {{- /* note */ -}} \n b"), "ab")
        self.assertEqual(self.render("a  \n{{- .Message -}}\n  b", "M"), "aMb")
        self.assertEqual(self.render("a {{ .Message }} b", "M"), "a M b")

    def test_parse_errors(self) -> None:
        """
        Anything but the supported actions fails to parse, naming the line.
        """
        cases = {
            "{{ .Foo }}": "1: unsupported action",
            "x\n{{ range .Items }}{{ end }}": "2: unsupported action",
            "{{ call .Func }}": "unsupported action",
            "{{ if .Foo }}a{{ end }}": "unsupported action",
            "a\nb\n{{ .Message": "3: unclosed action",
            "{{/* open": "unclosed comment",
            "{{/* x */ y}}": "comment ends before closing delimiter",
            "{{}}": "missing value",
            "{{ if .Message }}a": "{{if}} without {{end}}",
            "{{ end }}": "unexpected {{end}}",
            "{{ else }}": "unexpected {{else}}",
            "{{if .Message}}{{else}}{{else}}{{end}}": "unexpected {{else}}",
        }
        for src, fragment in cases.items():
            e = self.assertRaises(TemplateError, Template, src)
            self.assertIn(fragment, str(e), src)

    def test_plain_html(self) -> None:
        """
        A page without actions is served as is (CSS braces are fine).
        """
        src = "<style>body { color: red }</style><h1>Oops</h1>"
        self.assertEqual(self.render(src, "ignored"), src)


class LoadTests(Pages, SynchronousTestCase):
    def setUp(self) -> None:
        custompages.clear_cache()
        self.addCleanup(custompages.clear_cache)

    def test_loads_status_templates(self) -> None:
        """
        Every C{<status>.html} is a template; other C{*.html} and other
        files are ignored (not even parsed).
        """
        d = self.pages({
            "404.html": "custom 404",
            "503.html": "down: {{ .Message }}",
            "index.html": "{{ .NotParsed }}",
            "error404.html": "{{",
            "200.html": "not an error",
            "style.css": "x",
            "notes.txt": "x",
        })
        os.makedirs(os.path.join(d, "500.html"))  # a directory, not a page
        pages = load(d)
        self.assertEqual(sorted(pages.templates), [404, 503])
        self.assertEqual(pages.render(404), b"custom 404")
        self.assertEqual(pages.render(503, "<b>"), b"down: &lt;b&gt;")
        self.assertIsNone(pages.render(502))

    def test_missing_directory(self) -> None:
        d = os.path.abspath(self.mktemp())
        self.assertLoadFails(d, d, "no such directory")

    def test_not_a_directory(self) -> None:
        d = self.pages({"404.html": "x"})
        self.assertLoadFails(os.path.join(d, "404.html"), "not a directory")

    def test_unreadable_directory(self) -> None:
        if os.geteuid() == 0:
            raise self.skipTest("root can read anything")
        d = self.pages({"404.html": "x"})
        os.chmod(d, 0)
        self.addCleanup(os.chmod, d, 0o755)
        self.assertLoadFails(d, "permission denied")

    def test_unreadable_template(self) -> None:
        if os.geteuid() == 0:
            raise self.skipTest("root can read anything")
        d = self.pages({"404.html": "x"})
        os.chmod(os.path.join(d, "404.html"), 0)
        self.assertLoadFails(d, "404.html", "permission denied")

    def test_empty_directory(self) -> None:
        d = self.pages({})
        self.assertLoadFails(d, "no *.html files in " + d)

    def test_no_html(self) -> None:
        d = self.pages({"404.htm": "x", "readme.txt": "x"})
        self.assertLoadFails(d, "no *.html files")

    def test_no_status_templates(self) -> None:
        """
        C{*.html} files but none named like C{404.html}: refused, so that a
        misnamed page is noticed at deploy time.
        """
        d = self.pages({"index.html": "x", "not-found.html": "x"})
        self.assertLoadFails(d, "no <status>.html templates")

    def test_bad_template(self) -> None:
        d = self.pages({"404.html": "fine", "503.html": "a\n{{ .Oops }}"})
        self.assertLoadFails(d, os.path.join(d, "503.html") + ":2: unsupported action")

    def test_not_utf8(self) -> None:
        d = self.pages({"404.html": b"\xff\xfe"})
        self.assertLoadFails(d, "404.html: not valid UTF-8")

    def test_validate(self) -> None:
        """
        C{validate} loads the directory the options name; no directory, no
        check.
        """
        validate(ServiceOptions())
        d = self.pages({"404.html": "one"})
        validate(ServiceOptions(error_pages=d))
        self.assertEqual(render_for(Service(d), 404), b"one")
        e = self.assertRaises(
            ErrorPagesError, validate, ServiceOptions(error_pages=d + "-missing")
        )
        self.assertIn("unable to load error pages", str(e))

    def test_reload_on_deploy(self) -> None:
        """
        Pages are cached per directory: editing a file changes nothing
        until the directory is loaded again (a deploy naming it).
        """
        d = self.pages({"404.html": "one"})
        load(d)
        with open(os.path.join(d, "404.html"), "w") as f:
            f.write("two")
        self.assertEqual(render_for(Service(d), 404), b"one")
        load(d)
        self.assertEqual(render_for(Service(d), 404), b"two")

    def test_failed_reload_keeps_cache(self) -> None:
        """
        A reload that fails leaves the previously loaded pages in place.
        """
        d = self.pages({"404.html": "one"})
        load(d)
        with open(os.path.join(d, "404.html"), "w") as f:
            f.write("{{ broken")
        self.assertRaises(ErrorPagesError, load, d)
        self.assertEqual(render_for(Service(d), 404), b"one")


class RenderForTests(Pages, SynchronousTestCase):
    def setUp(self) -> None:
        custompages.clear_cache()
        self.addCleanup(custompages.clear_cache)

    def test_no_service_or_no_directory(self) -> None:
        """
        Unrouted requests and services without C{--error-pages} get the
        built-in pages.
        """
        for service in (None, Service()):
            self.assertEqual(render_for(service, 404), render_page(404))
            self.assertEqual(render_for(service, 503, "m"), render_page(503, "m"))

    def test_fallback_to_builtin(self) -> None:
        """
        With only a custom 404: 404 is custom; 503 (with message) is the
        built-in page showing the message; 418 is the built-in C{<h1>}.
        """
        d = self.pages({"404.html": "<p>custom 404</p>"})
        load(d)
        s = Service(d)
        self.assertEqual(render_for(s, 404), b"<p>custom 404</p>")
        page = render_for(s, 503, "Back <soon>")
        self.assertEqual(page, render_page(503, "Back <soon>"))
        self.assertIn(b"Back &lt;soon&gt;", page)
        self.assertEqual(render_for(s, 418), render_page(418))
        self.assertTrue(render_for(s, 418).startswith(b"<h1>418 "))

    def test_custom_503_message(self) -> None:
        d = self.pages({"503.html": KAMAL_503})
        load(d)
        page = render_for(Service(d), 503, "Back <soon>")
        self.assertIn(b"<p>Back &lt;soon&gt;</p>", page)
        self.assertIn(b"The service is temporarily unavailable.", render_for(Service(d), 503))

    def test_loaded_on_first_use(self) -> None:
        """
        A directory not loaded yet (a service restored from the state file)
        is loaded on its first error.
        """
        d = self.pages({"502.html": "custom 502"})
        self.assertEqual(render_for(Service(d), 502), b"custom 502")

    def test_broken_on_first_use(self) -> None:
        """
        If that first load fails, the built-in pages are used.
        """
        d = self.pages({"502.html": "{{ .Nope }}"})
        self.assertEqual(render_for(Service(d), 502), render_page(502))
        missing = os.path.abspath(self.mktemp())
        self.assertEqual(render_for(Service(missing), 404), render_page(404))


class ProxyResourceTests(Pages, SynchronousTestCase):
    """
    The proxy resource uses the matched service's pages for its own errors.
    """

    def setUp(self) -> None:
        custompages.clear_cache()
        self.addCleanup(custompages.clear_cache)
        self.dir = self.pages({
            "502.html": "<p>custom 502</p>",
            "503.html": "<p>custom 503: {{ .Message }}</p>",
            "404.html": "<p>custom 404</p>",
        })
        load(self.dir)

    def harness(self) -> Harness:
        h = Harness()
        h.service.options = ServiceOptions(error_pages=self.dir)
        return h

    def test_stop_message(self) -> None:
        h = self.harness()
        h.service.result = Refusal(503, "Back <soon>")
        h.get()
        out = h.output()
        self.assertTrue(out.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"))
        self.assertIn(b"Content-Type: text/html; charset=utf-8\r\n", out)
        body = b"<p>custom 503: Back &lt;soon&gt;</p>"
        self.assertIn(b"Content-Length: %d\r\n" % len(body), out)
        self.assertTrue(out.endswith(b"\r\n\r\n" + body))

    def test_connect_failure(self) -> None:
        h = self.harness()
        h.service.retry_results = [h.service.target]
        h.get()
        for i in (0, 1):
            factory = h.reactor.tcpClients[i][2]
            factory.clientConnectionFailed(None, Failure(error.ConnectionRefusedError()))
        out = h.output()
        self.assertTrue(out.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"))
        self.assertTrue(out.endswith(b"<p>custom 502</p>"))

    def test_no_custom_page_for_status(self) -> None:
        """
        A status the directory has no page for: the built-in page.
        """
        h = Harness(target_timeout=3)
        h.service.options = ServiceOptions(error_pages=self.dir)
        h.get()
        h.upstream()
        h.reactor.advance(3.1)
        out = h.output()
        self.assertTrue(out.startswith(b"HTTP/1.1 504 Gateway Timeout\r\n"))
        self.assertIn("504 — Gateway Timeout".encode(), out)

    def test_unrouted_404_is_builtin(self) -> None:
        """
        A request no service matches has no service pages: built-in 404.
        """
        h = self.harness()
        h.send(b"GET /x HTTP/1.1\r\nHost: other.com\r\n\r\n")
        self.assertIn("404 — Not Found".encode(), h.output())
        self.assertNotIn(b"custom 404", h.output())

    def test_target_errors_untouched(self) -> None:
        """
        A 502 produced by the target is relayed as is.
        """
        h = self.harness()
        h.get()
        proto, _ = h.upstream()
        proto.dataReceived(
            b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\n"
            b"Content-Length: 7\r\n\r\napp 502"
        )
        out = h.output()
        self.assertTrue(out.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"))
        self.assertTrue(out.endswith(b"app 502"))
        self.assertNotIn(b"custom", out)


def unused_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class IntegrationTests(Pages, IntegrationMixin, TestCase):
    """
    The real C{mproxy} process.
    """

    @inlineCallbacks
    def test_custom_pages(self) -> Any:
        """
        C{deploy --error-pages DIR}: the stop message shows on the custom
        503 (escaped), also after a restart; an unreachable target gets the
        custom 502.
        """
        d = self.pages({
            "503.html": KAMAL_503,
            "502.html": "<h1>Our custom 502</h1>",
        })
        _, addr = self.upstream("one")
        p = yield self.proxy()
        r = yield p.command("deploy", "web", "--target", addr, "--error-pages", d)
        self.assertEqual(r.status, 0, r.err)
        code, body, _ = yield self.get(p.url())
        self.assertEqual((code, body), (200, b"one"))
        r = yield p.command("stop", "web", "--message", "Back <soon>")
        self.assertEqual(r.status, 0, r.err)
        code, body, resp = yield self.get(p.url())
        self.assertEqual(code, 503)
        self.assertEqual(
            resp.headers.getRawHeaders("content-type"), ["text/html; charset=utf-8"]
        )
        self.assertIn(b"<p>Back &lt;soon&gt;</p>", body)
        self.assertNotIn(b"temporarily unavailable.", body)

        # The pages come back with the state after a restart.
        yield p.stop(signal.SIGKILL)
        yield p.start()
        code, body, _ = yield self.get(p.url())
        self.assertEqual(code, 503)
        self.assertIn(b"<p>Back &lt;soon&gt;</p>", body)
        r = yield p.command("resume", "web")
        self.assertEqual(r.status, 0, r.err)

        # Targets that are healthy (their health checks go to another port)
        # but refuse the request, also when it is sent again to the other
        # one: custom 502.
        dead = f"127.0.0.1:{unused_port()},127.0.0.1:{unused_port()}"
        r = yield p.command(
            "deploy", "web", "--target", dead, "--error-pages", d,
            "--health-check-port", addr.rpartition(":")[2],
        )
        self.assertEqual(r.status, 0, r.err)
        code, body, _ = yield self.get(p.url())
        self.assertEqual((code, body), (502, b"<h1>Our custom 502</h1>"))

    @inlineCallbacks
    def test_bad_directory_fails_deploy(self) -> Any:
        """
        A deploy naming a bad directory exits 1 with the error and changes
        nothing: the old target keeps serving, with its old pages.
        """
        _, addr1 = self.upstream("one")
        two, addr2 = self.upstream("two")
        good = self.pages({"503.html": "<p>good 503 {{.Message}}</p>"})
        p = yield self.proxy()
        r = yield p.command("deploy", "web", "--target", addr1, "--error-pages", good)
        self.assertEqual(r.status, 0, r.err)
        for bad, reason in (
            (os.path.abspath(self.mktemp()), "no such directory"),
            (self.pages({}), "no *.html files"),
            (self.pages({"503.html": "{{ if .Message }}"}), "{{if}} without {{end}}"),
        ):
            r = yield p.command("deploy", "web", "--target", addr2, "--error-pages", bad)
            self.assertEqual(r.status, 1, r.out)
            self.assertTrue(
                r.err.strip().startswith("Error: unable to load error pages: "), r.err
            )
            self.assertIn(reason, r.err)
            code, body, _ = yield self.get(p.url())
            self.assertEqual((code, body), (200, b"one"))
        self.assertEqual(two.requests, 0)
        self.assertEqual(two.health_checks, 0)
        r = yield p.command("list", "--json")
        self.assertIn(addr1, r.out)
        self.assertNotIn(addr2, r.out)
        r = yield p.command("stop", "web", "--message", "brb")
        self.assertEqual(r.status, 0, r.err)
        code, body, _ = yield self.get(p.url())
        self.assertEqual((code, body), (503, b"<p>good 503 brb</p>"))
