"""Real-time figures of one acquisition from its event log: latency, per-slice tail, backlog.

Every figure is computed from timestamps the events already carry, so it can be recomputed
from the stream at any time (the demo and `bench/realtime.py` both do):

- a tile's file was complete at `tile_arrived.completed_at` (the file's last write, as the
  watcher saw it);
- a stage's output was published at its `emitted_at`; the stage started handling the input at
  `origin.started_at`, so `emitted_at - origin.started_at` is that stage's handling time;
- a slice's tail runs from its last tile's file being complete to its mosaic being stitched,
  registered and uploaded (mosaic and registered volume both verified in object storage).

Backlog is not in the log: it is sampled from the stage consumers (`num_pending +
num_ack_pending`) while the acquisition runs (`BacklogSampler`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from messages.codec import decode_event
from messages.events import (
    ArtifactUploaded,
    Event,
    SliceAxis,
    SliceRegistered,
    SliceStitched,
    StageFailed,
    TileArrived,
    TileConverted,
    TileProcessed,
)
from messages.subjects import PIPELINE_ORDER, acq_filter
from services.state.status import read_events

KINDS = (
    TileArrived,
    TileConverted,
    TileProcessed,
    SliceStitched,
    SliceRegistered,
    SliceAxis,
    ArtifactUploaded,
    StageFailed,
)
OUTPUTS = (TileProcessed, SliceStitched, SliceRegistered, SliceAxis, ArtifactUploaded)
TileKey = tuple[int, int, int, int]  # slice, mosaic, row, col
HOP_SLACK_S = 0.25  # allowance per hand-over between services (fetch, publish, ack)
TAIL_HOPS = PIPELINE_ORDER


def tail_slack(settle_s: float, services: Iterable[str]) -> float:
    """Slack of the tail goal: the watcher's settle interval plus a hand-over allowance per
    service on the tail's path."""
    return settle_s + HOP_SLACK_S * sum(1 for s in services if s in TAIL_HOPS)


def _ts(when: datetime) -> float:
    return when.timestamp()


def handling_s(event: Event) -> float | None:
    """Seconds the producing stage spent on the input (handler start -> output built)."""
    if event.origin is None:
        return None
    return max(0.0, _ts(event.emitted_at) - _ts(event.origin.started_at))


def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile (0..100, linear interpolation), None for no values."""
    data = list(values)
    return float(np.percentile(data, q)) if data else None


@dataclass
class TileTimes:
    """Epoch seconds of one tile's milestones and its stages' handling times."""

    complete: float
    convert_started: float | None = None
    converted: float | None = None
    processed: float | None = None
    uploaded: float | None = None
    convert_s: float | None = None
    process_s: float | None = None

    @property
    def processing_s(self) -> float | None:
        """convert + process handling time: the work one tile costs."""
        if self.convert_s is None or self.process_s is None:
            return None
        return self.convert_s + self.process_s


@dataclass
class SliceTimes:
    """One slice's mosaic: when its last tile was complete and when each output followed."""

    slice: int
    mosaic: int
    last_complete: float | None = None
    stitched: float | None = None
    registered: float | None = None
    mosaic_uploaded: float | None = None
    volume_uploaded: float | None = None
    stitch_s: float | None = None
    register_s: float | None = None
    mosaic_upload_s: float | None = None
    volume_upload_s: float | None = None
    path: str = ""
    registered_path: str = ""
    # the slice's 3-D axis (thru-plane), on the tilted mosaic's entry: the register delivery
    # of that mosaic's slice_stitched fits it
    axis: float | None = None
    axis_s: float | None = None
    axis_path: str = ""

    @property
    def uploaded(self) -> float | None:
        """When every upload of the slice (mosaic, and the volume once registered) was done."""
        done = [t for t in (self.mosaic_uploaded, self.volume_uploaded) if t is not None]
        if self.mosaic_uploaded is None or (self.registered and self.volume_uploaded is None):
            return None
        return max(done)

    @property
    def upload_s(self) -> float | None:
        """Handling time of the upload that finished the slice."""
        if self.uploaded is None:
            return None
        if self.uploaded == self.volume_uploaded:
            return self.volume_upload_s
        return self.mosaic_upload_s

    def after_last_tile(self, when: float | None) -> float | None:
        if when is None or self.last_complete is None:
            return None
        return when - self.last_complete


