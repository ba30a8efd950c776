"""Finding acquisitions: manifests under the raw root, cached, and their record in KV."""

from __future__ import annotations

import json
import os
from pathlib import Path

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError

from messages.events import TileCoord
from messages.paths import resolve_in_root
from messages.subjects import event_filter, parse_subject
from services.eventlog import subjects_seen
from services.manifest import Manifest, load_manifest

MANIFEST_NAME = "manifest.toml"
ACQ_BUCKET = "tp-acquisitions"
MAX_DEPTH = 4

_cache: dict[tuple[Path, int, int], Manifest] = {}


def manifest_at(raw_root: Path, rel: str) -> Manifest:
    """The manifest at a raw-root-relative path (cached while the file is unchanged)."""
    path = resolve_in_root(raw_root, rel)
    st = path.stat()
    key = (path, st.st_mtime_ns, st.st_size)
    if key not in _cache:
        _cache[key] = load_manifest(path)
    return _cache[key]


def find_manifests(raw_root: Path) -> list[str]:
    """Raw-root-relative paths of every `manifest.toml` up to MAX_DEPTH levels deep."""
    root = Path(raw_root)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        depth = len(Path(dirpath).relative_to(root).parts)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")] if depth < MAX_DEPTH else []
        if MANIFEST_NAME in filenames:
            found.append((Path(dirpath) / MANIFEST_NAME).relative_to(root).as_posix())
    return sorted(found)


def acquisition_dir(manifest_rel: str) -> str:
    """Raw-root-relative directory an acquisition's file pattern is relative to."""
    parent = Path(manifest_rel).parent.as_posix()
    return "" if parent == "." else parent


async def record_acquisition(
    js: JetStreamContext, manifest: Manifest, manifest_rel: str, state: str
) -> None:
    """Remember where an acquisition's manifest is (for stages and operator commands)."""
    kv = await js.key_value(ACQ_BUCKET)
    await kv.put(manifest.id, json.dumps({"manifest": manifest_rel, "state": state}).encode())


async def lookup_acquisition(js: JetStreamContext, acq: str) -> dict | None:
    """The KV record of an acquisition, or None."""
    kv = await js.key_value(ACQ_BUCKET)
    try:
        entry = await kv.get(acq)
    except KeyNotFoundError:
        return None
    return json.loads(entry.value) if entry and entry.value else None


def tile_key(tile: TileCoord) -> str:
    """`<slice>.<tile token>`: the tail of a tile's subjects, unique within an acquisition."""
    return f"{tile.slice}.{tile.token()}"


def missing_tiles(manifest: Manifest, arrived: set[str]) -> list[TileCoord]:
    """Tiles of the lattice without a `tile_arrived` event."""
    return [t for t in manifest.coords() if tile_key(t) not in arrived]


async def arrived_tiles(js: JetStreamContext, stream: str, acq: str) -> set[str]:
    """Tile keys of an acquisition that have a `tile_arrived` event in the log."""
    seen = await subjects_seen(js, stream, event_filter("tile_arrived", acq))
    return {parse_subject(s).key() for s in seen}
