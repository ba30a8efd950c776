"""Acquisition status from the event log and consumer info: per-stage counts, tile lattice."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from datetime import UTC, datetime

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from messages.codec import InvalidEvent, decode_event
from messages.events import Attempt, Event, StageFailed, utcnow
from messages.subjects import acq_filter, event_subjects, parse_subject, subject
from services.state.eventlog import subjects_seen

# tile-level events in pipeline order: the furthest one reached colours a tile
TILE_PROGRESS = ("tile_arrived", "tile_converted", "tile_processed")
STAGE_OF = {"tile_converted": "convert", "tile_processed": "process"}
STYLE = {
    None: "grey50",
    "tile_arrived": "blue",
    "tile_converted": "cyan",
    "tile_processed": "green",
    "slice_stitched": "magenta",
    "failed": "bold red",
}
GLYPH = {
    None: "·",
    "tile_arrived": "a",
    "tile_converted": "c",
    "tile_processed": "P",
    "slice_stitched": "S",
    "failed": "X",
}
# slice-level events: stage -> event kind (counted per slice and mosaic)
SLICE_STAGES = {"stitch": "slice_stitched", "register": "slice_registered"}
# slice-level steps a stage makes besides its main output: row -> (stage, event kind); shown
# once the stage runs and the step has happened for a slice (e.g. the register stage's
# thru-plane registration and 3-D axis, `slice_axis`, for slices with a tilted mosaic)
SLICE_STEPS = {"axis": ("register", "slice_axis")}


@dataclass
class StageCounts:
    done: int = 0
    failed: int = 0
    waiting: int | None = None
    in_progress: int | None = None
    paused: bool = False


@dataclass
class Status:
    acq: str
    tiles: dict[str, str | None] = field(default_factory=dict)  # tile key -> furthest kind
    stages: dict[str, StageCounts] = field(default_factory=dict)
    expected: int | None = None
    started_at: datetime | None = None
    taken_at: datetime = field(default_factory=utcnow)

    def rate_per_min(self, done: int) -> float | None:
        """Average items per minute since the acquisition started."""
        if self.started_at is None:
            return None
        minutes = (self.taken_at - self.started_at).total_seconds() / 60.0
        return done / minutes if minutes > 0 else None

    @property
    def idle(self) -> bool:
        """No stage has work waiting or in progress (as far as the consumers say)."""
        return not any((c.waiting or 0) + (c.in_progress or 0) for c in self.stages.values())

    def eta_s(self) -> float | None:
        """Seconds until every expected tile reaches the last tile stage, at the average rate;
        None when unknown, or when the acquisition is finished and nothing is left to do."""
        last = next((k for k in reversed(TILE_PROGRESS) if self.count(k)), None)
        if self.expected is None or last is None or (self.finished and self.idle):
            return None
        rate = self.rate_per_min(self.count(last))
        remaining = self.expected - self.count(last) - len(self.failed_tiles) - len(self.missing)
        if remaining <= 0:
            return 0.0
        if self.finished:
            return None  # declared finished with tiles short: nothing more is coming
        return remaining / rate * 60.0 if rate else None

    finished: bool = False
    missing: set[str] = field(default_factory=set)  # declared missing, not arrived since
    failed_tiles: set[str] = field(default_factory=set)  # an unresolved stage_failed
    mosaics: dict[str, set[str]] = field(default_factory=dict)  # kind -> {"<slice>.m<mosaic>"}

    def tile_kind(self, slice_index: int, mosaic: int, row: int, col: int) -> str | None:
        """The furthest stage a tile reached, slice-level stages included."""
        key = f"{slice_index}.m{mosaic}-r{row}-c{col}"
        if key in self.failed_tiles:
            return "failed"
        kind = self.tiles.get(key)
        if kind == "tile_processed" and f"{slice_index}.m{mosaic}" in self.mosaics.get(
            "slice_stitched", set()
        ):
            return "slice_stitched"
        return kind

    def count(self, kind: str) -> int:
        """Tiles that reached `kind` (a tile that failed later still counts as arrived)."""
        order = TILE_PROGRESS.index(kind)
        return sum(
            1 for k in self.tiles.values() if k is not None and TILE_PROGRESS.index(k) >= order
        )


async def snapshot(
    js: JetStreamContext, stream: str, acq: str, stages: list[str] | None = None
) -> Status:
    """The state of one acquisition from subject counts of the log plus consumer info."""
    seen = await subjects_seen(js, stream, acq_filter(acq))
    status = Status(acq)
    rank = {kind: i for i, kind in enumerate(TILE_PROGRESS)}
    uploaded = 0
    for text, parsed in event_subjects(seen):
        kind, key, count = parsed.kind, parsed.key(), seen[text]
        if kind == "artifact_uploaded":
            uploaded += count  # every verified artifact: tiles, mosaics, volume planes
        elif kind in rank:
            current = status.tiles.get(key)
            if current is None or rank[kind] > rank.get(current, -1):
                status.tiles[key] = kind
        elif kind == "acq_finished":
            status.finished = True
        elif kind in SLICE_STAGES.values() or kind in (k for _, k in SLICE_STEPS.values()):
            status.mosaics.setdefault(kind, set()).add(key)
        elif kind == "stage_failed":
            status.failed_tiles.add(key)
    for kind, stage in STAGE_OF.items():
        status.stages[stage] = StageCounts(done=status.count(kind))
    for stage, kind in SLICE_STAGES.items():
        if stages is None or stage in stages:
            status.stages[stage] = StageCounts(done=len(status.mosaics.get(kind, ())))
    for row, (stage, kind) in SLICE_STEPS.items():
        if (stages is None or stage in stages) and status.mosaics.get(kind):
            status.stages[row] = StageCounts(done=len(status.mosaics[kind]))
    if uploaded or (stages is not None and "upload" in stages):
        status.stages["upload"] = StageCounts(done=uploaded)
    if status.failed_tiles:  # only failures nothing succeeded after (as `tilepipe failed`)
        unresolved = await failures(js, stream, acq)
        status.failed_tiles = {f.where for f in unresolved if f.event.tile is not None}
        for failure in unresolved:
            counts = status.stages.setdefault(failure.event.stage, StageCounts())
            counts.failed += 1
    for stage in stages or [n for n in status.stages if n not in SLICE_STEPS]:
        counts = status.stages.setdefault(stage, StageCounts())
        try:
            info = await js.consumer_info(stream, stage, timeout=2)
        except (TimeoutError, NotFoundError):
            continue
        counts.waiting = info.num_pending
        counts.in_progress = info.num_ack_pending
        counts.paused = bool(getattr(info, "paused", False))
    if status.finished:  # the latest declaration, less the tiles that arrived after it
        last = await js.get_last_msg(stream, subject("acq_finished", acq))
        status.missing = {
            key
            for key in (f"{t.slice}.{t.token()}" for t in decode_event(last.data).missing)
            if status.tiles.get(key) is None
        }
    started = await subjects_seen(js, stream, acq_filter(acq, "acq_started"))
    if started:
        first = await read_events(js, stream, acq_filter(acq, "acq_started"), limit=1)
        if first:
            event = decode_event(first[0].data)
            status.expected = event.tiles_expected
            status.started_at = event.emitted_at
    return status


@dataclass
class Failure:
    """A stage's give-up on an input that has not succeeded since."""

    event: StageFailed
    seq: int

    @property
    def where(self) -> str:
        """`<slice>.<tile token>`: the key status and repair use for the input."""
        return f"{self.event.slice_token()}.{self.event.tile_token()}"


