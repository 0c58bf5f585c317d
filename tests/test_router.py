"""
Tests for L{mproxy.router}: host precedence, path prefixes, prefix stripping
and conflicts.
"""

from __future__ import annotations

from typing import Sequence

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mproxy.balancer import LoadBalancer
from mproxy.errors import HostConflict
from mproxy.router import RouteTable, Router, strip_port
from mproxy.service import Service
from mproxy.spec import ServiceOptions, TargetOptions


def make_service(
    name: str,
    hosts: Sequence[str] = (),
    prefixes: Sequence[str] = (),
    strip: bool = True,
    clock: Clock | None = None,
) -> Service:
    clock = clock or Clock()
    return Service(
        name,
        ServiceOptions(hosts=hosts, path_prefixes=prefixes, strip_prefix=strip),
        TargetOptions(),
        LoadBalancer(["web-" + name + ":80"], [], clock),
        clock,
    )


class RouterTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.router = Router()

    def add(self, name: str, hosts: Sequence[str] = (), prefixes: Sequence[str] = (),
            strip: bool = True) -> Service:
        s = make_service(name, hosts, prefixes, strip)
        self.router.check_conflicts(name, s.options)
        self.router.install(s)
        return s

    def matched(self, host: str, path: str) -> str | None:
        m = self.router.match(host, path)
        return None if m is None else m.service.name


class StripPortTests(SynchronousTestCase):
    def test_strip(self) -> None:
        """
        Ports are dropped, IPv6 brackets removed, names lower-cased.
        """
        self.assertEqual(strip_port("example.com:8080"), "example.com")
        self.assertEqual(strip_port("Example.COM"), "example.com")
        self.assertEqual(strip_port("[::1]:80"), "::1")
        self.assertEqual(strip_port("[::1]"), "::1")
        self.assertEqual(strip_port("::1"), "::1")
        self.assertEqual(strip_port("example.com."), "example.com")
        self.assertEqual(strip_port(""), "")


class HostMatchingTests(RouterTestCase):
    def test_exact(self) -> None:
        """
        A service answers for its hosts only (with no default service).
        """
        self.add("a", ["a.example.com"])
        self.add("b", ["b.example.com", "c.example.com"])
        self.assertEqual(self.matched("a.example.com", "/"), "a")
        self.assertEqual(self.matched("b.example.com", "/x"), "b")
        self.assertEqual(self.matched("c.example.com", "/x"), "b")
        self.assertIsNone(self.matched("d.example.com", "/"))

    def test_case_insensitive(self) -> None:
        """
        Host names match regardless of case, in the request and in the options.
        """
        self.add("a", ["App.Example.com"])
        self.assertEqual(self.matched("APP.example.COM", "/"), "a")
        self.assertEqual(self.matched("app.example.com", "/"), "a")

    def test_port_stripped(self) -> None:
        """
        The port of the Host header is ignored, IPv6 included.
        """
        self.add("a", ["a.example.com"])
        self.add("v6", ["::1"])
        self.assertEqual(self.matched("a.example.com:8080", "/"), "a")
        self.assertEqual(self.matched("[::1]:80", "/"), "v6")

    def test_wildcard_single_label(self) -> None:
        """
        C{*.example.com} covers exactly one label.
        """
        self.add("w", ["*.example.com"])
        self.assertEqual(self.matched("a.example.com", "/"), "w")
        self.assertEqual(self.matched("A.Example.com:443", "/"), "w")
        self.assertIsNone(self.matched("a.b.example.com", "/"))
        self.assertIsNone(self.matched("example.com", "/"))

    def test_exact_beats_wildcard(self) -> None:
        """
        An exact host entry is preferred to a wildcard.
        """
        self.add("w", ["*.example.com"])
        self.add("a", ["a.example.com"])
        self.assertEqual(self.matched("a.example.com", "/"), "a")
        self.assertEqual(self.matched("b.example.com", "/"), "w")

    def test_default_host(self) -> None:
        """
        A service without hosts takes every host nobody else claims.
        """
        self.add("default")
        self.add("a", ["a.example.com"])
        self.add("w", ["*.example.com"])
        self.assertEqual(self.matched("a.example.com", "/"), "a")
        self.assertEqual(self.matched("b.example.com", "/"), "w")
        self.assertEqual(self.matched("other.org", "/"), "default")
        self.assertEqual(self.matched("a.b.example.com", "/"), "default")
        self.assertEqual(self.matched("localhost:8080", "/x"), "default")
        self.assertEqual(self.matched("", "/"), "default")

    def test_choice_is_final(self) -> None:
        """
        When the chosen host has no matching prefix, the request is not retried
        against the wildcard or default entries.
        """
        self.add("default")
        self.add("w", ["*.example.com"])
        self.add("api", ["a.example.com"], ["/api"])
        self.add("wapi", ["*.other.com"], ["/api"])
        self.assertEqual(self.matched("a.example.com", "/api/x"), "api")
        self.assertIsNone(self.matched("a.example.com", "/"))
        self.assertIsNone(self.matched("a.example.com", "/other"))
        self.assertIsNone(self.matched("b.other.com", "/"))
        self.assertEqual(self.matched("b.other.com", "/api"), "wapi")

    def test_no_services(self) -> None:
        """
        An empty router matches nothing.
        """
        self.assertIsNone(self.matched("a.com", "/"))

    def test_remove(self) -> None:
        """
        Removing a service removes its routes.
        """
        self.add("a", ["a.com"])
        self.assertEqual(self.router.remove("a").name, "a")
        self.assertIsNone(self.matched("a.com", "/"))
        self.assertIsNone(self.router.remove("a"))

    def test_move_hosts(self) -> None:
        """
        Re-installing a service with new hosts drops the old bindings.
        """
        s = self.add("a", ["old.com"])
        s.options = ServiceOptions(hosts=["new.com"])
        self.router.install(s)
        self.assertIsNone(self.matched("old.com", "/"))
        self.assertEqual(self.matched("new.com", "/"), "a")


