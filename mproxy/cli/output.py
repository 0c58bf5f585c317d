"""
What a person reads: the progress of waiting commands, the summary of a
finished deploy, and the C{list} table.

Colours and in-place updates are used only on a terminal, and never when
C{NO_COLOR} is set (colours) or C{TERM=dumb} (both).
"""

from __future__ import annotations

import os
from typing import IO, Any, Mapping


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def can_rewrite(stream: IO[str], environ: Mapping[str, str] = os.environ) -> bool:
    """
    Whether a status line may be rewritten in place on C{stream}.
    """
    return _isatty(stream) and environ.get("TERM") != "dumb"


def can_colour(stream: IO[str], environ: Mapping[str, str] = os.environ) -> bool:
    """
    Whether C{stream} gets ANSI colours (see U{https://no-color.org}).
    """
    return can_rewrite(stream, environ) and not environ.get("NO_COLOR")


class ProgressPrinter:
    """
    Shows what a waiting command is doing: one rewritten status line where
    that is possible, at most one plain line per phase otherwise.
    """

    def __init__(self, out: IO[str], environ: Mapping[str, str] = os.environ) -> None:
        self.out = out
        self.tty = can_rewrite(out, environ)
        self.seen: set[str] = set()
        self.width = 0

    def __call__(self, phase: str, detail: str) -> None:
        if phase == "done":
            self.finish()
            return
        text = detail or phase
        if self.tty:
            line = text[:200]
            pad = max(0, self.width - len(line))
            self.out.write("\r" + line + " " * pad)
            self.width = len(line)
        else:
            if phase in self.seen:
                return
            self.seen.add(phase)
            self.out.write(text + "\n")
        self.out.flush()

    def finish(self) -> None:
        if self.tty and self.width:
            self.out.write("\r" + " " * self.width + "\r")
            self.out.flush()
            self.width = 0

    def summary(self, line: str) -> None:
        """
        End with one line that stays.
        """
        self.finish()
        self.out.write(line + "\n")
        self.out.flush()


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def deploy_summary(service: str, answer: dict[str, Any], seconds: float,
                   rollout: bool = False) -> str:
    """
    The line a finished deploy leaves: what is serving now, how long it
    took, what the drain did.
    """
    targets = ", ".join(answer["targets"])
    drained, cut = answer.get("drained") or 0, answer.get("cut") or 0
    took = f"took {seconds:.1f}s"
    if drained:
        took += f"; drained {plural(drained, 'request')}, {cut} cut at the drain deadline"
    if rollout:
        return (f"{service}: rollout targets {targets} ready ({took}); "
                "send traffic with `mproxy rollout set`")
    return f"{service}: now serving {targets} ({took})"


def _tls_cell(r: dict[str, Any]) -> str:
    tls = "yes" if r["tls"] else "no"
    certs = r.get("certificates") or {}
    if r["tls"] and certs:
        # one state for all hosts: just the state; else which host has which
        by_state: dict[str, list[str]] = {}
        for host in r["hosts"]:
            if host in certs:
                by_state.setdefault(certs[host], []).append(host)
        if len(by_state) == 1:
            tls = f"yes ({next(iter(by_state))})"
        elif by_state:
            tls = "yes (" + "; ".join(
                f"{','.join(hosts)}: {state}" for state, hosts in by_state.items()
            ) + ")"
    return tls


def _since(iso: str) -> str:
    """
    C{2026-12-01T12:20:01Z} as C{2026-12-01 12:20:01Z}.
    """
    return iso.replace("T", " ")


def _target_cell(t: str, health: dict[str, str], details: dict[str, Any]) -> str:
    d = details.get(t)
    if d:
        text = f"{d['health']} since {_since(d['since'])}"
        if d["health"] == "unhealthy" and d.get("last_error"):
            text += f": {d['last_error']}"
        return f"{t} ({text})"
    return f"{t} ({health[t]})" if t in health else t


def _targets_cell(targets: list[str], health: dict[str, str],
                  details: dict[str, Any] | None = None) -> str:
    return ", ".join(_target_cell(t, health, details or {}) for t in targets)


def _rollout_cell(rollout: dict[str, Any] | None) -> str:
    if not rollout:
        return "-"
    cell = _targets_cell(rollout["targets"], rollout.get("health") or {},
                         rollout.get("target_health"))
    share = []
    if rollout.get("percent") is not None:
        share.append(f"{rollout['percent']}%")
    if rollout.get("allowlist"):
        share.append("allowlist " + ",".join(rollout["allowlist"]))
    return cell + "; " + (", ".join(share) if share else "no traffic")


NO_SERVICES = "No services deployed (deploy one with `mproxy deploy HOST:PORT`)\n"


def format_table(rows: list[dict[str, Any]], color: bool) -> str:
    """
    The C{list} table: Service, Host, Path, Target (with each target's
    health, since when, and why it is unhealthy), State, TLS, and Rollout when some service has a rollout slot.
    """
    if not rows:
        return NO_SERVICES
    header = ["Service", "Host", "Path", "Target", "State", "TLS"]
    with_rollout = any(r.get("rollout") for r in rows)
    if with_rollout:
        header.append("Rollout")
    body = []
    for r in rows:
        cells = [
            r["service"],
            ",".join(r["hosts"]) or "*",
            ",".join(r["paths"]),
            _targets_cell(r["targets"], r.get("health") or {}, r.get("target_health")),
            r["state"],
            _tls_cell(r),
        ]
        if with_rollout:
            cells.append(_rollout_cell(r.get("rollout")))
        body.append(cells)
    widths = [max(len(str(row[i])) for row in [header] + body) for i in range(len(header))]

    def line(cells: list[str], styles: list[str]) -> str:
        parts = []
        for cell, w, style in zip(cells, widths, styles):
            text = str(cell).ljust(w)
            parts.append(f"\x1b[{style}m{text}\x1b[0m" if color and style else text)
        return "  ".join(parts).rstrip() if not color else "  ".join(parts)

    out = [line(header, ["3;94"] * len(header))]
    for row in body:
        out.append(line(row, ["1;34"] + [""] * (len(row) - 1)))
    return "\n".join(out) + "\n"
