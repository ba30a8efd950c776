"""Outputs appear whole or not at all: write under a temporary name, then rename into place.

The one atomic writer of the project: :func:`atomic_file` (and :func:`write_atomically`),
:func:`atomic_directory` and :func:`create_once` fsync what they wrote and the directory they
renamed it into, so an output under its final name is whole and durable after a power loss.

Every writer names its temporaries with :func:`temp_name`: ``.<name>.tmp-<pid>-<host>-<id>``
beside the target (``.old-`` for a replaced output on its way out), and registers them in
:func:`writing` while it writes. A crash, or a failed attempt whose clean-up did not finish
(a full disk, writes still in flight), can leave one behind: :func:`sweep_temporaries`
removes exactly those that no live writer owns, and nothing else.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

from services.core.metrics import TEMPORARIES_SWEPT

COMPLETE_ATTR = "tilepipe_complete"
BASIS_ATTR = "tilepipe_basis"  # digest of what a store was computed from (`basis_digest`)
TEMPORARY = re.compile(
    r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d{1,10})-(?P<host>[0-9a-f]{8})-[0-9a-f]{8,32}\Z"
)
STORE_SUFFIX = ".zarr"  # a store's own files are not walked (chunks), its top level is

_writing: set[Path] = set()  # temporaries this process is writing now
_lock = threading.Lock()


def host_tag(host: str | None = None) -> str:
    """8 hex digits naming a host in temporary names (roots are shared between hosts)."""
    return hashlib.sha256((host or socket.gethostname()).encode()).hexdigest()[:8]


def temp_name(
    target: Path, kind: str = "tmp", pid: int | None = None, host: str | None = None
) -> Path:
    """The temporary name of `target` for this process (`kind` "tmp" or "old")."""
    owner = os.getpid() if pid is None else pid
    return Path(target).with_name(
        f".{Path(target).name}.{kind}-{owner}-{host_tag(host)}-{uuid.uuid4().hex[:8]}"
    )


@contextlib.contextmanager
def writing(tmp: Path) -> Iterator[Path]:
    """`tmp` belongs to a write in progress in this process: the sweeper leaves it alone."""
    with _lock:
        _writing.add(Path(tmp))
    try:
        yield tmp
    finally:
        with _lock:
            _writing.discard(Path(tmp))


@contextlib.contextmanager
def _staged(target: Path, discard: Callable[[Path], None]) -> Iterator[Path]:
    """A temporary name beside `target` (its parent created), registered in :func:`writing`
    while the caller writes and renames it; `discard` removes it if that fails."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(target)
    with writing(tmp):
        try:
            yield tmp
        except BaseException:
            discard(tmp)
            raise


@contextlib.contextmanager
def atomic_directory(target: Path, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary directory name beside `target` (created by the caller); on success
    its files and folders are fsynced (unless `fsync` is False), it is moved onto `target`
    (:func:`move_into_place`) and the parent directory is fsynced.

    On error the temporary directory is removed and `target` is left as it was. Readers never
    see a half-written directory under the final name.
    """
    target = Path(target)
    with _staged(target, lambda tmp: shutil.rmtree(tmp, ignore_errors=True)) as tmp:
        yield tmp
        if fsync:
            fsync_tree(tmp)
        move_into_place(tmp, target)
        if fsync:
            fsync_directory(target.parent)


@contextlib.contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yield a temporary file name beside `target` (the caller writes it); on success the file
    is fsynced, renamed onto `target` and the parent directory fsynced; on error it is removed
    (`target` untouched)."""
    target = Path(target)
    with _staged(target, lambda tmp: tmp.unlink(missing_ok=True)) as tmp:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, target)
        fsync_directory(target.parent)