class PathMatchingTests(RouterTestCase):
    def test_longest_prefix(self) -> None:
        """
        The longest matching prefix wins, whatever the install order.
        """
        self.add("root")
        self.add("api", [], ["/api"])
        self.add("internal", [], ["/api/internal"])
        self.assertEqual(self.matched("h", "/"), "root")
        self.assertEqual(self.matched("h", "/x"), "root")
        self.assertEqual(self.matched("h", "/api"), "api")
        self.assertEqual(self.matched("h", "/api/users"), "api")
        self.assertEqual(self.matched("h", "/api/internal"), "internal")
        self.assertEqual(self.matched("h", "/api/internal/x"), "internal")
        self.assertEqual(self.matched("h", "/api/internalx"), "api")

    def test_segment_boundary(self) -> None:
        """
        C{/app} matches C{/app}, C{/app/} and C{/app/x} but not C{/appointment}.
        """
        self.add("app", [], ["/app"])
        self.assertEqual(self.matched("h", "/app"), "app")
        self.assertEqual(self.matched("h", "/app/"), "app")
        self.assertEqual(self.matched("h", "/app/x"), "app")
        self.assertIsNone(self.matched("h", "/appointment"))
        self.assertIsNone(self.matched("h", "/"))
        self.assertIsNone(self.matched("h", "/ap"))

    def test_several_prefixes(self) -> None:
        """
        A service may own several prefixes.
        """
        self.add("s", ["a.com"], ["/api", "/app"])
        self.assertEqual(self.matched("a.com", "/api/1"), "s")
        self.assertEqual(self.matched("a.com", "/app/1"), "s")
        self.assertIsNone(self.matched("a.com", "/other"))

    def test_prefix_recorded(self) -> None:
        """
        The match names the prefix that matched.
        """
        self.add("root")
        self.add("api", [], ["/api"])
        self.assertEqual(self.router.match("h", "/api/x").prefix, "/api")
        self.assertEqual(self.router.match("h", "/x").prefix, "/")


class StripTests(RouterTestCase):
    def test_strip(self) -> None:
        """
        The matched prefix is removed from the path the target sees; an empty
        rest becomes C{/}; the query is untouched.
        """
        self.add("app", [], ["/app"])
        self.add("deep", [], ["/api/internal"])
        m = self.router.match("h", "/app")
        self.assertEqual(m.target_path("/app"), "/")
        self.assertEqual(m.target_path("/app/"), "/")
        self.assertEqual(m.target_path("/app/show"), "/show")
        self.assertEqual(m.target_path("/app/x?q"), "/x?q")
        self.assertEqual(m.target_path("/app?q=1"), "/?q=1")
        m = self.router.match("h", "/api/internal/something")
        self.assertEqual(m.target_path("/api/internal/something?a=b"), "/something?a=b")

    def test_root_not_stripped(self) -> None:
        """
        Nothing is stripped for the root prefix.
        """
        self.add("root")
        m = self.router.match("h", "/a/b")
        self.assertEqual(m.target_path("/a/b?x"), "/a/b?x")

    def test_strip_off(self) -> None:
        """
        With prefix stripping off the original path is forwarded.
        """
        self.add("app", [], ["/app"], strip=False)
        m = self.router.match("h", "/app/x")
        self.assertEqual(m.target_path("/app/x?q"), "/app/x?q")


