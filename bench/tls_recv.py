#!/usr/bin/env python3
"""Receiving over TLS on the socket: CPU and read() calls per MiB by read path.

The receiving counterpart of tls_send.py.  A sender process (pinned to
--sender-cpu, the standard library's ssl.SSLSocket) writes --mib MiB in
256 KiB pieces; the receiver (this process, pinned to --receiver-cpu) does
the handshake over memory BIOs as mproxy's listener does, moves the
connection onto its socket with mproxy.tls.sslbio (this checkout's, or
--tree's) and reads the way a bulk read event of mproxy.tls.fasttls does:
DirectIO.read_into into a 256 KiB buffer, again while it fills, then a
select() for the next event.  Each --path is one way of getting the
ciphertext from the kernel to OpenSSL's record buffer:

  buffered   mproxy's: the buffering BIO's 256 KiB read buffer (one read()
             per 256 KiB, then a copy of each record into the record buffer)
  readahead  the SSL object reads a socket BIO itself with read-ahead on
             and OpenSSL's record buffer (one record and a bit): one read()
             per record, no copy
  readahead:N  the same with a record buffer of N bytes
             (SSL_set_default_read_buffer_len): fewer read()s, but OpenSSL
             moves what is left of the buffer to its front before every record

It reports the receiver's user and system CPU per MiB (getrusage), its
read() calls per MiB (/proc/PID/io syscr) and the throughput, as medians of
--rounds alternated rounds.

Usage: python3 bench/tls_recv.py --path buffered,readahead,readahead:66000 [--mib 256]
           [--rounds 3]
"""

from __future__ import annotations

import argparse
import ctypes
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

PIECE = 262144
_SSL_CTRL_SET_READ_AHEAD = 41


def sender(port: int, cafile: str, mib: int) -> None:
    ctx = ssl.create_default_context(cafile=cafile)
    with socket.create_connection(("127.0.0.1", port)) as raw:
        with ctx.wrap_socket(raw, server_hostname=C.TLS_HOST) as s:
            data = os.urandom(PIECE)
            for _ in range(mib * 1048576 // PIECE):
                s.sendall(data)
            # read (the session tickets) until the receiver closes: closing
            # with them unread would reset the connection and drop the
            # receiver's last bytes
            try:
                while s.recv(65536):
                    pass
            except OSError:
                pass


def _count_reads(pid: int) -> int:
    """read() calls of this process so far (/proc/PID/io syscr)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("syscr:"):
            return int(line.split()[1])
    return 0


def _read_path(io, conn: socket.socket, path: str) -> None:
    """Set the connection's read path (see the module docstring)."""
    if path == "buffered":
        if not io.grow(True):
            raise SystemExit("could not grow the read buffer")
        return
    lib = io._lib
    new_socket = lib.BIO_new_socket
    sock = new_socket(conn.fileno(), 0)
    set0_rbio = lib.SSL_set0_rbio
    set0_rbio.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    set0_rbio.restype = None
    # the SSL object reads the socket itself; writes stay on the buffering BIO
    set0_rbio(io._ssl, sock)
    ctrl = lib.SSL_ctrl
    ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    ctrl.restype = ctypes.c_long
    ctrl(io._ssl, _SSL_CTRL_SET_READ_AHEAD, 1, None)
    if ":" in path:
        set_len = lib.SSL_set_default_read_buffer_len
        set_len.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        set_len.restype = None
        set_len(io._ssl, int(path.split(":", 1)[1]))


def receive_once(sslbio, cert: tuple[Path, Path], path: str, mib: int,
                 sender_cpu: list[str]) -> dict:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    port = lsock.getsockname()[1]
    child = subprocess.Popen(sender_cpu + [
        sys.executable, __file__, "--send", str(port), "--cafile", str(cert[0]),
        "--mib", str(mib)])
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
    conn.setblocking(False)
    if inc.pending or out.pending:
        raise SystemExit("bytes left in the memory BIOs")
    io = sslbio.attach(obj, inc, out, conn.fileno())
    if io is None:
        raise SystemExit("could not move the connection onto its socket")
    _read_path(io, conn, path)
    buf = ctypes.create_string_buffer(PIECE)
    address = ctypes.addressof(buf)
    want = mib * 1048576
    total = events = 0
    r0 = _count_reads(os.getpid())
    u0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.monotonic()
    state = sslbio.READ_WANTS_READ
    while total < want and state != sslbio.READ_ENDED:
        select.select([conn], [], [])
        events += 1
        while True:
            n, state = io.read_into(address, PIECE)
            total += n
            if state != sslbio.READ_FULL:
                break
    t1 = time.monotonic()
    u1 = resource.getrusage(resource.RUSAGE_SELF)
    r1 = _count_reads(os.getpid())
    io.detach()
    conn.close()
    child.wait(30)
    if total < want:
        raise SystemExit(f"{path}: the read ended after {total} of {want} bytes")
    got = total / 1048576
    return {"user_ms": (u1.ru_utime - u0.ru_utime) * 1000 / got,
            "sys_ms": (u1.ru_stime - u0.ru_stime) * 1000 / got,
            "reads": (r1 - r0) / got, "events": events / got, "mib_s": got / (t1 - t0)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--send", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--cafile", help=argparse.SUPPRESS)
    ap.add_argument("--path", default="buffered,readahead")
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sender-cpu", type=int, default=1)
    ap.add_argument("--receiver-cpu", type=int, default=0)
    ap.add_argument("--tree", default=str(C.REPO_ROOT))
    args = ap.parse_args(argv)
    if args.send:
        sender(args.send, args.cafile, args.mib)
        return 0
    sys.path.insert(0, args.tree)
    from mproxy.tls import sslbio

    pin = C.pin_prefix(args.sender_cpu)
    os.sched_setaffinity(0, {args.receiver_cpu})
    tmp = Path(tempfile.mkdtemp(prefix="tls-recv-"))
    paths = [p for p in args.path.split(",") if p]
    results: dict[str, list[dict]] = {p: [] for p in paths}
    try:
        cert = C.make_cert(tmp)
        for rnd in range(args.rounds):
            for p in (paths if rnd % 2 == 0 else paths[::-1]):
                r = receive_once(sslbio, cert, p, args.mib, pin)
                results[p].append(r)
                print(f"round {rnd + 1} {p}: user {r['user_ms']:.3f} sys {r['sys_ms']:.3f} "
                      f"ms/MiB, {r['reads']:.1f} reads/MiB, {r['mib_s']:.0f} MiB/s",
                      file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{args.mib} MiB per run in {PIECE} B pieces, medians of {args.rounds}:")
    for p, rs in results.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        print(f"  {p:>18}: user {med['user_ms']:.3f} + sys {med['sys_ms']:.3f} = "
              f"{med['user_ms'] + med['sys_ms']:.3f} ms/MiB; {med['reads']:.1f} read() per MiB; "
              f"{med['events']:.2f} events per MiB; {med['mib_s']:.0f} MiB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
