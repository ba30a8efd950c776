"""Finding acquisitions: manifests under the raw root, cached, the rules their events must
follow, and their record in KV."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

from nats.js import JetStreamContext
from pydantic import ValidationError

from messages.events import AcquisitionFinished, AcquisitionStarted, TileArrived, TileCoord
from messages.paths import check_relative, resolve_in_root
from messages.subjects import event_filter, parse_subject
from services.core.errors import InvalidManifest
from services.core.manifest import Manifest, load_manifest
from services.state.buckets import Buckets, get_json, put_json
from services.state.eventlog import subjects_seen

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


def started_event(manifest: Manifest, manifest_rel: str) -> AcquisitionStarted:
    """The `acq_started` event of an acquisition (ValidationError if its fields break the
    event's limits)."""
    first = manifest.geometry(0)
    return AcquisitionStarted(
        acq=manifest.id,
        manifest=manifest_rel,
        slices=manifest.lattice.slices,
        mosaics=manifest.lattice.mosaics,
        rows=first.rows,
        cols=first.cols,
        tiles_expected=manifest.tiles,
        producer="watcher",
    )


def check_acquisition(manifest: Manifest, manifest_rel: str) -> AcquisitionStarted:
    """The one set of rules an acquisition must follow beyond its manifest's own: every event
    the watcher will publish for it must be valid (`acq_started`, a `tile_arrived` with the
    longest path its names can have, `acq_finished` of the whole lattice). `tilepipe check`
    and the watcher both call this, so a manifest that passes the check never fails the
    watcher. Returns the `acq_started` event; raises InvalidManifest naming every rule
    broken."""
    problems: list[str] = []

    def build(what: str, make):
        try:
            return make()
        except (ValidationError, ValueError) as exc:
            errors = exc.errors() if isinstance(exc, ValidationError) else [{"msg": str(exc)}]
            for err in errors[:5]:
                field = ".".join(str(p) for p in err.get("loc", ())) or "value"
                problems.append(f"{what}: {field}: {err['msg']}")
            return None

    _check_manifest_path(manifest_rel)
    started = build("acq_started", lambda: started_event(manifest, manifest_rel))
    base = acquisition_dir(manifest_rel)
    last = _last_tile(manifest)
    for name in manifest.longest_names():
        rel = f"{base}/{name}" if base else name
        build(
            f"tile_arrived of a tile named like {name!r} ({len(rel)} characters under the raw "
            "root)",
            lambda rel=rel: TileArrived(
                acq=manifest.id,
                tile=last,
                path=rel,
                manifest=manifest_rel,
                size_bytes=manifest.raw.expected_bytes,
                completed_at=datetime.now(UTC),
                raw_format=manifest.raw.format,
            ),
        )
    build(
        "acq_finished",
        lambda: AcquisitionFinished(acq=manifest.id, complete=True, tiles_arrived=manifest.tiles),
    )
    if problems:
        shown = manifest_rel if len(manifest_rel) <= 100 else manifest_rel[:100] + "..."
        raise InvalidManifest(f"{shown}: breaks the event rules: " + "; ".join(problems))
    return started


def _last_tile(manifest: Manifest) -> TileCoord:
    """The last tile in acquisition order (largest slice, mosaic and index)."""
    m = manifest.lattice.mosaics - 1
    g = manifest.geometry(m)
    row, col = g.row_col(g.tiles - 1)
    slices = manifest.lattice.slices
    return TileCoord(slice=slices - 1, mosaic=m, row=row, col=col, index=g.tiles - 1)


def _check_manifest_path(manifest_rel: str) -> None:
    """A manifest's path must be one events can carry (InvalidManifest otherwise)."""
    try:
        check_relative(manifest_rel)
    except ValueError as exc:
        shown = manifest_rel if len(manifest_rel) <= 100 else manifest_rel[:100] + "..."
        raise InvalidManifest(
            f"{shown}: breaks the event rules: manifest path ({len(manifest_rel)} characters): "
            f"{exc}"
        ) from None


def load_acquisition(raw_root: Path, manifest_rel: str) -> tuple[Manifest, AcquisitionStarted]:
    """The manifest at a raw-root-relative path and its `acq_started` event, checked by
    :func:`check_acquisition` (ManifestError, OSError or PathEscapeError otherwise)."""
    _check_manifest_path(manifest_rel)  # before it is resolved (a plain ValueError there)
    manifest = manifest_at(raw_root, manifest_rel)
    return manifest, check_acquisition(manifest, manifest_rel)


def acquisition_dir(manifest_rel: str) -> str:
    """Raw-root-relative directory an acquisition's file pattern is relative to."""
    parent = Path(manifest_rel).parent.as_posix()
    return "" if parent == "." else parent


async def record_acquisition(
    buckets: Buckets, manifest: Manifest, manifest_rel: str, state: str
) -> None:
    """Remember where an acquisition's manifest is (for stages and operator commands)."""
    record = {"manifest": manifest_rel, "state": state}
    await put_json(await buckets.kv(ACQ_BUCKET), manifest.id, record)


async def lookup_acquisition(buckets: Buckets, acq: str) -> dict | None:
    """The KV record of an acquisition, or None."""
    return await get_json(await buckets.kv(ACQ_BUCKET), acq)


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
