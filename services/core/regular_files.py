"""Opening files that tilepipe reads but does not write (raw tiles, manifests, calibration
files): regular files only, and never an open or a read that can block.

A FIFO under a tile's or a manifest's name blocks a plain `open` until a writer comes (maybe
never), a device can block a read, a socket cannot be read as a file at all. Such a path is
refused with what it is, before it is opened; the open itself is non-blocking and the kind is
checked again on the open descriptor, so a file swapped for a FIFO in between is refused too.
The refusal is permanent (:class:`~services.core.errors.PermanentError`): a stage fails the input
at once instead of retrying or blocking a worker.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from services.core.errors import NotRegularFile

_KINDS = (
    (stat.S_ISDIR, "directory"),
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISLNK, "symbolic link"),
)
_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)


def file_kind(mode: int) -> str:
    """What a `st_mode` is, in words ("regular file", "FIFO", ...)."""
    if stat.S_ISREG(mode):
        return "regular file"
    return next((kind for test, kind in _KINDS if test(mode)), "special file")


def require_regular(mode: int, label: str) -> None:
    """Raise NotRegularFile, naming `label` and the kind, unless `mode` is a regular file."""
    if not stat.S_ISREG(mode):
        raise NotRegularFile(f"{label}: not a regular file ({file_kind(mode)})")


def open_regular(path: Path | str, label: str | None = None) -> BinaryIO:
    """Open a regular file for binary reading; anything else raises NotRegularFile (OSError
    as usual for a missing or unreadable file). `label` names the file in the message."""
    label = str(path) if label is None else label
    require_regular(os.stat(path).st_mode, label)  # a device is refused before it is opened
    fd = os.open(path, _FLAGS)  # non-blocking: a FIFO swapped in meanwhile opens at once
    try:
        require_regular(os.fstat(fd).st_mode, label)
        os.set_blocking(fd, True)  # a regular file: ordinary reads
        fh = os.fdopen(fd, "rb")
        fh.raw.name = os.fspath(path)  # as `open(path)` names it (readers show the name)
        return fh
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: Path | str, max_bytes: int, label: str | None = None) -> bytes:
    """The bytes of a regular file of at most `max_bytes` (ValueError if larger)."""
    label = str(path) if label is None else label
    with open_regular(path, label) as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > max_bytes:
            raise ValueError(f"{label}: {size} bytes; at most {max_bytes} are read")
        return fh.read(max_bytes + 1)