def write_atomically(path: Path, data: str | bytes) -> Path:
    """Write `data` (text as UTF-8) to `path` through :func:`atomic_file`; returns `path`."""
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def move_into_place(tmp: Path, target: Path) -> None:
    """Rename the directory `tmp` onto `target`. An existing `target` is swapped out atomically
    (Linux ``renameat2(RENAME_EXCHANGE)``), elsewhere by two renames (a brief window where the
    name is absent, the old one under an ``.old-`` name), then deleted."""
    try:
        os.rename(tmp, target)  # atomic when target is absent (or an empty directory)
        return
    except OSError:
        if not (os.path.lexists(target) and os.path.lexists(tmp)):
            raise
    if _exchange(tmp, target):  # tmp now holds the old content
        _remove(tmp)
        return
    old = temp_name(target, "old")
    os.rename(target, old)
    os.rename(tmp, target)
    _remove(old)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux ``renameat2(RENAME_EXCHANGE)``; False if unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _remove(path: Path) -> None:
    """Delete a replaced output, directory or file (best effort: the sweeper finishes it)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.unlink(path)


def fsync_file(path: Path) -> None:
    """Flush a file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(path: Path) -> None:
    """Flush a directory's entries (renames, new names) to disk; a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root` (a directory about to be renamed in)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fsync_file(Path(dirpath, name))
        fsync_directory(Path(dirpath))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def abandoned(path: Path, max_age_s: float, now: float | None = None) -> bool:
    """Whether a temporary no live writer owns: this process's and not being written, this
    host's and its process gone, or older than `max_age_s` (another host's, a reused pid).
    False for any name that is not a temporary (final names are never touched)."""
    match = TEMPORARY.match(Path(path).name)
    if match is None:
        return False
    try:
        age = (time.time() if now is None else now) - os.lstat(path).st_mtime
    except FileNotFoundError:
        return False
    if age > max_age_s:
        return True
    if match["host"] != host_tag():
        return False  # its host's sweeper knows whether it lives
    pid = int(match["pid"])
    if pid == os.getpid():
        with _lock:
            return Path(path) not in _writing
    return not _alive(pid)


def sweep_temporaries(
    roots: Mapping[str, Path] | Iterable[Path], max_age_s: float, log=None
) -> list[Path]:
    """Remove the abandoned temporaries under `roots` (by name: "work", "output"; see
    :func:`abandoned`); returns them.

    Walks every directory but the insides of stores (`*.zarr`: only their top level, where
    attribute files are replaced) and of temporaries; each removal is counted in
    `tilepipe_temporaries_swept_total{root}` and the whole logged once (`temporaries_swept`).
    """

    removed: list[Path] = []
    named = roots.items() if isinstance(roots, Mapping) else ((Path(r).name, r) for r in roots)
    for label, root in named:
        root = Path(root)
        found = [p for p in _candidates(root) if abandoned(p, max_age_s)]
        for path in found:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            if not os.path.lexists(path):
                removed.append(path)
                TEMPORARIES_SWEPT.labels(label).inc()
        if found and log is not None:
            gone = [p for p in removed if p.is_relative_to(root)]
            log.info(
                "temporaries_swept",
                root=str(root),
                removed=len(gone),
                paths=[p.relative_to(root).as_posix() for p in gone[:20]],
            )
    return removed


def _candidates(root: Path) -> Iterator[Path]:
    """Temporary names under `root`, not descending into stores or temporaries."""
    pending = [(root, False)]
    while pending:
        folder, in_store = pending.pop()
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        for entry in entries:
            if TEMPORARY.match(entry.name):
                yield Path(entry.path)
            elif not in_store and entry.is_dir(follow_symlinks=False):
                pending.append((Path(entry.path), entry.name.endswith(STORE_SUFFIX)))


def zarr_attrs(store: Path) -> dict:
    """Attributes of a Zarr v3 group or array (empty if absent or unreadable)."""
    try:
        meta = json.loads((Path(store) / "zarr.json").read_text())
    except (OSError, ValueError):
        return {}
    return meta.get("attributes", {}) if isinstance(meta, dict) else {}


def basis_digest(value: object) -> str:
    """Digest of what an output is computed from (its inputs' identities and the parameters
    that affect it, as canonical JSON): the same basis, the same output."""
    body = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(body.encode()).hexdigest()[:32]


def is_complete(store: Path, **expected: object) -> bool:
    """Whether a store was finished by a stage (and its recorded inputs match `expected`)."""
    attrs = zarr_attrs(store)
    if not attrs.get(COMPLETE_ATTR):
        return False
    return all(attrs.get(key) == value for key, value in expected.items())


def create_once(target: Path, data: bytes) -> bool:
    """Write `data` to `target` only if it does not exist yet, atomically (a temporary file,
    fsynced, then hard-linked onto the name, which fails if another writer got there first).
    Returns whether this call created it; the first writer's content always stays."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(target)
    with writing(tmp):
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, target)
            except FileExistsError:
                return False
            fsync_directory(target.parent)
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
