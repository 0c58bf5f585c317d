# -*- test-case-name: tests.test_tls_direct -*-
"""
Moving an established TLS connection of the standard library's
C{ssl.SSLObject} from its two C{MemoryBIO}s onto its TCP socket, through
an OpenSSL buffering BIO (C{BIO_f_buffer} over C{BIO_s_socket}), with
ctypes: the standard library has no API for it.

Over memory BIOs every byte crosses user space three more times than it
must: into the incoming BIO (cleared first, then copied), out of it into
the record layer, and on the way out into the outgoing BIO (cleared,
copied) and out of it into a Python C{bytes}.  On the socket, OpenSSL
reads ciphertext from the kernel into the buffering BIO and writes its
records into it; the buffer keeps the number of C{send}/C{recv} calls per
MiB as low as one read per 256 KiB and one write per 64 KiB, instead of one per
16 KiB record.

The C{SSL} pointer is read from the C{_ssl._SSLSocket} object's layout
(CPython 3.11-3.14 with the GIL) and used only if OpenSSL reports, for it,
the two memory BIOs and the C{SSL_CTX} the Python objects hold.  Anything
else (another Python, a layout that does not match, a missing symbol)
gives C{None}: the connection stays on its memory BIOs.

    io = attach(sslobj, incoming, outgoing, fd)   # None: stay on memory BIOs
    io.flush()          # 1 all sent, 0 the socket is full, -1 an error
    io.grow(reads)      # a 256 KiB read (or 68 KiB write) buffer from now on (a busy connection)
    n, state = io.read_into(address, size)   # every record OpenSSL can read now, in one call
    io.detach()         # no more socket I/O (the fd is about to be closed)

C{read_into} decrypts record after record straight into C{size} bytes at
C{address} in one call from Python, where C{ssl.SSLObject.read} gives one
record per call (with its argument parsing, buffer export and GIL release
each time): OpenSSL's own loop does it.  A buffering BIO asked for more
bytes than its buffer holds reads them directly from the BIO below it,
again and again until that one fails or the request is filled; below it
is an SSL BIO over the connection's C{SSL} object, whose every read is one
C{SSL_read}.  The buffering BIO keeps nothing itself as long as every
request is larger than its buffer (L{BULK_MIN}).
"""

from __future__ import annotations

import _ssl
import ctypes
import ssl
import sys
import sysconfig
from typing import Any

__all__ = [
    "BULK_MIN", "BULK_READ_BUFFER", "BULK_WRITE_BUFFER", "DirectIO", "READ_ENDED",
    "READ_FULL", "READ_WANTS_READ", "READ_WANTS_WRITE", "attach", "available",
]

#: the buffering BIO's read buffer of a busy connection
BULK_READ_BUFFER = 262144
#: its write buffer: four 16 KiB records with their framing (22 bytes
#: each) and room to spare, so that a 64 KiB response leaves in one send
#: and a 256 KiB piece in four.  One send per 256 KiB piece cost more
#: (bench/README, "Every #12 row on an Intel VM"): get1m over HTTPS 1,314
#: against 1,088 us per MiB with bbr, 1,057 against 892 with cubic; the
#: client gets each 64 KiB sooner, and a large send outruns TCP's pacing
BULK_WRITE_BUFFER = 65536 + 4096

#: the smallest request L{DirectIO.read_into} takes: more than the 4 KiB
#: buffer of the buffering BIO it reads through, so that it reads past it
#: (a request that fitted would be buffered there, out of OpenSSL's sight)
BULK_MIN = 8192

#: how a L{DirectIO.read_into} ended: the bytes asked for were all read
#: (OpenSSL may hold more); the socket has nothing more for now; OpenSSL
#: must write first (the reply to a key update, the socket full); or it
#: stopped for something else (close_notify, an alert, a bad record, the end
#: of the stream), which the next C{SSLObject.read} reports as usual
READ_FULL = 0
READ_WANTS_READ = 1
READ_WANTS_WRITE = 2
READ_ENDED = 3

_P = ctypes.sizeof(ctypes.c_void_p)
_BIO_C_SET_BUFF_SIZE = 117
_BIO_C_SET_SSL = 109
_BIO_FLAGS_WRITE = 2
_BIO_CTRL_FLUSH = 11
_BIO_CTRL_PENDING = 10
_BIO_CTRL_WPENDING = 13
_BIO_FLAGS_SHOULD_RETRY = 8
_BIO_NOCLOSE = 0

_lib: Any = None
_loaded = False


