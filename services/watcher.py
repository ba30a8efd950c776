"""The watcher: raw tile files become `tile_arrived` events the moment they are complete.

A file is complete when it has the manifest's byte size (TIFF: at least the payload size) and
has not been written for the settle interval, or at once when it was renamed into place from a
temporary name. Catch-up on start (every file already there), then live changes (watchfiles)
plus a periodic rescan. Exactly once: the event id is the tile's identity (`Nats-Msg-Id`), and
tiles that already have an event in the log are skipped after a restart.
Acquisitions are found as `manifest.toml` files under the raw root; an acquisition's file
pattern is relative to its manifest's directory. Raw files are only ever stat'ed here.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import watchfiles
from nats.js import JetStreamContext

from messages.events import AcquisitionFinished, AcquisitionStarted, TileArrived, TileCoord
from messages.paths import PathEscapeError, resolve_in_root
from messages.subjects import event_filter
from services.acquisitions import (
    MANIFEST_NAME,
    acquisition_dir,
    arrived_tiles,
    find_manifests,
    manifest_at,
    missing_tiles,
    record_acquisition,
    tile_key,
)
from services.bus import connect, publish_event
from services.config import Config
from services.eventlog import subjects_seen
from services.logs import get_logger
from services.manifest import Manifest, ManifestError
from services.metrics import (
    ACQ_FINISHED,
    ACQ_TILES_ARRIVED,
    ACQ_TILES_EXPECTED,
    WATCHER_FILES,
    WATCHER_LATENCY,
    WATCHER_PENDING,
)

PUBLISH_BATCH = 256
TEMP_SUFFIXES = (".tmp", ".part", ".partial", ".incomplete", "~")


def is_temporary(rel: str) -> bool:
    """Names writers use before renaming into place."""
    name = Path(rel).name
    return name.startswith(".") or name.endswith(TEMP_SUFFIXES)


@dataclass
class Acquisition:
    """What the watcher tracks of one acquisition."""

    manifest: Manifest
    manifest_rel: str
    base: str
    emitted: set[str] = field(default_factory=set)
    finished: bool = False

    def inner(self, rel: str) -> str | None:
        """`rel` relative to the acquisition directory, or None if outside it."""
        if not self.base:
            return rel
        prefix = self.base + "/"
        return rel[len(prefix) :] if rel.startswith(prefix) else None


class Watcher:
    """Turns complete raw files into events; one instance per raw root."""

    def __init__(self, config: Config, js: JetStreamContext) -> None:
        self.config = config
        self.js = js
        self.root = Path(config.roots.raw).resolve()
        self.stream = config.nats.stream
        self.acqs: dict[str, Acquisition] = {}
        self.pending: set[str] = set()
        self.reported: set[str] = set()
        self.log = get_logger(service="watcher")
        self.ready = asyncio.Event()

    # ------------------------------------------------------------------ acquisitions
    def settle_s(self, acq: Acquisition) -> float:
        override = self.config.watcher.settle_s
        return acq.manifest.settle_s if override is None else override

    async def discover(self, manifest_rel: str) -> Acquisition | None:
        """Start tracking the acquisition of a manifest (idempotent)."""
        base = acquisition_dir(manifest_rel)
        if base in self.acqs:
            return self.acqs[base]
        try:
            manifest = manifest_at(self.root, manifest_rel)
        except (ManifestError, OSError, PathEscapeError) as exc:
            if manifest_rel not in self.reported:
                self.reported.add(manifest_rel)
                self.log.error("manifest_invalid", manifest=manifest_rel, error=str(exc))
            return None
        if any(a.manifest.id == manifest.id for a in self.acqs.values()):
            self.log.error("duplicate_acquisition_id", acq=manifest.id, manifest=manifest_rel)
            return None
        acq = Acquisition(manifest, manifest_rel, base)
        acq.emitted = await arrived_tiles(self.js, self.stream, manifest.id)
        done = await subjects_seen(self.js, self.stream, event_filter("acq_finished", manifest.id))
        acq.finished = bool(done)
        started = await subjects_seen(
            self.js, self.stream, event_filter("acq_started", manifest.id)
        )
        self.acqs[base] = acq
        lat, first = manifest.lattice, manifest.geometry(0)
        ACQ_TILES_EXPECTED.labels(manifest.id).set(manifest.tiles)
        ACQ_TILES_ARRIVED.labels(manifest.id).set(len(acq.emitted))
        ACQ_FINISHED.labels(manifest.id).set(1 if acq.finished else 0)
        if not started:
            await publish_event(
                self.js,
                AcquisitionStarted(
                    acq=manifest.id,
                    manifest=manifest_rel,
                    slices=lat.slices,
                    mosaics=lat.mosaics,
                    rows=first.rows,
                    cols=first.cols,
                    tiles_expected=manifest.tiles,
                    producer="watcher",
                ),
            )
        await record_acquisition(
            self.js, manifest, manifest_rel, "finished" if acq.finished else "acquiring"
        )
        acq_root = self.root / base
        self.pending.update(  # files that arrived before their manifest
            self.rel(p) for p in acq_root.rglob("*") if p.is_file() and p.name != MANIFEST_NAME
        )
        self.log.info(
            "acquisition_found",
            acq=manifest.id,
            manifest=manifest_rel,
            tiles_expected=manifest.tiles,
            already_emitted=len(acq.emitted),
        )
        return acq

    def owner(self, rel: str) -> Acquisition | None:
        """The acquisition whose directory holds `rel` (deepest match)."""
        best = None
        for acq in self.acqs.values():
            if acq.inner(rel) is not None and (best is None or len(acq.base) > len(best.base)):
                best = acq
        return best

    # ------------------------------------------------------------------ files
    def rel(self, path: Path) -> str:
        """`path` relative to the raw root as listed, links not followed (`consider` refuses
        a file whose link leads out of the root)."""
        return path.relative_to(self.root).as_posix()

    def _skip(self, rel: str, outcome: str, **details: object) -> str:
        WATCHER_FILES.labels(outcome).inc()
        if rel not in self.reported:
            self.reported.add(rel)
            log = self.log.debug if outcome == "temporary" else self.log.warning
            log("file_skipped", path=rel, outcome=outcome, **details)
        return outcome

    async def consider(self, rel: str, renamed: bool = False) -> str:
        """Emit `rel` if it is a complete tile; returns the outcome."""
        if Path(rel).name == MANIFEST_NAME:
            await self.discover(rel)
            return "manifest"
        if is_temporary(rel):
            return self._skip(rel, "temporary")
        acq = self.owner(rel)
        if acq is None:
            return self._skip(rel, "unmatched", reason="no manifest covers this directory")
        inner = acq.inner(rel) or ""
        if acq.manifest.ignored(inner):
            WATCHER_FILES.labels("sidecar").inc()
            return "sidecar"
        try:
            tile = acq.manifest.parse(inner)
        except ValueError as exc:
            return self._skip(rel, "outside_lattice", reason=str(exc))
        if tile is None:
            return self._skip(rel, "unmatched", reason="name does not match the pattern")
        if tile_key(tile) in acq.emitted:
            return self._skip(rel, "duplicate", reason="tile already has its event")
        try:
            st = resolve_in_root(self.root, rel).stat()
        except PathEscapeError as exc:
            return self._skip(rel, "outside_root", reason=str(exc))
        except FileNotFoundError:
            return "vanished"
        layout = acq.manifest.geometry(tile.mosaic).raw
        if st.st_size < layout.expected_bytes:
            return "pending"
        if not renamed and time.time() - st.st_mtime < self.settle_s(acq):
            return "pending"
        await self._emit(acq, tile, rel, st.st_size, st.st_mtime)
        return "emitted"

    async def _emit(
        self, acq: Acquisition, tile: TileCoord, rel: str, size: int, mtime: float
    ) -> None:
        manifest = acq.manifest
        event = TileArrived(
            acq=manifest.id,
            tile=tile,
            path=rel,
            manifest=acq.manifest_rel,
            size_bytes=size,
            completed_at=datetime.fromtimestamp(mtime, UTC),
            raw_format=manifest.raw.format,
            producer="watcher",
        )
        ack = await publish_event(self.js, event)
        acq.emitted.add(tile_key(tile))
        WATCHER_FILES.labels("duplicate" if ack.duplicate else "emitted").inc()
        WATCHER_LATENCY.observe(max(0.0, time.time() - mtime))
        ACQ_TILES_ARRIVED.labels(manifest.id).set(len(acq.emitted))
        self.log.info("tile_arrived", acq=manifest.id, **tile.log_context(), path=rel)
        if len(acq.emitted) >= manifest.tiles and not acq.finished:
            await self.finish(acq, reason="lattice complete")

    async def finish(self, acq: Acquisition, reason: str) -> AcquisitionFinished:
        """Publish acquisition finished (complete, or declared with tiles missing)."""
        acq.finished = True
        missing = missing_tiles(acq.manifest, acq.emitted)
        event = AcquisitionFinished(
            acq=acq.manifest.id,
            complete=not missing,
            tiles_arrived=len(acq.emitted),
            missing=missing,
            reason=reason,
            producer="watcher",
        )
        await publish_event(self.js, event)
        acq.finished = True
        ACQ_FINISHED.labels(acq.manifest.id).set(1)
        await record_acquisition(self.js, acq.manifest, acq.manifest_rel, "finished")
        self.log.info(
            "acquisition_finished", acq=acq.manifest.id, missing=len(missing), reason=reason
        )
        return event

    # ------------------------------------------------------------------ loops
    async def scan(self) -> None:
        """Catch-up: every manifest, then every file under the raw root."""
        for manifest_rel in find_manifests(self.root):
            await self.discover(manifest_rel)
        for path in sorted(p for p in self.root.rglob("*") if p.is_file()):
            rel = self.rel(path)
            if Path(rel).name != MANIFEST_NAME:
                self.pending.add(rel)
        await self.check_pending()

    async def check_pending(self, renamed: frozenset[str] = frozenset()) -> None:
        """Consider every pending file; publishes run concurrently, in batches."""
        for rel in [p for p in self.pending if Path(p).name == MANIFEST_NAME]:
            self.pending.discard(rel)
            await self.discover(rel)  # before the tiles it covers
        paths = sorted(self.pending)
        for start in range(0, len(paths), PUBLISH_BATCH):
            batch = paths[start : start + PUBLISH_BATCH]
            outcomes = await asyncio.gather(
                *(self.consider(rel, renamed=rel in renamed) for rel in batch),
                return_exceptions=True,
            )
            for rel, outcome in zip(batch, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    # e.g. NATS restarting: keep the file, try again next tick
                    self.log.warning(
                        "emit_failed", path=rel, error=str(outcome) or type(outcome).__name__
                    )
                elif outcome != "pending":
                    self.pending.discard(rel)
        WATCHER_PENDING.set(len(self.pending))

    async def on_changes(self, changes: set[tuple[watchfiles.Change, str]]) -> None:
        """Handle one batch of filesystem changes."""
        deleted_temp = any(c == watchfiles.Change.deleted and is_temporary(p) for c, p in changes)
        renamed = set()
        for change, path in changes:
            if change == watchfiles.Change.deleted:
                continue
            try:
                rel = self.rel(Path(path))
            except ValueError:
                continue
            if Path(path).is_dir():
                # files created in a new directory before its watch was set up
                self.pending.update(self.rel(p) for p in Path(path).rglob("*") if p.is_file())
                continue
            self.pending.add(rel)
            if deleted_temp and change == watchfiles.Change.added:
                renamed.add(rel)
        await self.check_pending(frozenset(renamed))

    def tick_s(self) -> float:
        settles = [self.settle_s(a) for a in self.acqs.values()] or [1.0]
        return min(max(min(settles) / 4, 0.02), 1.0)

    async def run(self, stop: asyncio.Event) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        watch = asyncio.create_task(self._watch(stop))
        await asyncio.sleep(0.1)  # let the watch start before the catch-up scan
        await self.scan()
        self.ready.set()
        self.log.info("watcher_started", root=str(self.root), acquisitions=len(self.acqs))
        last_rescan = time.monotonic()
        try:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=self.tick_s())
                await self.check_pending()
                if time.monotonic() - last_rescan > self.config.watcher.rescan_s:
                    await self.scan()
                    last_rescan = time.monotonic()
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch

    async def _watch(self, stop: asyncio.Event) -> None:
        async for changes in watchfiles.awatch(
            self.root,
            watch_filter=None,
            debounce=50,
            step=20,
            stop_event=stop,
            force_polling=self.config.watcher.force_polling,
            recursive=True,
        ):
            try:
                await self.on_changes(changes)
            except Exception as exc:  # a bad file must never stop the watcher
                self.log.exception("change_handling_failed", error=str(exc))


async def run_watcher(config: Config, stop: asyncio.Event) -> None:
    """Entry point of the watcher service."""
    nc = await connect(config.nats, name="tilepipe-watcher")
    try:
        await Watcher(config, nc.jetstream()).run(stop)
    finally:
        with contextlib.suppress(Exception):
            await nc.flush(timeout=5)
        await nc.close()
