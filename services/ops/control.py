"""Operator commands on a running pipeline: pause/resume, replay, failed/retry, history.

Replays and retries are targeted: the input events are republished on `tp.redo_<stage>...`,
which only that stage's consumer listens to, with a replay tag that makes their outputs new
events (not duplicates of the first run) and tells the stage to recompute even if its outputs
are complete. Other stages' progress is untouched.

A replay from a point of the log (`tilepipe replay STAGE --from-seq N | --since T`) rewinds
the stage's durable consumer with the server's consumer reset (nats-server 2.14+, ADR-60;
`nats consumer reset TILEPIPE STAGE N` does the same): every input of the stage from there is
delivered again, and the digest-keyed completion of the outputs recomputes exactly those
whose inputs or parameters changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import uuid
from datetime import UTC, datetime, timedelta

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError

from messages.codec import InvalidEvent, decode_event
from messages.events import Attempt, Event, StageFailed
from messages.subjects import (
    HOLD,
    REDO,
    acq_filter,
    event_filter,
    event_subjects,
    parse_subject,
    redo_subject,
)
from services.core.errors import ResetUnsupported
from services.runtime.bus import publish
from services.runtime.stage import REPAIR_PREFIX
from services.state.buckets import HOLD_BUCKET
from services.state.eventlog import subjects_seen
from services.state.status import Failure, checked, read_events

DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")
FOREVER = "2999-12-31T23:59:59Z"


def parse_duration(text: str) -> timedelta:
    """`90s`, `15m`, `1h30m`, `2d`."""
    match = DURATION.match(text.strip())
    if not text.strip() or match is None or not any(match.groups()):
        raise ValueError(f"bad duration {text!r}: use e.g. 90s, 15m, 1h30m, 2d")
    d, h, m, s = (int(g or 0) for g in match.groups())
    return timedelta(days=d, hours=h, minutes=m, seconds=s)


async def pause(
    js: JetStreamContext, stream: str, stage: str, duration: timedelta | None = None
) -> str:
    """Pause a stage's consumer (until a time, or until resumed); returns the pause end."""
    await js.consumer_info(stream, stage)  # NotFoundError for an unknown stage
    until = (
        FOREVER
        if duration is None
        else (datetime.now(UTC) + duration).strftime("%Y-%m-%dT%H:%M:%SZ")
    )
    await js.pause_consumer(stream, stage, until)
    return until


async def resume(js: JetStreamContext, stream: str, stage: str) -> None:
    await js.consumer_info(stream, stage)
    await js.resume_consumer(stream, stage)


async def hold(js: JetStreamContext, stream: str, acq: str) -> None:
    """Hold one acquisition's work in every stage; other acquisitions continue."""
    kv = await js.key_value(HOLD_BUCKET)
    await kv.put(acq, b"held")


async def release(js: JetStreamContext, stream: str, acq: str, settle_s: float = 1.0) -> int:
    """Lift the hold and send every parked input back to its stage; returns how many."""
    kv = await js.key_value(HOLD_BUCKET)
    with contextlib.suppress(KeyNotFoundError):
        await kv.delete(acq)
    await asyncio.sleep(settle_s)  # stages see the release before the parked inputs return
    tag = f"{REPAIR_PREFIX}release-{uuid.uuid4().hex[:8]}"
    sent = 0
    for _ in range(5):  # inputs parked while releasing are picked up by the next round
        seen = await subjects_seen(js, stream, acq_filter(acq))
        holds = sorted({p.kind for _s, p in event_subjects(seen) if p.kind.startswith(HOLD)})
        parked = [m for kind in holds for m in await read_events(js, stream, acq_filter(acq, kind))]
        if not parked:
            break
        for msg in parked:
            seq = msg.metadata.sequence.stream
            with contextlib.suppress(InvalidEvent):  # not the input its subject says: dropped
                event = decode_event(msg.data, subject=msg.subject)
                await republish(js, parse_subject(msg.subject).target, event, tag, seq)
                sent += 1
            await js.delete_msg(stream, seq)
    return sent


async def republish(js: JetStreamContext, stage: str, event: Event, tag: str, seq: int) -> None:
    """Send one input event to one stage only, tagged (see the module docstring)."""
    await publish(
        js,
        redo_subject(stage, event.acq, event.slice_token(), event.tile_token()),
        event.to_json(),
        f"redo:{stage}:{tag}:{seq}",
        replay=tag,
    )


async def replay(
    js: JetStreamContext,
    stream: str,
    stage: str,
    kinds: list[str],
    acq: str,
    slice_index: int | None = None,
    since: datetime | None = None,
) -> list[Event]:
    """Send a stage's input events of an acquisition (a slice, since a time) back to it."""
    tag = f"replay-{uuid.uuid4().hex[:8]}"
    sent = []
    slice_token = "*" if slice_index is None else str(slice_index)
    for kind in kinds:
        for msg in await read_events(js, stream, acq_filter(acq, kind, slice_token, "*")):
            if since is not None and msg.metadata.timestamp < since:
                continue
            event = decode_event(msg.data)
            await republish(js, stage, event, tag, msg.metadata.sequence.stream)
            sent.append(event)
    return sent


RESET_SINCE = (2, 14)  # nats-server version with `$JS.API.CONSUMER.RESET` (ADR-60)


def reset_supported(version: str) -> bool:
    """Whether a nats-server of `version` (e.g. "2.15.1") has consumer reset."""
    numbers = re.findall(r"\d+", version)[:2]
    return tuple(int(n) for n in numbers) >= RESET_SINCE if len(numbers) == 2 else False