async def failures(js: JetStreamContext, stream: str, acq: str | None = None) -> list[Failure]:
    """Unresolved `stage_failed` events (no successful attempt of that stage since)."""
    acq_token = acq or "*"
    failed = [
        (event, m.metadata.sequence.stream)
        for event, m in checked(
            await read_events(js, stream, acq_filter(acq_token, "stage_failed"))
        )
    ]
    if not failed:
        return []
    ok: dict[tuple[str, str], datetime] = {}
    for event, m in checked(await read_events(js, stream, acq_filter(acq_token))):
        if parse_subject(m.subject).target is not None:  # a parked or replayed input
            continue
        if isinstance(event, Attempt) and event.outcome == "ok":
            stage, when = event.stage, event.ended_at
        elif event.origin is not None:
            stage, when = event.origin.stage, event.emitted_at
        else:
            continue
        key = (stage, f"{event.acq}.{event.slice_token()}.{event.tile_token()}")
        ok[key] = max(ok.get(key, when), when)
    latest: dict[tuple[str, str, str], Failure] = {}
    for event, seq in failed:
        where = f"{event.acq}.{event.slice_token()}.{event.tile_token()}"
        if ok.get((event.stage, where), datetime.min.replace(tzinfo=UTC)) > event.emitted_at:
            continue
        latest[(event.stage, where, event.input_type)] = Failure(event, seq)
    return sorted(latest.values(), key=lambda f: f.seq)


async def read_events(
    js: JetStreamContext, stream: str, subject: str, limit: int | None = None
) -> list:
    """Messages of the log on `subject`, oldest first, without disturbing any consumer."""
    info = await js.stream_info(stream, subjects_filter=subject)
    total = sum((info.state.subjects or {}).values())
    if not total:
        return []
    want = min(total, limit) if limit else total
    sub = await js.subscribe(subject, stream=stream, ordered_consumer=True)
    out = []
    try:
        while len(out) < want:
            out.append(await sub.next_msg(timeout=5))
    finally:
        await sub.unsubscribe()
    return out


def checked(messages: list) -> list[tuple[Event, Msg]]:
    """(event, message) of the messages whose payload is the event their subject says (a
    payload that disagrees with its subject is not what it claims to be: left out)."""
    out = []
    for m in messages:
        with contextlib.suppress(InvalidEvent):
            out.append((decode_event(m.data, subject=m.subject), m))
    return out
