# -*- test-case-name: tests.test_tls_fill -*-
"""
A C{bytes} object that OpenSSL decrypts into in place, through ctypes.

A TLS connection's C{read} returns one record (at most 16 KiB) per call,
each in a C{bytes} of its own; a socket event that brings 256 KiB of a
large upload would then cost sixteen objects and a join that copies every
byte once more.  Here one C{bytes} of the event's size is made without
initialising it (C{PyBytes_FromStringAndSize(NULL, n)}), the records are
read straight into it through a writable memoryview over its data, and it
is shrunk to what was read (C{_PyBytes_Resize}) before anyone else sees
it.  The object is referenced only by its L{Filling} until then, which is
what shrinking in place requires.

Only on CPython 3.11-3.14 with the GIL (the layouts mproxy.tls.sslbio
checks) and only if a probe of the two functions behaves as expected;
elsewhere L{available} is C{False} and callers read record by record.

    f = Filling(size)              # f.view: size writable bytes (at f.address)
    n = sslobj.read(size, f.view)  # ... until done
    data = f.take(n)               # the bytes, n long; f is spent
"""

from __future__ import annotations

import ctypes
import sys
from typing import Any

from mproxy.tls.sslbio import _layout_checked

__all__ = ["Filling", "available"]

#: where a bytes object's data begins, from its address
_DATA = bytes.__basicsize__ - 1

_new: Any = None
_resize: Any = None
_decref: Any = None
_view: Any = None
#: where take() puts an address to read the object from
_slot = ctypes.c_void_p()
_slot_object = ctypes.py_object.from_address(ctypes.addressof(_slot))
_PyBUF_WRITE = 0x200
_loaded = False


def _load() -> bool:
    global _new, _resize, _decref, _view, _loaded
    if _loaded:
        return _new is not None
    _loaded = True
    if not _layout_checked():
        return False
    try:
        api = ctypes.pythonapi
        new = api.PyBytes_FromStringAndSize
        resize = api._PyBytes_Resize
        decref = api.Py_DecRef
        view = api.PyMemoryView_FromMemory
    except AttributeError:
        return False
    # plain addresses, not py_object: a py_object keeps its own reference
    # to the object it was made with, which a resize that moves the object
    # would leave pointing at freed memory
    new.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]
    new.restype = ctypes.c_void_p
    resize.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_ssize_t]
    resize.restype = ctypes.c_int
    decref.argtypes = [ctypes.c_void_p]
    decref.restype = None
    view.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int]
    view.restype = ctypes.py_object
    _new, _resize, _decref, _view = new, resize, decref, view
    # the probe: written through the view, shrunk (which moves a small
    # object), equal to what was written, and referenced once
    try:
        f = Filling(400)
        f.view[:5] = b"probe"
        got = f.take(5)
        ok = got == b"probe" and sys.getrefcount(got) == 2
    except Exception:
        ok = False
    if not ok:
        _new = _resize = _decref = _view = None
    return ok


def available() -> bool:
    """
    Records can be read into a L{Filling} in this process.
    """
    return _load()


class Filling:
    """
    A C{bytes} object of C{size} bytes being written through L{view};
    L{take} ends that and gives the object.
    """

    __slots__ = ("view", "_ptr", "_size")

    def __init__(self, size: int) -> None:
        # the address of a new object whose one reference is this Filling's
        # until take()
        ptr = _new(None, size)
        self._ptr: int | None = ptr
        self._size = size
        self.view: memoryview = _view(ptr + _DATA, size, _PyBUF_WRITE)

    @property
    def address(self) -> int:
        """
        Where the object's data begins (what L{view} covers), for a C
        function to write into until L{take}.
        """
        ptr = self._ptr
        assert ptr is not None
        return ptr + _DATA

    def take(self, n: int) -> bytes:
        """
        The object, shrunk to its first C{n} bytes (C{b""} for 0).  The
        view is released: nothing writes to the object after this.
        """
        self.view.release()
        ptr, self._ptr = self._ptr, None
        assert ptr is not None
        slot = _slot
        slot.value = ptr
        if n != self._size:
            _resize(ctypes.byref(slot), n)  # may move it; raises (then freed)
        obj = _slot_object.value  # a reference of its own
        _decref(slot.value)  # the Filling's
        slot.value = None
        return obj

    def __del__(self) -> None:
        # not taken (an exception on the way): the object is freed
        ptr = self._ptr
        if ptr is not None:
            self._ptr = None
            self.view.release()
            _decref(ptr)