async def first_seq_since(js: JetStreamContext, stream: str, since: datetime) -> int | None:
    """Stream sequence of the first event logged at or after `since` (None: none since)."""
    request = json.dumps({"start_time": since.astimezone(UTC).isoformat()}).encode()
    reply = await js._nc.request(f"{js._prefix}.STREAM.MSG.GET.{stream}", request, timeout=5)
    found = json.loads(reply.data)
    if "error" in found:
        if found["error"].get("code") == 404:
            return None
        raise ValueError(found["error"].get("description", "message lookup failed"))
    message = found["message"]
    stamp = datetime.fromisoformat(re.sub(r"(\.\d{6})\d*", r"\1", message["time"]))
    # a start time past the last message is answered with the first one: nothing since
    return message["seq"] if stamp >= since else None


async def reset(js: JetStreamContext, stream: str, stage: str, seq: int | None) -> tuple[int, int]:
    """Rewind a stage's durable consumer to stream sequence `seq` (its ack floor: None) with
    the server's consumer reset: the running stage receives every input of its filter from
    there again, without a restart; other stages are untouched. Returns the sequence its
    next delivery will be at or above, and how many handled targeted replays were removed.

    Targeted replays and retries the stage has already handled (`tp.redo_<stage>` messages
    at or below its ack floor) are purged first: delivered again they would recompute
    regardless of their basis (they are explicit requests to recompute).

    Raises ResetUnsupported on a server older than 2.14 (`tilepipe replay STAGE --acq ACQ`
    does a targeted replay there), NotFoundError for an unknown stage (the server does not
    answer a reset of an unknown consumer, so it is looked up first)."""
    version = str(js._nc.connected_server_version)
    if not reset_supported(version):
        raise ResetUnsupported(
            f"nats-server {version} has no consumer reset (2.14 or later): use the targeted "
            f"`tilepipe replay {stage} --acq ACQ [--slice N] [--since T]` instead"
        )
    if seq is not None and seq < 1:
        raise ValueError("a stream sequence counts from 1")
    info = await js.consumer_info(stream, stage)
    floor = info.ack_floor.stream_seq if info.ack_floor else 0
    redo = event_filter(f"{REDO}{stage}")
    purged = 0
    if floor:
        before = sum((await subjects_seen(js, stream, redo)).values())
        await js.purge_stream(stream, seq=floor + 1, subject=redo)
        purged = before - sum((await subjects_seen(js, stream, redo)).values())
    done = await js.reset_consumer(stream, stage, seq)
    return done.reset_seq, purged


async def retry(js: JetStreamContext, stream: str, items: list[Failure]) -> int:
    """Send each failed input back to the stage that gave up on it."""
    tag = f"retry-{uuid.uuid4().hex[:8]}"
    for item in items:
        original = await js.get_last_msg(stream, item.event.input_subject)
        event = decode_event(original.data, subject=original.subject)
        await republish(js, item.event.stage, event, tag, item.seq)
    return len(items)


async def history(
    js: JetStreamContext, stream: str, acq: str, slice_index: int, tile_token: str
) -> list[Event]:
    """Every event of one tile, attempts and failures (their subjects end with the stage)
    included, in time order."""
    tile, staged = (acq_filter(acq, "*", slice_index, tile_token, s) for s in (None, "*"))
    messages = [m for f in (tile, staged) for m in await read_events(js, stream, f)]
    return sorted((event for event, _m in checked(messages)), key=lambda e: e.emitted_at)


def _ts(when: datetime) -> str:
    return when.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def history_rows(events: list[Event]) -> list[tuple[str, ...]]:
    """(time, stage, what, attempt, host/worker, outcome, seconds, error) in time order.

    Failed, retried and held attempts are `attempt` events; a successful attempt is recorded
    in the `origin` of the events it published.
    """
    rows: list[tuple[str, ...]] = []
    seen_origins = set()
    for e in events:
        if isinstance(e, Attempt):
            secs = f"{(e.ended_at - e.started_at).total_seconds():.3f}"
            outcome = e.outcome + (" (replay)" if e.replay else "")
            rows.append(
                (
                    _ts(e.started_at),
                    e.stage,
                    e.input_type,
                    str(e.attempt),
                    f"{e.host}/{e.worker}",
                    outcome,
                    secs,
                    (e.error or e.detail)[:120],
                )
            )
            continue
        if isinstance(e, StageFailed):
            rows.append(
                (
                    _ts(e.emitted_at),
                    e.stage,
                    "stage_failed",
                    str(e.attempts),
                    "",
                    "gave up",
                    "",
                    e.error[:120],
                )
            )
            continue
        o = e.origin
        if o is not None and (o.stage, o.attempt, o.started_at) not in seen_origins:
            seen_origins.add((o.stage, o.attempt, o.started_at))
            secs = f"{(e.emitted_at - o.started_at).total_seconds():.3f}"
            rows.append(
                (
                    _ts(o.started_at),
                    o.stage,
                    o.input_type,
                    str(o.attempt),
                    f"{o.host}/{o.worker}",
                    "ok" + (" (replay)" if o.replay else ""),
                    secs,
                    "",
                )
            )
        rows.append((_ts(e.emitted_at), e.producer or "", e.kind, "", "", "published", "", ""))
    return sorted(rows, key=lambda r: r[0])