@dataclass
class Budget:
    """The tail goal: last tile's processing + its slice's stitch, register, axis, upload +
    slack."""

    tile_s: float
    slice_s: float
    slack_s: float
    measured_s: float

    @property
    def total_s(self) -> float:
        return self.tile_s + self.slice_s + self.slack_s

    @property
    def met(self) -> bool:
        return self.measured_s <= self.total_s


@dataclass
class Timeline:
    """Milestones of one acquisition, built from its events (`Timeline.of`)."""

    tiles: dict[TileKey, TileTimes] = field(default_factory=dict)
    slices: dict[tuple[int, int], SliceTimes] = field(default_factory=dict)
    outputs: list[float] = field(default_factory=list)
    failures: int = 0

    @classmethod
    def of(cls, events: Iterable[Event]) -> Timeline:
        """Fold events (any order, any kinds; others are ignored) into milestones."""
        tl = cls()
        later: list[Event] = []
        for e in events:
            if isinstance(e, TileArrived):
                key = (e.tile.slice, e.tile.mosaic, e.tile.row, e.tile.col)
                if key not in tl.tiles:
                    tl.tiles[key] = TileTimes(complete=_ts(e.completed_at))
            elif isinstance(e, StageFailed):
                tl.failures += 1
            elif isinstance(e, KINDS):
                later.append(e)
        # tiles: first output of each kind; slices: the last (a re-stitch supersedes)
        for e in sorted(later, key=lambda e: e.emitted_at):
            if isinstance(e, OUTPUTS):
                tl.outputs.append(_ts(e.emitted_at))
            if isinstance(e, TileConverted | TileProcessed):
                tile = tl.tiles.get((e.tile.slice, e.tile.mosaic, e.tile.row, e.tile.col))
                if tile is None:
                    continue
                if isinstance(e, TileConverted) and tile.converted is None:
                    tile.converted, tile.convert_s = _ts(e.emitted_at), handling_s(e)
                    if e.origin is not None:
                        tile.convert_started = _ts(e.origin.started_at)
                elif isinstance(e, TileProcessed) and tile.processed is None:
                    tile.processed, tile.process_s = _ts(e.emitted_at), handling_s(e)
            elif isinstance(e, SliceStitched):
                sl = tl._slice(e.slice, e.mosaic)
                sl.stitched, sl.stitch_s, sl.path = _ts(e.emitted_at), handling_s(e), e.path
            elif isinstance(e, SliceRegistered):
                sl = tl._slice(e.slice, e.mosaic)
                sl.registered, sl.register_s = _ts(e.emitted_at), handling_s(e)
                sl.registered_path = e.path
            elif isinstance(e, SliceAxis):
                sl = tl._slice(e.slice, e.tilted_mosaic)
                sl.axis, sl.axis_s, sl.axis_path = _ts(e.emitted_at), handling_s(e), e.path
            elif isinstance(e, ArtifactUploaded):
                tl._uploaded(e)
        for (s, m), sl in tl.slices.items():
            done = [t.complete for k, t in tl.tiles.items() if k[0] == s and k[1] == m]
            sl.last_complete = max(done) if done else None
        return tl

    def _slice(self, slice_index: int, mosaic: int) -> SliceTimes:
        return self.slices.setdefault(
            (slice_index, mosaic), SliceTimes(slice=slice_index, mosaic=mosaic)
        )

    def _uploaded(self, e: ArtifactUploaded) -> None:
        when, took = _ts(e.emitted_at), handling_s(e)
        if e.tile is not None:
            tile = self.tiles.get((e.tile.slice, e.tile.mosaic, e.tile.row, e.tile.col))
            if tile is not None and tile.uploaded is None:
                tile.uploaded = when
            return
        for sl in self.slices.values():
            if e.product == "mosaic" and e.source == sl.path:
                sl.mosaic_uploaded, sl.mosaic_upload_s = when, took
            elif e.product == "volume" and e.slice == sl.slice and e.source == sl.registered_path:
                sl.volume_uploaded, sl.volume_upload_s = when, took

    # ------------------------------------------------------------------ figures
    @property
    def acq_end(self) -> float | None:
        """When the last tile file of the acquisition was complete."""
        return max((t.complete for t in self.tiles.values()), default=None)

    @property
    def acq_start(self) -> float | None:
        return min((t.complete for t in self.tiles.values()), default=None)

    @property
    def processing_start(self) -> float | None:
        """When the first tile's conversion started (a batch run's start)."""
        started = [t.convert_started for t in self.tiles.values() if t.convert_started]
        return min(started, default=None)

    @property
    def last_output(self) -> float | None:
        return max(self.outputs, default=None)

    def latencies(self, milestone: str) -> list[float]:
        """Per tile: file complete -> `processed` or `uploaded`, seconds."""
        out = []
        for tile in self.tiles.values():
            when = getattr(tile, milestone)
            if when is not None:
                out.append(when - tile.complete)
        return out

    def processed_per_s(self, since: float | None = None) -> float | None:
        """Tiles processed per second, from `since` (default: the first file complete)."""
        done = [t.processed for t in self.tiles.values() if t.processed is not None]
        start = self.acq_start if since is None else since
        if not done or start is None or max(done) <= start:
            return None
        return len(done) / (max(done) - start)

    def written_per_s(self) -> float | None:
        """Rate at which tile files were completed (the acquisition rate)."""
        if len(self.tiles) < 2 or self.acq_end == self.acq_start:
            return None
        return (len(self.tiles) - 1) / (self.acq_end - self.acq_start)

    def done_after(self, start: float | None = None) -> float | None:
        """Seconds from `start` (default: the acquisition's end) to its last output."""
        start = self.acq_end if start is None else start
        if start is None or self.last_output is None:
            return None
        return self.last_output - start

    def budget(self, slack_s: float, start: float | None = None) -> Budget | None:
        """The tail goal for the acquisition's last tile and the slice it completes."""
        if not self.tiles or not self.slices:
            return None
        key, last = max(self.tiles.items(), key=lambda kv: kv[1].complete)
        sl = self.slices.get((key[0], key[1]))
        measured = self.done_after(start)
        if sl is None or last.processing_s is None or measured is None:
            return None
        parts = (sl.stitch_s, sl.register_s, sl.axis_s, sl.upload_s)
        slice_s = sum(p for p in parts if p is not None)
        return Budget(last.processing_s, slice_s, slack_s, measured)

    def complete(self, expected_tiles: int, slices: int, upload: bool, register: bool) -> bool:
        """Whether every tile was processed and every slice reached its last output."""
        processed = sum(1 for t in self.tiles.values() if t.processed is not None)
        if processed + self.failures < expected_tiles or len(self.slices) < slices:
            return False
        for sl in self.slices.values():
            if sl.stitched is None or (register and sl.mosaic == 0 and sl.registered is None):
                return False
            if upload and sl.uploaded is None:
                return False
        return not upload or all(t.uploaded is not None for t in self.tiles.values())


