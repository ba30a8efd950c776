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
import os
import stat
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import nats.errors
import watchfiles
from nats.js import JetStreamContext

from messages.events import AcquisitionFinished, AcquisitionStarted, TileArrived, TileCoord
from messages.paths import PathEscapeError, resolve_in_root
from messages.subjects import event_filter
from services.core.config import Config
from services.core.errors import ManifestError
from services.core.logs import get_logger
from services.core.manifest import Manifest
from services.core.metrics import (
    ACQ_FINISHED,
    ACQ_TILES_ARRIVED,
    ACQ_TILES_EXPECTED,
    WATCHER_FILES,
    WATCHER_LATENCY,
    WATCHER_PENDING,
    WATCHER_PUBLISH_FAILURES,
    WATCHER_REFUSED,
    WATCHER_STALLED,
)
from services.core.regular_files import file_kind
from services.runtime.bus import connect, publish_event
from services.runtime.transport import NatsTransport
from services.state.acquisitions import (
    MANIFEST_NAME,
    acquisition_dir,
    arrived_tiles,
    find_manifests,
    load_acquisition,
    missing_tiles,
    record_acquisition,
    tile_key,
)
from services.state.eventlog import subjects_seen

PUBLISH_BATCH = 256
TEMP_SUFFIXES = (".tmp", ".part", ".partial", ".incomplete", "~")
FUTURE_SLACK_S = 1.0  # an mtime further ahead of this host's clock is a clock skew
TRANSIENT = (nats.errors.Error, asyncio.TimeoutError, ConnectionError)


def is_temporary(rel: str) -> bool:
    """Names writers use before renaming into place."""
    name = Path(rel).name
    return name.startswith(".") or name.endswith(TEMP_SUFFIXES)


Stamp = tuple[int, int]  # (size, mtime_ns) of a file


@dataclass
class Acquisition:
    """What the watcher tracks of one registered acquisition."""

    manifest: Manifest
    manifest_rel: str
    base: str
    emitted: set[str] = field(default_factory=set)  # tile keys with a tile_arrived event
    before: set[str] = field(default_factory=set)  # of those, logged before this process
    announced: dict[str, Stamp] = field(default_factory=dict)  # path -> stamp when announced
    finished: bool = False  # an acq_finished is in the log

    def inner(self, rel: str) -> str | None:
        """`rel` relative to the acquisition directory, or None if outside it."""
        return inside(self.base, rel)


def inside(base: str, rel: str) -> str | None:
    """`rel` relative to the directory `base`, or None if outside it."""
    if not base:
        return rel
    prefix = base + "/"
    return rel[len(prefix) :] if rel.startswith(prefix) else None


class Retry:
    """Pacing of the watcher's publishes while NATS fails them (down, stream full): one
    backoff for every publish, and failures logged at most once per `report_s` with how many
    there were (a full stream must not turn into thousands of log lines a minute)."""

    def __init__(self, log, first_s: float = 0.5, max_s: float = 30.0, report_s: float = 60.0):
        self.log = log
        self.first_s, self.max_s, self.report_s = first_s, max_s, report_s
        self.delay = 0.0
        self.retry_at = 0.0
        self.reported_at = -float("inf")
        self.unreported = 0
        self.failures = 0

    def ready(self) -> bool:
        return time.monotonic() >= self.retry_at

    def failed(self, exc: BaseException, **context: object) -> None:
        WATCHER_PUBLISH_FAILURES.inc()
        now = time.monotonic()
        self.delay = min(max(self.delay * 2, self.first_s), self.max_s)
        self.retry_at = now + self.delay
        self.failures += 1
        self.unreported += 1
        if now - self.reported_at >= self.report_s:
            self.log.warning(
                "publish_failed",
                error=str(exc) or type(exc).__name__,
                failures=self.unreported,
                retry_in_s=self.delay,
                **context,
            )
            self.reported_at, self.unreported = now, 0

    def succeeded(self) -> None:
        if self.failures:
            self.log.info("publish_recovered", failures=self.failures)
        self.delay, self.retry_at, self.failures, self.unreported = 0.0, 0.0, 0, 0
        self.reported_at = -float("inf")