class ConflictTests(RouterTestCase):
    def test_same_host_and_prefix(self) -> None:
        """
        Two services on the same host and prefix conflict.
        """
        self.add("a", ["a.com"])
        with self.assertRaises(HostConflict) as cm:
            self.router.check_conflicts("b", ServiceOptions(hosts=["A.com"]))
        self.assertEqual(
            str(cm.exception),
            "host settings conflict with another service: host a.com is served by service a",
        )
        with self.assertRaises(HostConflict) as cm:
            self.router.check_conflicts("b", ServiceOptions(hosts=["x.com", "a.com"]))
        self.assertIn("host a.com is served by service a", str(cm.exception))
        self.assertRaises(
            HostConflict,
            self.router.check_conflicts,
            "b",
            ServiceOptions(hosts=["x.com", "a.com"], path_prefixes=["/api", "/"]),
        )

    def test_two_default_roots(self) -> None:
        """
        Only one service may be the default root service.
        """
        self.add("a")
        with self.assertRaises(HostConflict) as cm:
            self.router.check_conflicts("b", ServiceOptions())
        self.assertEqual(
            str(cm.exception),
            "host settings conflict with another service: the default host (no --host) "
            "is served by service a",
        )
        self.add("api", ["a.com"], ["/api"])
        with self.assertRaises(HostConflict) as cm:
            self.router.check_conflicts("c", ServiceOptions(hosts=["a.com"], path_prefixes=["/api"]))
        self.assertIn("host a.com path /api is served by service api", str(cm.exception))

    def test_own_redeploy(self) -> None:
        """
        A service re-deployed with its own hosts and prefixes does not conflict
        with itself.
        """
        self.add("a", ["a.com"], ["/", "/api"])
        self.router.check_conflicts("a", ServiceOptions(hosts=["a.com"], path_prefixes=["/"]))
        self.router.check_conflicts("a", ServiceOptions(hosts=["b.com"]))

    def test_non_conflicts(self) -> None:
        """
        Wildcard vs exact, default vs host, and different prefixes on the same
        host do not conflict.
        """
        self.add("w", ["*.example.com"])
        self.add("d")
        self.add("api", ["a.com"], ["/api"])
        self.router.check_conflicts("x", ServiceOptions(hosts=["a.example.com"]))
        self.router.check_conflicts("x", ServiceOptions(hosts=["b.com"]))
        self.router.check_conflicts("x", ServiceOptions(hosts=["a.com"]))
        self.router.check_conflicts("x", ServiceOptions(path_prefixes=["/api"]))
        self.assertRaises(
            HostConflict, self.router.check_conflicts, "x", ServiceOptions(hosts=["*.example.com"])
        )
        self.assertRaises(
            HostConflict,
            self.router.check_conflicts,
            "x",
            ServiceOptions(hosts=["a.com"], path_prefixes=["api/"]),
        )


class RouteTableTests(SynchronousTestCase):
    def test_value(self) -> None:
        """
        A route table is a plain value: bindings sorted longest prefix first.
        """
        table = RouteTable.build(
            [
                ("root", ServiceOptions()),
                ("api", ServiceOptions(path_prefixes=["/api", "/a"])),
            ]
        )
        self.assertEqual(
            table.bindings[""], (("/api", "api"), ("/a", "api"), ("/", "root"))
        )
        self.assertEqual(table.lookup("x", "/a/b"), ("api", "/a"))
        self.assertEqual(table.lookup("x", "/ab"), ("root", "/"))
        self.assertEqual(RouteTable.build([]).lookup("x", "/"), None)

    def test_root_service_for(self) -> None:
        """
        The root service of a host follows the full precedence.
        """
        router = Router()
        for s in [make_service("w", ["*.a.com"]), make_service("d"),
                  make_service("api", ["x.a.com"], ["/api"])]:
            router.install(s)
        self.assertEqual(router.root_service_for("y.a.com").name, "w")
        self.assertEqual(router.root_service_for("b.com").name, "d")
        self.assertIsNone(router.root_service_for("x.a.com"))


