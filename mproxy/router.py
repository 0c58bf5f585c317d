"""
Host and path routing.

L{RouteTable} is a plain immutable value (host → ordered (prefix, service
name) bindings) built from service options, so it could be handed to another
process.  L{Router} holds the live L{Service} objects and the current table.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import attrs
from attrs import frozen
from zope.interface import implementer

from mproxy.errors import HostConflict
from mproxy.http.interfaces import IRouteMatch, IRouter
from mproxy.service import Service
from mproxy.spec import ServiceOptions


@frozen
class RouteTable:
    bindings: Mapping[str, tuple[tuple[str, str], ...]]

    @classmethod
    def build(cls, services: Iterable[tuple[str, ServiceOptions]]) -> RouteTable:
        table: dict[str, list[tuple[str, str]]] = {}
        for name, options in services:
            for host in options.hosts:
                for prefix in options.path_prefixes:
                    table.setdefault(host, []).append((prefix, name))
        return cls(
            {
                h: tuple(sorted(v, key=lambda b: len(b[0]), reverse=True))
                for h, v in table.items()
            }
        )

    def bindings_for(self, host: str) -> tuple[tuple[str, str], ...] | None:
        """
        Exact host, else the single-label wildcard C{*.rest}, else the default
        host C{""}.  The choice is final.
        """
        b = self.bindings
        found = b.get(host)
        if found is not None:
            return found
        dot = host.find(".", 1)
        if dot > 0:
            found = b.get("*" + host[dot:])
            if found is not None:
                return found
        return b.get("")

    def lookup(self, host: str, path: str) -> tuple[str, str] | None:
        """
        The (service name, matched prefix) for a request, or C{None}.  Prefixes
        match on segment boundaries: C{/app} matches C{/app} and C{/app/x} but
        not C{/appointment}.
        """
        return first_binding(self.bindings_for(host), path)


def first_binding(bindings: tuple[tuple[str, str], ...] | None,
                  path: str) -> tuple[str, str] | None:
    """
    The first of a host's bindings (longest prefix first) matching C{path},
    as C{(service name, prefix)}, or C{None}.
    """
    if not bindings:
        return None
    for prefix, name in bindings:
        if prefix == "/":
            return name, prefix
        if path.startswith(prefix):
            n = len(prefix)
            if len(path) == n or path[n] == "/":
                return name, prefix
    return None


#: the most Host values (as sent: port and case included) a L{Router}
#: remembers the bindings of; others are looked up each time
HOST_CACHE_SIZE = 1024


def strip_port(host: str) -> str:
    """
    C{example.com:8080} → C{example.com}; C{[::1]:80} → C{::1}.  Lower-cased.
    """
    if host.startswith("["):
        end = host.find("]")
        if end > 0:
            return host[1:end].lower()
        return host.lower()
    i = host.rfind(":")
    if i > 0 and host.count(":") == 1:
        host = host[:i]
    return host.lower().rstrip(".")


@implementer(IRouteMatch)
@frozen
class Match:
    service: Service
    prefix: str

    def target_path(self, path: str) -> str:
        """
        The path the target sees: the matched prefix stripped when the service
        strips prefixes.
        """
        if self.prefix == "/" or not self.service.options.strip_prefix:
            return path
        rest = path[len(self.prefix) :]
        return rest if rest.startswith("/") else "/" + rest


@implementer(IRouter)
class Router:
    def __init__(self) -> None:
        self.services: dict[str, Service] = {}
        self.table = RouteTable({})
        # one Match per (service name, prefix) found, made once: a match is
        # asked for every request (emptied with each new table)
        self._matches: dict[tuple[str, str], Match] = {}
        # the bindings of each Host value seen (requests carry the same few
        # hosts: the port stripped and the table searched once per host,
        # not per request), for the table they were found in
        self._hosts: dict[str, tuple[tuple[str, str], ...]] = {}
        self._hosts_table = self.table

    def match(self, host: str, path: str) -> Match | None:
        table = self.table
        hosts = self._hosts
        if self._hosts_table is not table:
            hosts = self._hosts = {}
            self._hosts_table = table
        bindings = hosts.get(host)
        if bindings is None:
            bindings = table.bindings_for(strip_port(host)) or ()
            if len(hosts) < HOST_CACHE_SIZE:
                hosts[host] = bindings
        found = first_binding(bindings, path)
        if found is None:
            return None
        m = self._matches.get(found)
        if m is None or m.service is not self.services[found[0]]:
            m = self._matches[found] = Match(self.services[found[0]], found[1])
        return m

    def check_conflicts(self, name: str, options: ServiceOptions) -> None:
        """
        @raise HostConflict: when another service already binds one of the
            same (host, prefix) pairs.
        """
        for other in self.services.values():
            if other.name == name:
                continue
            for host in options.hosts:
                if host not in other.options.hosts:
                    continue
                for prefix in options.path_prefixes:
                    if prefix in other.options.path_prefixes:
                        raise HostConflict.held_by(host, prefix, other.name)

    def install(self, service: Service) -> None:
        self.services[service.name] = service
        self._rebuild()

    def remove(self, name: str) -> Service | None:
        service = self.services.pop(name, None)
        self._rebuild()
        return service

    def _rebuild(self) -> None:
        self._matches = {}
        self.table = RouteTable.build(
            (s.name, s.options) for s in self.services.values()
        )
        self._inherit_tls()

    def _inherit_tls(self) -> None:
        """
        A service that does not serve C{/} takes its TLS and TLS-redirect
        flags from the service serving C{/} for its first host; without one,
        TLS is off and redirect on, as in kamal-proxy.  Otherwise such a service
        under an HTTPS host would refuse HTTPS requests.
        """
        for s in self.services.values():
            if "/" in s.options.path_prefixes:
                continue
            root = self.root_service_for(s.options.hosts[0])
            if root is None:
                flags = (False, True)
            else:
                flags = (root.options.tls_enabled, root.options.tls_redirect)
            if (s.options.tls_enabled, s.options.tls_redirect) != flags:
                s.options = attrs.evolve(
                    s.options, tls_enabled=flags[0], tls_redirect=flags[1]
                )

    def root_service_for(self, host: str) -> Service | None:
        """
        The service serving C{/} for a host name (used for TLS decisions).
        """
        m = self.match(host, "/")
        return None if m is None else m.service
