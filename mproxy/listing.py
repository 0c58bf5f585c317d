"""
What C{mproxy list} shows: one plain row per service (hosts, paths, the
active targets with their health, since when and their last error, the
rollout slot with its split, state, TLS and certificate states, requests in
flight), sorted by name, ready to be sent as JSON.
"""

from __future__ import annotations

import time
from typing import Any

from mproxy.balancer import LoadBalancer
from mproxy.router import Router
from mproxy.service import Service


def _health(lb: LoadBalancer) -> dict[str, str]:
    return {t.address: t.state.value for t in lb.targets}


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _target_health(lb: LoadBalancer) -> dict[str, dict[str, str]]:
    """
    Each target's health, when it entered it (UTC, ISO 8601) and the last
    failed check's or ejection's reason.
    """
    return {
        t.address: {"health": t.state.value, "since": _iso(t.since),
                    "last_error": t.last_error}
        for t in lb.targets
    }


def _rollout(service: Service) -> dict[str, Any] | None:
    if service.rollout is None:
        return None
    split = service.split
    return {
        "targets": service.rollout.addresses,
        "health": _health(service.rollout),
        "target_health": _target_health(service.rollout),
        "percent": split.percentage if split else None,
        "allowlist": list(split.allowlist) if split else [],
    }


def service_rows(router: Router, certificates: dict[str, str]) -> list[dict[str, Any]]:
    """
    The rows, given the certificate state per host name.
    """
    claimed = {h for s in router.services.values() for h in s.options.hosts if h}
    out = []
    for name in sorted(router.services):
        s = router.services[name]
        hosts = [h for h in s.options.hosts if h]
        if s.options.tls_on_demand_url:
            # Its certificates are for whichever names were approved.
            names = sorted(h for h in certificates if h not in claimed)
        else:
            names = hosts
        out.append(
            {
                "service": name,
                "hosts": hosts,
                "paths": list(s.options.path_prefixes),
                "targets": s.active.addresses,
                "health": _health(s.active),
                "target_health": _target_health(s.active),
                "rollout_targets": s.rollout.addresses if s.rollout else [],
                "rollout": _rollout(s),
                "state": s.state_name,
                "tls": s.options.tls_enabled,
                "certificates": {h: certificates[h] for h in names if h in certificates},
                "inflight": sum(lb.inflight() for lb in s.balancers()),
            }
        )
    return out
