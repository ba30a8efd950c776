"""Outputs appear whole or not at all: write under a temporary name, then rename into place."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

COMPLETE_ATTR = "tilepipe_complete"


@contextlib.contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temporary directory beside `target`; on success it replaces `target`.

    On error the temporary directory is removed and `target` is left as it was. Readers never
    see a half-written directory under the final name.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yield a temporary file path beside `target`; on success it is flushed to disk and
    renamed onto `target`, on error removed (`target` untouched)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def zarr_attrs(store: Path) -> dict:
    """Attributes of a Zarr v3 group or array (empty if absent or unreadable)."""
    try:
        meta = json.loads((Path(store) / "zarr.json").read_text())
    except (OSError, ValueError):
        return {}
    return meta.get("attributes", {}) if isinstance(meta, dict) else {}


def is_complete(store: Path, **expected: object) -> bool:
    """Whether a store was finished by a stage (and its recorded inputs match `expected`)."""
    attrs = zarr_attrs(store)
    if not attrs.get(COMPLETE_ATTR):
        return False
    return all(attrs.get(key) == value for key, value in expected.items())
