"""StageMonitor: end-to-end latency and acquisition progress from the events a stage publishes
(the runtime's hot-path hook)."""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any

from messages.codec import InvalidEvent, decode_event
from messages.events import (
    ArtifactUploaded,
    Event,
    SliceRegistered,
    SliceStitched,
    TileArrived,
    TileCoord,
    TileEvent,
)
from messages.subjects import ANY, acq_filter, parse_subject, subject
from services.core.logs import get_logger
from services.core.metrics import (
    ACQ_TILES_DONE,
    END_TO_END_SECONDS,
)
from services.runtime.transport import Transport

_TILE_OUTPUTS = (TileEvent, ArtifactUploaded)
_SLICE_OUTPUTS = (SliceStitched, SliceRegistered)
_ROLE: dict[type, str] = {}  # event class -> "tile", "slice" or "none" (what an output stands for)


def _role(cls: type) -> str:
    """What an output of class `cls` stands for, looked up once per class."""
    if issubclass(cls, _TILE_OUTPUTS):
        role = "tile"
    elif issubclass(cls, _SLICE_OUTPUTS):
        role = "slice"
    else:
        role = "none"
    _ROLE[cls] = role
    return role


# ---------------------------------------------------------------------------- stage hook
class StageMonitor:
    """End-to-end latency and acquisition progress of one stage, from the events it publishes.

    The runtime creates one per stage (`StageMonitor(name, stream, stage.produces)`: the
    histograms of the kinds it produces start at zero, so a first observation is an increase)
    calls `observed(outputs, replay)` once the outputs of an input are published, then
    `handled_slow(transport, event, rest, replay)` for the outputs it returns (`handled` does
    both; `transport` is the runner's, `services.runtime.transport`). For every output that
    stands for tiles — a tile event, an `artifact_uploaded` of a tile, a `slice_stitched` (its
    solved tiles) or a `slice_registered` (the tiles of its stitched mosaic) — it

    - observes `tilepipe_end_to_end_latency_seconds{stage,event}`: the output's `emitted_at`
      minus the latest `completed_at` of the `tile_arrived` events of those tiles (taken from
      the input when it is the `tile_arrived`, else read back from the stream by subject and
      cached). Replays (`Tp-Replay` header) are not observed: their age is not a latency.
    - sets `tilepipe_acquisition_tiles_done{acq,stage}` to the distinct tiles this stage has
      published for, seeded from the stream on first sight of an acquisition and re-read every
      `resync_s` (so several workers of one stage agree; dashboards take the max).

    It never raises and gives up after `timeout` seconds: monitoring must not slow the stage.
    """

    def __init__(
        self,
        stage: str,
        stream: str,
        produces: Iterable[type[Event]] = (),
        resync_s: float = 60.0,
        cache_size: int = 50_000,
        timeout: float = 10.0,
        max_acqs: int = 16,
    ) -> None:
        self.stage = stage
        self.stream = stream
        self.resync_s = resync_s
        self.cache_size = cache_size
        self.timeout = timeout
        self.max_acqs = max_acqs
        self._arrivals: OrderedDict[str, float] = OrderedDict()  # "<acq>.<slice>.<tile>" -> s
        self._done: OrderedDict[str, set[str]] = OrderedDict()  # acq -> {"<slice>.<tile>"}
        self._synced: dict[tuple[str, str], float] = {}  # (acq, kind) -> monotonic time
        self._latency: dict[str, Any] = {}
        self._gauges: dict[str, Any] = {}  # acq -> its tiles-done gauge child
        for kind in produces:  # children at 0, so the first observation is a visible increase
            if issubclass(kind, (TileEvent, ArtifactUploaded, SliceStitched, SliceRegistered)):
                self._histogram(kind.kind)

    def observed(self, outputs: Sequence[Event], replay: str | None = None) -> list[Event]:
        """Record the outputs that need no I/O (the common case); return the others, for
        `handled_slow`."""
        return [out for out in outputs if not self._observed_in_memory(out, replay)]

    async def handled(
        self,
        server: Transport,
        event: Event,
        outputs: Sequence[Event],
        replay: str | None = None,
    ) -> None:
        """Record what publishing `outputs` for `event` means; never raises."""
        slow = self.observed(outputs, replay)
        if slow:
            await self.handled_slow(server, event, slow, replay)

    async def handled_slow(
        self,
        server: Transport,
        event: Event,
        outputs: Sequence[Event],
        replay: str | None = None,
    ) -> None:
        """Record `outputs` that `observed` left, looking at the stream; never raises."""
        if isinstance(event, TileArrived):
            self._remember(_tile_key(event.acq, event.tile), event.completed_at.timestamp())
        try:
            # no task per call on the hot path: only the stream look-ups below are bounded
            await self._handled(server, event, outputs, replay)
        except Exception as exc:  # monitoring is best effort
            get_logger(stage=self.stage).debug(
                "monitor_failed", error=str(exc) or type(exc).__name__
            )

    async def _handled(
        self, server: Transport, event: Event, outputs: Sequence[Event], replay: str | None
    ):
        for out in outputs:
            tiles = await self.tiles_of(server, out, event)
            if not tiles:
                continue
            await self._progress(server, out, tiles)
            if replay:
                continue
            if isinstance(out, TileEvent | ArtifactUploaded) and (
                out.origin is not None and out.origin.arrived_at is not None
            ):  # carried forward by the runtime: no lookup on the hot path
                arrived = [out.origin.arrived_at.timestamp()]
            else:
                arrived = [
                    a for a in await self._arrivals_of(server, out.acq, tiles) if a is not None
                ]
            if arrived:
                self._observe(out, max(arrived))

    def _observed_in_memory(self, out: Event, replay: str | None) -> bool:
        """The common case without I/O: a tile output of an acquisition whose progress is
        in sync and whose arrival time travels in `origin`. False: take the general path.
        Runs for every output, so it looks at the class once (`_role`) and at little else."""
        role = _ROLE.get(type(out)) or _role(type(out))
        if role != "tile":
            return role == "none"  # a slice output takes the general path
        tile = out.tile
        if tile is None:
            return True
        origin = out.origin
        arrived = None if origin is None else origin.arrived_at
        if arrived is None and not replay:
            return False
        acq = out.acq
        synced = self._synced.get((acq, out.kind))
        done = self._done.get(acq)
        if synced is None or done is None or time.monotonic() - synced >= self.resync_s:
            return False
        self._add_done(acq, done, (tile,))
        if not replay:
            self._observe(out, arrived.timestamp())
        return True

    def _add_done(self, acq: str, done: set[str], tiles: Iterable[TileCoord]) -> None:
        """Count `tiles` as done for `acq`."""
        done.update(f"{t.slice}.{t.token()}" for t in tiles)
        if acq not in self._gauges:
            self._export_done(acq, done)

    def _export_done(self, acq: str, done: set[str]) -> None:
        """Export the size of `done` as the acquisition's tiles-done gauge, read at scrape
        time (nothing to update per tile)."""
        gauge = self._gauges[acq] = ACQ_TILES_DONE.labels(acq, self.stage)
        gauge.set_function(done.__len__)

    def _observe(self, out: Event, arrived: float) -> None:
        """End-to-end latency of `out`: its emission minus the (latest) arrival behind it."""
        self._histogram(out.kind).observe(max(0.0, out.emitted_at.timestamp() - arrived))

    async def tiles_of(
        self, server: Transport, out: Event, source: Event | None = None
    ) -> list[TileCoord]:
        """The tiles an output stands for (empty for events that are no tile deliverable)."""
        if isinstance(out, TileEvent):
            return [out.tile]
        if isinstance(out, ArtifactUploaded):
            return [out.tile] if out.tile is not None else []
        if isinstance(out, SliceStitched):
            return _positions(out)
        if isinstance(out, SliceRegistered):
            if (
                isinstance(source, SliceStitched)
                and (source.slice, source.mosaic) == (out.slice, out.mosaic)
                and source.acq == out.acq
            ):
                return _positions(source)
            stitched = await self._last(
                server, subject("slice_stitched", out.acq, *_slice_tokens(out))
            )
            return _positions(stitched) if isinstance(stitched, SliceStitched) else []
        return []

    def _histogram(self, kind: str):
        if kind not in self._latency:
            self._latency[kind] = END_TO_END_SECONDS.labels(self.stage, kind)
        return self._latency[kind]

    def _remember(self, key: str, value: float) -> None:
        self._arrivals[key] = value
        self._arrivals.move_to_end(key)
        while len(self._arrivals) > self.cache_size:
            self._arrivals.popitem(last=False)

    async def _arrivals_of(
        self, server: Transport, acq: str, tiles: list[TileCoord]
    ) -> list[float | None]:
        limit = asyncio.Semaphore(32)

        async def one(tile: TileCoord) -> float | None:
            key = _tile_key(acq, tile)
            if key in self._arrivals:
                return self._arrivals[key]
            async with limit:
                found = await self._last(
                    server, subject("tile_arrived", acq, str(tile.slice), tile.token())
                )
            if not isinstance(found, TileArrived):
                return None
            self._remember(key, found.completed_at.timestamp())
            return self._arrivals[key]

        return list(await asyncio.gather(*(one(t) for t in tiles)))

    async def _last(self, server: Transport, subj: str) -> Event | None:
        """The last event on a subject, or None."""

        msg = await asyncio.wait_for(server.last(subj), self.timeout)
        if msg is None:
            return None
        try:
            return decode_event(msg.data)
        except InvalidEvent:
            return None

    async def _progress(self, server: Transport, out: Event, tiles: list[TileCoord]) -> None:
        acq = out.acq
        done = self._done.get(acq)
        if done is None:
            done = self._done[acq] = set()
            while len(self._done) > self.max_acqs:
                gone, tiles_done = self._done.popitem(last=False)
                gauge = self._gauges.pop(gone, None)
                if gauge is not None:  # keeps its last value, not the set
                    gauge.set_function(partial(float, len(tiles_done)))
        self._done.move_to_end(acq)
        now = time.monotonic()
        key = (acq, out.kind)
        if now - self._synced.get(key, -math.inf) >= self.resync_s:
            self._synced[key] = now  # one reader at a time; again next event if it fails
            try:
                done |= await asyncio.wait_for(self._published(server, acq, out.kind), self.timeout)
            except BaseException:
                self._synced.pop(key, None)
                raise
        self._add_done(acq, done, tiles)

    async def _published(self, server: Transport, acq: str, kind: str) -> set[str]:
        """Tile keys ("<slice>.<tile>") already published as `kind` (from the stream)."""

        seen = await server.subjects(acq_filter(acq, kind))
        if kind not in ("slice_stitched", "slice_registered"):
            keys = set()
            for subj in seen:
                parsed = parse_subject(subj)
                if parsed.tile != ANY and re.fullmatch(r"m\d+-r\d+-c\d+", parsed.tile):
                    keys.add(parsed.key())
            return keys
        keys: set[str] = set()
        for subj in seen:
            event = await self._last(server, subj)
            if event is not None:
                keys.update(f"{t.slice}.{t.token()}" for t in await self.tiles_of(server, event))
        return keys


def _tile_key(acq: str, tile: TileCoord) -> str:
    return f"{acq}.{tile.slice}.{tile.token()}"


def _slice_tokens(event: SliceStitched | SliceRegistered) -> tuple[str, str]:
    return str(event.slice), f"m{event.mosaic}"


def _positions(event: SliceStitched) -> list[TileCoord]:
    return [
        TileCoord(slice=event.slice, mosaic=event.mosaic, row=p.row, col=p.col)
        for p in event.positions
    ]