async def read_timeline(js: JetStreamContext, stream: str, acq: str) -> Timeline:
    """The timeline of one acquisition from the log (only the kinds it needs are read)."""
    events: list[Event] = []
    for kind in KINDS:
        for msg in await read_events(js, stream, acq_filter(acq, kind.kind)):
            events.append(decode_event(msg.data))
    return Timeline.of(events)


class BacklogSampler:
    """Max backlog per stage consumer (`num_pending + num_ack_pending`) over time."""

    def __init__(self, stages: Iterable[str]) -> None:
        self.samples: dict[str, list[tuple[float, int]]] = {s: [] for s in stages}

    def record(self, stage: str, backlog: int, when: float | None = None) -> None:
        self.samples.setdefault(stage, []).append((when or time.time(), backlog))

    async def sample(self, js: JetStreamContext, stream: str) -> None:
        """One reading of every stage's consumer (a missing consumer is skipped)."""
        for stage in list(self.samples):
            with contextlib.suppress(TimeoutError, NotFoundError):
                info = await js.consumer_info(stream, stage, timeout=2)
                self.record(stage, (info.num_pending or 0) + (info.num_ack_pending or 0))

    async def run(
        self, js: JetStreamContext, stream: str, stop: asyncio.Event, interval: float = 0.5
    ) -> None:
        """Sample every `interval` seconds until `stop` is set."""
        while not stop.is_set():
            await self.sample(js, stream)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)

    def max(self) -> dict[str, int]:
        return {s: max((n for _, n in v), default=0) for s, v in self.samples.items()}


