"""
Crash-safe file writes shared by the state file and the certificate store,
and the clean-up at start of the temporary files a crash left behind.
"""

from __future__ import annotations

import os
import stat
import tempfile
from typing import Any

#: The name prefix of L{atomic_write}'s temporary files.
TEMP_PREFIX = ".tmp-"


def atomic_write(path: str, data: bytes, mode: int = 0o644) -> None:
    """
    Write C{data} to C{path} atomically: temporary file in the same directory
    created with C{mode}, fsync, rename over C{path}, fsync the directory.
    """
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=directory)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def remove_stale_temporary_files(directory: str, logger: Any) -> list[str]:
    """
    Remove the temporary files of L{atomic_write} that a crash (or a full
    disk) left in C{directory} and below; call it at start, before anything
    writes there.  Symbolic links are neither followed nor removed.  Logs
    one line when it removed anything; returns the paths removed.
    """
    removed: list[str] = []
    for root, dirs, files in os.walk(directory):
        for name in files:
            if not name.startswith(TEMP_PREFIX):
                continue
            path = os.path.join(root, name)
            try:
                if not stat.S_ISREG(os.lstat(path).st_mode):
                    continue
                os.unlink(path)
            except OSError as e:
                logger.warn("Cannot remove a stale temporary file", path=path,
                            error=e.strerror or str(e))
                continue
            removed.append(path)
    if removed:
        logger.info("Removed temporary files left by an earlier run",
                    count=len(removed), paths=removed[:10])
    return removed