def _layout_checked() -> bool:
    return (sys.implementation.name == "cpython" and not hasattr(sys, "getobjects")
            and not sysconfig.get_config_var("Py_GIL_DISABLED")
            and (3, 11) <= sys.version_info[:2] <= (3, 14))


def _load() -> Any:
    global _lib, _loaded
    if _loaded:
        return _lib
    _loaded = True
    if not _layout_checked():
        return None
    try:
        lib = ctypes.CDLL(_ssl.__file__)
        vp, cint, clong = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
        sigs = {
            "BIO_f_buffer": (vp, []),
            "BIO_f_ssl": (vp, []),
            "BIO_read": (cint, [vp, vp, cint]),
            "BIO_new": (vp, [vp]),
            "BIO_new_socket": (vp, [cint, cint]),
            "BIO_push": (vp, [vp, vp]),
            "BIO_free_all": (None, [vp]),
            "BIO_s_mem": (vp, []),
            "BIO_ctrl": (clong, [vp, cint, clong, vp]),
            "BIO_int_ctrl": (clong, [vp, cint, clong, cint]),
            "BIO_test_flags": (cint, [vp, cint]),
            "SSL_get_rbio": (vp, [vp]),
            "SSL_get_wbio": (vp, [vp]),
            "SSL_get_SSL_CTX": (vp, [vp]),
            "SSL_set_bio": (None, [vp, vp, vp]),
            "SSL_CTX_get_options": (ctypes.c_uint64, [vp]),
        }
        for name, (restype, argtypes) in sigs.items():
            f = getattr(lib, name)
            f.restype = restype
            f.argtypes = argtypes
    except (OSError, AttributeError):
        return None
    _lib = lib
    return lib


def available() -> bool:
    """
    Connections can be moved onto their sockets in this process.
    """
    return _load() is not None


def _field(obj: Any, index: int) -> int | None:
    """
    The pointer stored in C{obj}'s C{index}-th field after its object
    header.
    """
    return ctypes.c_void_p.from_address(id(obj) + (2 + index) * _P).value