class TLSInheritanceTests(SynchronousTestCase):
    """
    Services that do not serve C{/} take TLS and TLS-redirect
    from the root service of their first host.
    """

    def setUp(self) -> None:
        self.router = Router()

    def install(self, name: str, hosts: Sequence[str], prefixes: Sequence[str] = (),
                tls: bool = False, redirect: bool = True) -> Service:
        clock = Clock()
        s = Service(
            name,
            ServiceOptions(hosts=hosts, path_prefixes=prefixes, tls_enabled=tls,
                           tls_redirect=redirect),
            TargetOptions(),
            LoadBalancer(["web-" + name + ":80"], [], clock),
            clock,
        )
        self.router.install(s)
        return s

    def flags(self, name: str) -> tuple[bool, bool]:
        o = self.router.services[name].options
        return o.tls_enabled, o.tls_redirect

    def test_inherit(self) -> None:
        """
        A path service follows its host's root service, whichever is
        installed first, and falls back to TLS off / redirect on when the
        root goes away.
        """
        self.install("api", ["a.com"], ["/api"])
        self.assertEqual(self.flags("api"), (False, True))
        self.install("root", ["a.com"], tls=True, redirect=False)
        self.assertEqual(self.flags("api"), (True, False))
        self.assertEqual(self.router.match("a.com", "/api/x").service.options.tls_enabled, True)
        self.install("root", ["a.com"], tls=False)
        self.assertEqual(self.flags("api"), (False, True))
        self.install("root", ["a.com"], tls=True)
        self.assertEqual(self.flags("api"), (True, True))
        self.router.remove("root")
        self.assertEqual(self.flags("api"), (False, True))

    def test_root_services_untouched(self) -> None:
        """
        Services that serve C{/} keep their own flags.
        """
        self.install("root", ["a.com"], tls=True, redirect=False)
        self.install("both", ["b.com"], ["/", "/api"], tls=False)
        self.assertEqual(self.flags("root"), (True, False))
        self.assertEqual(self.flags("both"), (False, True))

    def test_first_host_wildcard(self) -> None:
        """
        The root is looked up for the path service's first host, through the
        wildcard entry.
        """
        self.install("w", ["*.a.com"], tls=True)
        self.install("api", ["x.a.com", "other.com"], ["/api"])
        # x.a.com has its own (path) binding, so its root lookup is final
        # there: no root.
        self.assertEqual(self.flags("api"), (False, True))
        self.install("api2", ["*.a.com"], ["/api2"])
        self.assertEqual(self.flags("api2"), (True, True))


class MatchReuseTests(RouterTestCase):
    def test_match_follows_reinstalled_service(self) -> None:
        """
        Matches for the same route are the same value until the service
        behind the route changes: a re-installed service (a new object
        under the same name), a removed one, a replaced one.
        """
        first = self.add("app", ["a.example"], ["/api"])
        m = self.router.match("a.example", "/api/x")
        self.assertIs(self.router.match("A.example:80", "/api"), m)
        self.assertIs(m.service, first)
        self.assertEqual(m.prefix, "/api")
        self.router.services["app"] = second = make_service("app", ["a.example"], ["/api"])
        self.assertIs(self.router.match("a.example", "/api/x").service, second)
        self.router.remove("app")
        self.assertIsNone(self.router.match("a.example", "/api/x"))
        third = self.add("app", ["a.example"], ["/api"])
        self.assertIs(self.router.match("a.example", "/api/x").service, third)


class HostCacheTests(RouterTestCase):
    def test_host_looked_up_once(self) -> None:
        """
        A Host value's bindings are looked up in the table once, however
        many requests carry it.
        """
        self.add("app", ["a.example"], ["/"])
        asked: list[str] = []
        real = RouteTable.bindings_for

        def counting(table: RouteTable, host: str) -> object:
            asked.append(host)
            return real(table, host)

        self.patch(RouteTable, "bindings_for", counting)
        for _ in range(3):
            self.assertEqual(self.matched("A.example:8080", "/x"), "app")
            self.assertEqual(self.matched("other.example", "/x"), None)
        self.assertEqual(asked, ["a.example", "other.example"])

    def test_new_table_used_at_once(self) -> None:
        """
        What a host was bound to is forgotten when the routes change.
        """
        self.assertIsNone(self.matched("a.example", "/"))
        self.add("app", ["a.example"], ["/"])
        self.assertEqual(self.matched("a.example", "/"), "app")
        self.add("api", ["a.example"], ["/api"])
        self.assertEqual(self.matched("a.example", "/api/v1"), "api")
        self.router.remove("app")
        self.assertIsNone(self.matched("a.example", "/"))
        self.router.table = RouteTable({})
        self.assertIsNone(self.matched("a.example", "/api/v1"))

    def test_bounded(self) -> None:
        """
        Clients choose Host values: only so many are remembered, the rest
        are routed all the same.
        """
        from mproxy.router import HOST_CACHE_SIZE

        self.add("app", [], ["/"])
        for i in range(HOST_CACHE_SIZE + 10):
            self.assertEqual(self.matched("h%d.example" % i, "/"), "app")
        self.assertEqual(len(self.router._hosts), HOST_CACHE_SIZE)