class Watcher:
    """Turns complete raw files into events; one instance per raw root.

    Acquisitions are isolated: a manifest that cannot be used (invalid, breaking the event
    rules of :func:`services.state.acquisitions.check_acquisition`, a duplicate id, not a regular
    file) is refused, logged once (`acquisition_refused`) and counted, its files are skipped,
    and every other acquisition goes on. An acquisition is registered (its files announced)
    only once its `acq_started` event is in the log; until then it is retried.
    """

    def __init__(self, config: Config, js: JetStreamContext) -> None:
        self.config = config
        self.js = js
        self.buckets = NatsTransport(js, config.nats.stream)
        self.root = Path(config.roots.raw).resolve()
        self.stream = config.nats.stream
        self.acqs: dict[str, Acquisition] = {}  # base -> registered acquisition
        self.refused: dict[str, tuple[str, str]] = {}  # manifest -> (base, reported error)
        self.unregistered: dict[str, str] = {}  # manifest -> base: valid, not registered yet
        self.pending: set[str] = set()
        self.reported: set[str] = set()
        self.changing: dict[str, tuple[Stamp, float]] = {}  # path -> stamp, first seen (mono)
        self.stalled: dict[str, Stamp] = {}  # partial files reported as stalled
        self.log = get_logger(service="watcher")
        self.retry = Retry(self.log)
        self.ready = asyncio.Event()

    # ------------------------------------------------------------------ acquisitions
    def settle_s(self, acq: Acquisition) -> float:
        override = self.config.watcher.settle_s
        return acq.manifest.settle_s if override is None else override

    async def discover(self, manifest_rel: str) -> Acquisition | None:
        """Start tracking the acquisition of a manifest (idempotent). Never raises: a bad
        manifest is refused, a registration NATS fails is retried later."""
        base = acquisition_dir(manifest_rel)
        if base in self.acqs:
            return self.acqs[base]
        try:
            manifest, started = load_acquisition(self.root, manifest_rel)
        except (ManifestError, OSError, PathEscapeError) as exc:
            self._refuse(manifest_rel, base, "invalid", str(exc))
            return None
        except Exception as exc:  # a manifest must never stop the watcher
            self._refuse(manifest_rel, base, "error", f"{type(exc).__name__}: {exc}")
            return None
        other = next((a for a in self.acqs.values() if a.manifest.id == manifest.id), None)
        if other is not None:
            error = f"acquisition id {manifest.id!r} is already that of {other.manifest_rel}"
            self._refuse(manifest_rel, base, "duplicate_id", error)
            return None
        if self.refused.pop(manifest_rel, None) is not None:
            WATCHER_REFUSED.set(len(self.refused))
            self.log.info("acquisition_accepted", acq=manifest.id, manifest=manifest_rel)
        self.unregistered[manifest_rel] = base  # its files wait until it is registered
        if not self.retry.ready():
            return None
        try:
            acq = await self._register(manifest, manifest_rel, base, started)
        except Exception as exc:  # NATS down, stream full: registered on a later try
            self.retry.failed(exc, acq=manifest.id, manifest=manifest_rel)
            return None
        self.retry.succeeded()
        del self.unregistered[manifest_rel]
        self.acqs[base] = acq
        self.pending.update(  # files that arrived before their manifest was registered
            self.rel(p)
            for p in (self.root / base).rglob("*")
            if p.name != MANIFEST_NAME and not p.is_dir()
        )
        self.log.info(
            "acquisition_found",
            acq=manifest.id,
            manifest=manifest_rel,
            tiles_expected=manifest.tiles,
            already_emitted=len(acq.emitted),
        )
        return acq

    async def _register(
        self, manifest: Manifest, manifest_rel: str, base: str, started: AcquisitionStarted
    ) -> Acquisition:
        """What the log knows of an acquisition; its `acq_started` published if missing.
        Nothing is kept unless every step succeeds (the caller retries the whole)."""
        acq = Acquisition(manifest, manifest_rel, base)
        acq.emitted = await arrived_tiles(self.js, self.stream, manifest.id)
        acq.before = set(acq.emitted)
        await self.refresh_finished(acq)
        seen = await subjects_seen(self.js, self.stream, event_filter("acq_started", manifest.id))
        if not seen:
            await publish_event(self.js, started)
        await record_acquisition(
            self.buckets, manifest, manifest_rel, "finished" if acq.finished else "acquiring"
        )
        ACQ_TILES_EXPECTED.labels(manifest.id).set(manifest.tiles)
        ACQ_TILES_ARRIVED.labels(manifest.id).set(len(acq.emitted))
        ACQ_FINISHED.labels(manifest.id).set(1 if acq.finished else 0)
        return acq

    async def refresh_finished(self, acq: Acquisition) -> None:
        """Whether the log holds an `acq_finished` (the watcher's or `tilepipe finish`'s)."""
        if not acq.finished:
            done = await subjects_seen(
                self.js, self.stream, event_filter("acq_finished", acq.manifest.id)
            )
            acq.finished = bool(done)

    def _refuse(self, manifest_rel: str, base: str, reason: str, error: str) -> None:
        """Refuse an acquisition: logged once per error, counted while it stands."""
        self.unregistered.pop(manifest_rel, None)
        known = self.refused.get(manifest_rel)
        self.refused[manifest_rel] = (base, error)
        WATCHER_REFUSED.set(len(self.refused))
        if known is None or known[1] != error:
            self.log.error(
                "acquisition_refused", manifest=manifest_rel, reason=reason, error=error[:4000]
            )

    def owner(self, rel: str) -> Acquisition | None:
        """The acquisition whose directory holds `rel` (deepest match)."""
        best = None
        for acq in self.acqs.values():
            if acq.inner(rel) is not None and (best is None or len(acq.base) > len(best.base)):
                best = acq
        return best

    def _not_registered(self, rel: str, owner: Acquisition | None) -> str | None:
        """ "waiting" or "refused" when the deepest acquisition holding `rel` is one not
        registered yet or refused; None otherwise."""
        depth = -1 if owner is None else len(owner.base)
        found = None
        for state, bases in (
            ("waiting", self.unregistered.values()),
            ("refused", (base for base, _ in self.refused.values())),
        ):
            for base in bases:
                if inside(base, rel) is not None and len(base) > depth:
                    depth, found = len(base), state
        return found

    # ------------------------------------------------------------------ files
    def rel(self, path: Path) -> str:
        """`path` relative to the raw root as listed, links not followed (`consider` refuses
        a file whose link leads out of the root)."""
        return path.relative_to(self.root).as_posix()

    def _skip(
        self, rel: str, outcome: str, acq: Acquisition | None = None, once: bool = True, **details
    ) -> str:
        """Skip a file: counted and logged the first time (every rescan sees it again), or
        every time with `once=False` (a duplicate: each is a change of the file)."""
        self._forget(rel)
        if once and rel in self.reported:
            return outcome
        self.reported.add(rel)
        WATCHER_FILES.labels(outcome).inc()
        quiet = outcome in ("temporary", "refused", "sidecar")
        context = {"acq": acq.manifest.id} if acq is not None else {}
        (self.log.debug if quiet else self.log.warning)(
            "file_skipped", path=rel, outcome=outcome, **context, **details
        )
        return outcome

    def _forget(self, rel: str) -> None:
        self.changing.pop(rel, None)
        self.stalled.pop(rel, None)

    def _unchanged_for(self, rel: str, stamp: Stamp) -> float:
        """Seconds (this host's clock) since `rel` was first seen as it is now."""
        now = time.monotonic()
        seen = self.changing.get(rel)
        if seen is None or seen[0] != stamp:
            self.changing[rel] = (stamp, now)
            self.stalled.pop(rel, None)
            return 0.0
        return now - seen[1]

    def _settled(self, acq: Acquisition, rel: str, st: os.stat_result) -> bool:
        """No write for `settle_s`: by the file's mtime, or, when the mtime lies ahead of this
        host's clock (a clock skew; logged once), by how long it has been seen unchanged."""
        stamp = (st.st_size, st.st_mtime_ns)
        unchanged = self._unchanged_for(rel, stamp)
        ahead = st.st_mtime - time.time()
        if ahead <= FUTURE_SLACK_S:
            return -ahead >= self.settle_s(acq)
        key = f"future:{rel}"
        if key not in self.reported:
            self.reported.add(key)
            self.log.warning(
                "file_mtime_in_future",
                acq=acq.manifest.id,
                path=rel,
                ahead_s=round(ahead, 3),
                hint="settled by this host's clock; check the clocks of the acquisition PC "
                "and the file server",
            )
        return unchanged >= self.settle_s(acq)

    def _check_stalled(self, acq: Acquisition, rel: str, st: os.stat_result, want: int) -> None:
        """Report once a partial file that has stopped growing for `stalled_s`."""
        stamp = (st.st_size, st.st_mtime_ns)
        unchanged = self._unchanged_for(rel, stamp)
        if unchanged >= self.config.watcher.stalled_s and rel not in self.stalled:
            self.stalled[rel] = stamp
            self.log.warning(
                "file_stalled",
                acq=acq.manifest.id,
                path=rel,
                size_bytes=st.st_size,
                expected_bytes=want,
                unchanged_s=round(unchanged, 1),
            )

    async def consider(self, rel: str, renamed: bool = False) -> str:
        """Emit `rel` if it is a complete tile; returns the outcome."""
        if Path(rel).name == MANIFEST_NAME:
            await self.discover(rel)
            return "manifest"
        if is_temporary(rel):
            return self._skip(rel, "temporary")
        acq = self.owner(rel)
        state = self._not_registered(rel, acq)
        if state == "waiting":
            return "pending"  # announced once its acquisition is registered
        if state == "refused":
            return self._skip(rel, "refused", reason="its acquisition is refused")
        if acq is None:
            return self._skip(rel, "unmatched", reason="no manifest covers this directory")
        inner = acq.inner(rel) or ""
        if acq.manifest.ignored(inner):
            return self._skip(rel, "sidecar", acq)
        try:
            tile = acq.manifest.parse(inner)
        except ValueError as exc:
            return self._skip(rel, "outside_lattice", acq, reason=str(exc))
        if tile is None:
            return self._skip(rel, "unmatched", acq, reason="name does not match the pattern")
        try:
            st = resolve_in_root(self.root, rel).stat()
        except PathEscapeError as exc:
            return self._skip(rel, "outside_root", acq, reason=str(exc))
        except FileNotFoundError:
            self._forget(rel)
            return "vanished"
        if not stat.S_ISREG(st.st_mode):  # only regular files are ever announced or opened
            kind = file_kind(st.st_mode)
            return self._skip(rel, "not_regular", acq, reason=f"not a regular file ({kind})")
        want = acq.manifest.geometry(tile.mosaic).raw.expected_bytes
        if tile_key(tile) in acq.emitted:
            return self._announced(acq, rel, tile, st, want, renamed)
        if st.st_size < want:
            self._check_stalled(acq, rel, st, want)
            return "pending"
        if not self._settled(acq, rel, st) and not renamed:
            return "pending"
        await self._emit(acq, tile, rel, st)
        return "emitted"

    def _announced(
        self,
        acq: Acquisition,
        rel: str,
        tile: TileCoord,
        st: os.stat_result,
        want: int,
        renamed: bool,
    ) -> str:
        """A file of a tile that already has its event: a duplicate only when it changed
        after the event (rewritten, or another file of the tile), counted and logged once per
        change when the change is complete; else nothing (every rescan sees every tile)."""
        stamp = (st.st_size, st.st_mtime_ns)
        known = acq.announced.get(rel)
        if known is None and tile_key(tile) in acq.before:
            acq.announced[rel] = stamp  # announced by an earlier run: as it is now
            return "known"
        if known == stamp:
            self._forget(rel)
            return "known"
        if st.st_size < want or not (renamed or self._settled(acq, rel, st)):
            return "pending"
        acq.announced[rel] = stamp
        return self._skip(
            rel,
            "duplicate",
            acq,
            once=False,
            reason="changed after its tile_arrived event; not announced again (tilepipe replay "
            "convert reprocesses a re-acquired tile)",
            slice=tile.slice,
            tile=tile.token(),
        )

    async def _emit(self, acq: Acquisition, tile: TileCoord, rel: str, st: os.stat_result) -> None:
        manifest = acq.manifest
        now = time.time()
        event = TileArrived(
            acq=manifest.id,
            tile=tile,
            path=rel,
            manifest=acq.manifest_rel,
            size_bytes=st.st_size,
            completed_at=datetime.fromtimestamp(min(st.st_mtime, now), UTC),
            raw_format=manifest.raw.format,
            producer="watcher",
        )
        ack = await publish_event(self.js, event)
        acq.emitted.add(tile_key(tile))
        acq.announced[rel] = (st.st_size, st.st_mtime_ns)
        self._forget(rel)
        WATCHER_FILES.labels("duplicate" if ack.duplicate else "emitted").inc()
        WATCHER_LATENCY.observe(max(0.0, now - st.st_mtime))
        ACQ_TILES_ARRIVED.labels(manifest.id).set(len(acq.emitted))
        self.log.info("tile_arrived", acq=manifest.id, **tile.log_context(), path=rel)
        if acq.finished and tile_key(tile) not in acq.before:
            await self.finish(acq, reason="late tiles arrived after the acquisition finished")
        elif len(acq.emitted) >= manifest.tiles and not acq.finished:
            await self.finish(acq, reason="lattice complete")

    async def finish(self, acq: Acquisition, reason: str) -> AcquisitionFinished:
        """Publish acquisition finished (complete, or declared with tiles missing; again when
        a tile arrives late, without it, so what derives from the latest is right)."""
        missing = missing_tiles(acq.manifest, acq.emitted)
        event = AcquisitionFinished(
            acq=acq.manifest.id,
            complete=not missing,
            tiles_arrived=len(acq.emitted),
            missing=missing,
            reason=reason if missing or not acq.finished else f"{reason}; lattice complete",
            producer="watcher",
        )
        late = acq.finished  # the first keeps the plain id: a restart re-publishes nothing
        await publish_event(
            self.js, event, msg_id=f"{event.msg_id()}:{len(acq.emitted)}" if late else None
        )
        acq.finished = True
        ACQ_FINISHED.labels(acq.manifest.id).set(1)
        await record_acquisition(self.buckets, acq.manifest, acq.manifest_rel, "finished")
        self.log.info(
            "acquisition_finished", acq=acq.manifest.id, missing=len(missing), reason=reason
        )
        return event

    # ------------------------------------------------------------------ loops
    async def scan(self) -> None:
        """Catch-up: every manifest, then every file under the raw root (special files too:
        they are reported, never opened)."""
        manifests = find_manifests(self.root)
        for gone in set(self.refused) - set(manifests):
            del self.refused[gone]
        for gone in set(self.unregistered) - set(manifests):
            del self.unregistered[gone]
        WATCHER_REFUSED.set(len(self.refused))
        for manifest_rel in manifests:
            await self.discover(manifest_rel)
        for acq in list(self.acqs.values()):
            try:
                await self.refresh_finished(acq)  # `tilepipe finish` while we run
            except TRANSIENT as exc:
                self.retry.failed(exc, acq=acq.manifest.id)
        for path in sorted(p for p in self.root.rglob("*") if not p.is_dir()):
            rel = self.rel(path)
            if Path(rel).name != MANIFEST_NAME:
                self.pending.add(rel)
        await self.check_pending()

    async def check_pending(self, renamed: frozenset[str] = frozenset()) -> None:
        """Consider every pending file; publishes run concurrently, in batches. While NATS
        refuses publishes the files wait (paced by `retry`)."""
        for rel in [p for p in self.pending if Path(p).name == MANIFEST_NAME]:
            self.pending.discard(rel)
            await self.discover(rel)  # before the tiles it covers
        for manifest_rel in list(self.unregistered):
            await self.discover(manifest_rel)  # registrations NATS failed, when due
        paths = sorted(self.pending) if self.retry.ready() else []
        for start in range(0, len(paths), PUBLISH_BATCH):
            batch = paths[start : start + PUBLISH_BATCH]
            outcomes = await asyncio.gather(
                *(self.consider(rel, renamed=rel in renamed) for rel in batch),
                return_exceptions=True,
            )
            failed = False
            for rel, outcome in zip(batch, outcomes, strict=True):
                if isinstance(outcome, TRANSIENT):  # NATS restarting, stream full: retry
                    if not failed:
                        self.retry.failed(outcome, path=rel)
                    failed = True
                elif isinstance(outcome, BaseException):  # one bad file: skip it (a rescan
                    self._skip(  # considers it again)
                        rel, "error", error=f"{type(outcome).__name__}: {outcome}"[:2000]
                    )
                    self.pending.discard(rel)
                elif outcome != "pending":
                    self.pending.discard(rel)
            if failed:
                break
            if any(o == "emitted" for o in outcomes):
                self.retry.succeeded()
        WATCHER_PENDING.set(len(self.pending))
        WATCHER_STALLED.set(len(self.stalled))

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
                self.pending.update(self.rel(p) for p in Path(path).rglob("*") if not p.is_dir())
                continue
            self.pending.add(rel)
            if deleted_temp and change == watchfiles.Change.added:
                renamed.add(rel)
        if not self.ready.is_set():  # the catch-up scan has not read the manifests yet: the
            return  # files wait in `pending` for the first check after it
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