class DirectIO:
    """
    The buffering BIO an C{SSL} object reads and writes its socket
    through.
    """

    def __init__(self, lib: Any, ssl_ptr: int, bio: int) -> None:
        self._lib = lib
        self._ssl = ssl_ptr
        self._bio: int | None = bio
        self.grown_reads = False
        self.grown_writes = False
        #: the buffering BIO over an SSL BIO that read_into reads through
        #: (made at its first use; 0: it could not be made)
        self._reader: int | None = None

    def flush(self) -> int:
        """
        Send what the buffer holds: 1 all of it, 0 the socket took only
        part (try again once it is writable), -1 an error (or detached).
        """
        bio = self._bio
        if bio is None:
            return -1
        lib = self._lib
        if lib.BIO_ctrl(bio, _BIO_CTRL_FLUSH, 0, None) > 0:
            return 1
        if lib.BIO_test_flags(bio, _BIO_FLAGS_SHOULD_RETRY):
            return 0
        return -1

    def unsent(self) -> int:
        """
        Bytes written by OpenSSL and not sent yet.
        """
        if self._bio is None:
            return 0
        return self._lib.BIO_ctrl(self._bio, _BIO_CTRL_WPENDING, 0, None)

    def unread(self) -> int:
        """
        Bytes read from the socket that OpenSSL has not taken yet.
        """
        if self._bio is None:
            return 0
        return self._lib.BIO_ctrl(self._bio, _BIO_CTRL_PENDING, 0, None)

    def grow(self, reads: bool) -> bool:
        """
        Give the buffer's read (C{reads}, L{BULK_READ_BUFFER} bytes) or
        write side (L{BULK_WRITE_BUFFER}) its large size, if that side is
        empty (resizing drops what it holds).
        C{True} once it has them.
        """
        bio = self._bio
        if bio is None:
            return False
        if (self.grown_reads if reads else self.grown_writes):
            return True
        lib = self._lib
        if lib.BIO_ctrl(bio, _BIO_CTRL_PENDING if reads else _BIO_CTRL_WPENDING, 0, None):
            return False
        size = BULK_READ_BUFFER if reads else BULK_WRITE_BUFFER
        if lib.BIO_int_ctrl(bio, _BIO_C_SET_BUFF_SIZE, size, 0 if reads else 1) <= 0:
            return False
        if reads:
            self.grown_reads = True
        else:
            self.grown_writes = True
        return True

    def read_into(self, address: int, size: int) -> tuple[int, int]:
        """
        Decrypt what OpenSSL can read now (from its buffer, then the
        socket) into the C{size} bytes at C{address}, record after record,
        in one call: how many bytes it wrote there and how it stopped
        (L{READ_FULL}, L{READ_WANTS_READ}, L{READ_WANTS_WRITE} or
        L{READ_ENDED}).  C{size} must be at least L{BULK_MIN}.  C{(0,
        READ_ENDED)} when this cannot be done (detached, or the BIOs could
        not be made): the caller reads with C{SSLObject.read}, which also
        tells what ended a read.
        """
        reader = self._reader
        if reader is None:
            reader = self._reader = self._make_reader()
        if not reader or self._bio is None:
            return 0, READ_ENDED
        if size < BULK_MIN:
            raise ValueError("read_into needs at least BULK_MIN bytes")
        lib = self._lib
        n = lib.BIO_read(reader, address, size)
        if n == size:
            return n, READ_FULL
        if n < 0:
            n = 0
        if lib.BIO_test_flags(reader, _BIO_FLAGS_SHOULD_RETRY):
            if lib.BIO_test_flags(reader, _BIO_FLAGS_WRITE):
                return n, READ_WANTS_WRITE
            return n, READ_WANTS_READ
        return n, READ_ENDED

    def _make_reader(self) -> int:
        """
        The buffering BIO over an SSL BIO over our C{SSL} object (which
        the SSL BIO neither shuts down nor frees), or 0.
        """
        lib = self._lib
        over = lib.BIO_new(lib.BIO_f_ssl())
        if not over:
            return 0
        # also makes the SSL's read BIO (our socket chain) the SSL BIO's
        # next, with a reference of its own, freed with the SSL BIO
        if lib.BIO_ctrl(over, _BIO_C_SET_SSL, _BIO_NOCLOSE, self._ssl) <= 0:
            lib.BIO_free_all(over)
            return 0
        top = lib.BIO_new(lib.BIO_f_buffer())
        if not top:
            lib.BIO_free_all(over)
            return 0
        return lib.BIO_push(top, over)

    def detach(self) -> None:
        """
        Give the C{SSL} object an empty memory BIO in place of the socket
        (freeing the buffers): whatever still calls it cannot reach the
        file descriptor, which may be reused once closed.
        """
        if self._bio is None:
            return
        self._bio = None
        lib = self._lib
        mem = lib.BIO_new(lib.BIO_s_mem())
        if mem:
            lib.SSL_set_bio(self._ssl, mem, mem)
        reader, self._reader = self._reader, 0
        if reader:
            # the SSL BIO's reference to the socket chain is the last one
            # (when the SSL object no longer holds it): freed with it
            lib.BIO_free_all(reader)


def attach(sslobj: Any, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO,
           fd: int) -> DirectIO | None:
    """
    Move C{sslobj} (an C{ssl.SSLObject} whose handshake is done, with
    nothing left in either memory BIO) onto socket C{fd}.  C{None}, and
    nothing changed, where that cannot be done safely.
    """
    lib = _load()
    if lib is None or incoming.pending or outgoing.pending:
        return None
    c_obj = getattr(sslobj, "_sslobj", None)
    if c_obj is None or type(c_obj).__name__ != "_SSLSocket":
        return None
    ssl_ptr = _field(c_obj, 1)
    in_bio = _field(incoming, 0)
    out_bio = _field(outgoing, 0)
    ctx = sslobj.context
    ctx_ptr = _field(ctx, 0)
    if not (ssl_ptr and in_bio and out_bio and ctx_ptr):
        return None
    # the pointers are what they seem only if OpenSSL agrees on all four
    if (lib.SSL_get_SSL_CTX(ssl_ptr) != ctx_ptr
            or lib.SSL_CTX_get_options(ctx_ptr) != ctx.options
            or lib.SSL_get_rbio(ssl_ptr) != in_bio
            or lib.SSL_get_wbio(ssl_ptr) != out_bio):
        return None
    sock = lib.BIO_new_socket(fd, _BIO_NOCLOSE)
    if not sock:
        return None
    buf = lib.BIO_new(lib.BIO_f_buffer())
    if not buf:
        lib.BIO_free_all(sock)
        return None
    chain = lib.BIO_push(buf, sock)
    # one BIO both ways (one reference each; the memory BIOs keep the
    # Python objects' references)
    lib.SSL_set_bio(ssl_ptr, chain, chain)
    return DirectIO(lib, ssl_ptr, chain)
