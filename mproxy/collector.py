"""
Start-up without Python's cyclic garbage collector.  Importing Twisted,
TLS and the proxy creates a few hundred thousand objects and no garbage
worth collecting, but the collector runs a hundred times meanwhile: about a
tenth of a process's start-up.  A process's entry point calls L{pause}
first thing, and L{resume} once it has imported and built what it runs:
the objects made so far are moved out of the collector's sight for good
(C{gc.freeze}), and it runs as usual from then on.
"""

from __future__ import annotations

import gc

_paused = False


def pause() -> None:
    """
    Stop the collector, unless someone else already did.
    """
    global _paused
    if gc.isenabled():
        gc.disable()
        _paused = True


def resume() -> None:
    """
    Freeze what exists and start the collector again, if L{pause} stopped
    it (else nothing).
    """
    global _paused
    if _paused:
        _paused = False
        gc.freeze()
        gc.enable()
