#!/usr/bin/env python3
"""Sending over TLS on the socket: CPU per MiB by write-buffer size and piece size.

A sender process (pinned to --sender-cpu) accepts one TLS connection from a
receiver process (pinned to --receiver-cpu, which reads and discards), does
the handshake over memory BIOs as mproxy's listener does, moves the
connection onto its socket with mproxy.tls.sslbio (this checkout's, or
--tree's), and sends --mib MiB in pieces of --piece bytes: each piece is one
SSL_write followed by one flush of the buffering BIO, waiting for the socket
with select() when it is full.  It reports the sender's user and system CPU
per MiB (getrusage) and its write() calls per MiB, for each --write-buffer
size given (the buffering BIO's write side: 4096, OpenSSL's default, writes
each 16 KiB record with a write() of its own; a larger one gathers records
and sends them in fewer, larger write() calls, at the cost of a copy), and
the receiver's CPU per MiB.  A size with a "c" after it (278528c) runs with
TCP_CORK set around each piece's writes (TCP_NODELAY on, as mproxy's
client connections have it), so that the kernel sends what the piece's
writes queued at once, in fewer packets.

Usage: python3 bench/tls_send.py --write-buffer 4096,65536,278528,278528c [--mib 512]
           [--piece 262144] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import resource
import select
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def receiver(port: int, cafile: str) -> None:
    ctx = ssl.create_default_context(cafile=cafile)
    with socket.create_connection(("127.0.0.1", port)) as raw:
        with ctx.wrap_socket(raw, server_hostname=C.TLS_HOST) as s:
            buf = bytearray(262144)
            while s.recv_into(buf):
                pass


def _count_writes(pid: int) -> int:
    """write() calls of this process so far (/proc/PID/io syscw)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("syscw:"):
            return int(line.split()[1])
    return 0


def send_once(sslbio, cert: tuple[Path, Path], wbuf: int, piece: int, mib: int,
              receiver_cpu: list[str], cork: bool = False) -> dict:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    port = lsock.getsockname()[1]
    child = subprocess.Popen(receiver_cpu + [
        sys.executable, __file__, "--receive", str(port), "--cafile", str(cert[0])])
    conn, _ = lsock.accept()
    lsock.close()
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_side=True)
    while True:  # the handshake, blocking, over the memory BIOs
        try:
            obj.do_handshake()
            break
        except ssl.SSLWantReadError:
            data = out.read()
            if data:
                conn.sendall(data)
            inc.write(conn.recv(65536))
    conn.sendall(out.read())
    # the client's last handshake bytes are read by the handshake itself
    # (TLS 1.3: its Finished); nothing may be left in either BIO
    conn.setblocking(False)
    if inc.pending or out.pending:
        raise SystemExit("bytes left in the memory BIOs")
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    io = sslbio.attach(obj, inc, out, conn.fileno())
    if io is None:
        raise SystemExit("could not move the connection onto its socket")
    if wbuf != 4096:
        lib = io._lib
        if lib.BIO_int_ctrl(io._bio, 117, wbuf, 1) <= 0:
            raise SystemExit("could not set the write buffer")
    c = obj._sslobj
    payload = os.urandom(piece)
    n = mib * 1048576 // piece
    w0 = _count_writes(os.getpid())
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.monotonic()
    for _ in range(n):
        if cork:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
        while True:
            try:
                c.write(payload)
                break
            except ssl.SSLWantWriteError:
                select.select([], [conn], [])
        while True:
            r = io.flush()
            if r == 1:
                break
            if r < 0:
                raise SystemExit("flush failed")
            select.select([], [conn], [])
        if cork:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
    t1 = time.monotonic()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    w1 = _count_writes(os.getpid())
    io.detach()
    conn.close()
    _, _, child_usage = os.wait4(child.pid, 0)
    child.returncode = 0
    total = n * piece / 1048576
    return {"user_ms": (r1.ru_utime - r0.ru_utime) * 1000 / total,
            "sys_ms": (r1.ru_stime - r0.ru_stime) * 1000 / total,
            "writes": (w1 - w0) / total, "mib_s": total / (t1 - t0),
            "nvcsw": (r1.ru_nvcsw - r0.ru_nvcsw) / total,
            "receiver_ms": (child_usage.ru_utime + child_usage.ru_stime) * 1000 / total}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--receive", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--cafile", help=argparse.SUPPRESS)
    ap.add_argument("--write-buffer", default="4096,65536,278528")
    ap.add_argument("--piece", type=int, default=262144)
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sender-cpu", type=int, default=0)
    ap.add_argument("--receiver-cpu", type=int, default=1)
    ap.add_argument("--tree", default=str(C.REPO_ROOT))
    args = ap.parse_args(argv)
    if args.receive:
        receiver(args.receive, args.cafile)
        return 0
    sys.path.insert(0, args.tree)
    from mproxy.tls import sslbio

    pin = C.pin_prefix(args.receiver_cpu)
    os.sched_setaffinity(0, {args.sender_cpu})
    tmp = Path(tempfile.mkdtemp(prefix="tls-send-"))
    sizes = [x for x in args.write_buffer.split(",") if x]
    results: dict[str, list[dict]] = {s: [] for s in sizes}
    try:
        cert = C.make_cert(tmp)
        for rnd in range(args.rounds):
            for s in (sizes if rnd % 2 == 0 else sizes[::-1]):
                r = send_once(sslbio, cert, int(s.rstrip("c")), args.piece, args.mib, pin,
                              cork=s.endswith("c"))
                results[s].append(r)
                print(f"round {rnd + 1} write buffer {s}: user {r['user_ms']:.3f} sys "
                      f"{r['sys_ms']:.3f} ms/MiB, {r['writes']:.1f} writes/MiB, "
                      f"{r['mib_s']:.0f} MiB/s", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"piece {args.piece} B, {args.mib} MiB per run, medians of {args.rounds}:")
    for s, rs in results.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        print(f"  write buffer {s:>7}: user {med['user_ms']:.3f} + sys {med['sys_ms']:.3f} = "
              f"{med['user_ms'] + med['sys_ms']:.3f} ms/MiB; {med['writes']:.1f} write() per "
              f"MiB; {med['mib_s']:.0f} MiB/s; receiver {med['receiver_ms']:.3f} ms/MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