# ---------------------------------------------------------------------- tables
def _s(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _p(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{_s(percentile(values, 50))} / {_s(percentile(values, 99))}"


def figures(
    tl: Timeline,
    slack_s: float | None,
    backlog: dict[str, int] | None = None,
    start: float | None = None,
) -> dict[str, str]:
    """The rows of the real-time table for one run (label -> value), in display order.

    `start` is when processing could begin (default: the acquisition's end, i.e. streaming);
    a batch run passes the moment its services were released. `slack_s` None leaves out the
    tail goal (it is about streaming)."""
    rows: dict[str, str] = {
        "tiles (failed)": f"{len(tl.tiles)} ({tl.failures})",
        "tiles/s written": _s(tl.written_per_s()),
        "tiles/s processed": _s(tl.processed_per_s(start)),
        "tile: complete -> processed p50 / p99 s": _p(tl.latencies("processed")),
        "tile: complete -> uploaded p50 / p99 s": _p(tl.latencies("uploaded")),
    }
    for (s, m), sl in sorted(tl.slices.items()):
        steps = (sl.stitched, sl.registered, sl.uploaded)
        rows[f"slice {s} m{m}: last tile -> stitched / registered / uploaded s"] = " / ".join(
            _s(sl.after_last_tile(t)) for t in steps
        )
    for (s, _m), sl in sorted(tl.slices.items()):
        if sl.axis is not None:  # after the slice's last tile, whichever mosaic it was in
            last = max(
                (o.last_complete for (k, _), o in tl.slices.items() if k == s and o.last_complete),
                default=None,
            )
            rows[f"slice {s}: last tile -> axis s"] = _s(None if last is None else sl.axis - last)
    for stage, n in (backlog or {}).items():
        rows[f"max backlog {stage}"] = str(n)
    rows["end of acquisition -> last output s"] = _s(tl.done_after(start))
    budget = None if slack_s is None else tl.budget(slack_s, start)
    if budget is not None:
        rows["tail budget s (tile + slice + slack)"] = (
            f"{budget.total_s:.2f} ({budget.tile_s:.2f} + {budget.slice_s:.2f} + "
            f"{budget.slack_s:.2f})"
        )
        rows["tail <= budget"] = "yes" if budget.met else "no"
    return rows


def markdown_table(columns: dict[str, dict[str, str]]) -> str:
    """One markdown table: a row per label, a column per run."""
    labels: list[str] = []
    for rows in columns.values():
        labels += [label for label in rows if label not in labels]
    lines = [
        "| figure | " + " | ".join(columns) + " |",
        "| --- | " + " | ".join("---:" for _ in columns) + " |",
    ]
    for label in labels:
        cells = " | ".join(rows.get(label, "") for rows in columns.values())
        lines.append(f"| {label} | {cells} |")
    return "\n".join(lines)
