"""The one runtime every stage runs in.

A durable pull consumer per stage (explicit ack, `max_ack_pending` = concurrency x workers)
read through standing pull requests for this worker's free slots (`services.runtime.pullfeed`),
validation on receipt, of the payload and against its subject (`term` with a logged, counted
reason), handler in a worker thread with in-progress heartbeats, retries by negative ack with
backoff up to `max_deliver`, then a stage-failed event (never for an input that is itself a
failure); outputs published with `Nats-Msg-Id` de-duplication before the input is
acknowledged; graceful drain on stop; reconnection after a server restart; backlog gauges.

One delivery is a `Delivery`; `StageRunner.deliver` ends each in one outcome, one method
each: `_ok`, `_retry`, `_fail`, `_park`, and `_wait_for_space` (a full disk: waited out without
using up deliveries). Publishing and bookkeeping go through the runner's `Transport`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import errno
import inspect
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from nats.aio.msg import Msg

from messages.codec import InvalidEvent, decode_event
from messages.events import (
    CURRENT_ORIGIN,
    MAX_REPLAY_TAG,
    Attempt,
    Event,
    Origin,
    StageFailed,
    TileArrived,
    utcnow,
)
from messages.paths import PathEscapeError
from messages.subjects import hold_subject
from services.core.config import Config, StageSettings
from services.core.errors import PermanentError
from services.core.logs import get_logger
from services.core.metrics import (
    BYTES_READ,
    BYTES_WRITTEN,
    CONSUMER_ACK_PENDING,
    CONSUMER_PAUSED,
    CONSUMER_PENDING,
    CONSUMER_REDELIVERED,
    EVENTS_DUPLICATE,
    EVENTS_HANDLED,
    EVENTS_INVALID,
    EVENTS_PUBLISHED,
    HANDLE_SECONDS,
    IN_FLIGHT,
    NO_SPACE_WAITS,
    REDELIVERIES,
    STREAM_MAX,
    STREAM_USED,
)
from services.runtime.bus import MSG_ID, REPLAY_HEADER, delivery_count, event_msg_id
from services.runtime.monitor import StageMonitor
from services.runtime.stage import HOSTNAME, Context, Result, Stage
from services.runtime.transport import (
    TRANSIENT_NATS_ERRORS,
    Consumer,
    NatsTransport,
    Transport,
    sleep_or_stop,
)
from services.state.buckets import HOLD_BUCKET


def arrival_time(event: Event):
    """When the tile file behind an input was complete (carried forward in `origin`)."""
    if isinstance(event, TileArrived):
        return event.completed_at
    return event.origin.arrived_at if event.origin is not None else None


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def out_of_space(exc: BaseException) -> bool:
    """Whether `exc`, or an error it was raised from, is a full disk or quota."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno in NO_SPACE:
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def retry_delay(settings: StageSettings, attempt: int) -> float:
    """Backoff before delivery `attempt + 1` (attempts count from 1)."""
    steps = settings.backoff_s or [1.0]
    return steps[min(attempt - 1, len(steps) - 1)]


def where(event: Event) -> dict:
    """`tile` and `slice` of an input, for the records that point back at it."""
    tile = getattr(event, "tile", None)
    slice_index = getattr(event, "slice", None) if tile is None else None
    return {"tile": tile, "slice": slice_index if isinstance(slice_index, int) else None}


def failure_event(stage: str, event: Event, subject: str, error: str, attempts: int) -> StageFailed:
    """The stage-failed event for an input a stage gave up on."""
    return StageFailed(
        acq=event.acq,
        stage=stage,
        input_type=event.kind,
        input_subject=subject,
        error=error[:8000],
        attempts=attempts,
        producer=stage,
        **where(event),
    )


def replay_tag(msg: Msg) -> str | None:
    """The replay tag a delivery carries (`Tp-Replay`), cut to its longest allowed length: a
    hand-made header must not fail the delivery."""
    replay = msg.headers.get(REPLAY_HEADER) if msg.headers else None
    return replay[:MAX_REPLAY_TAG] if replay is not None else None


@dataclass(slots=True)
class Delivery:
    """One delivery of one input, as every outcome of it needs it."""

    msg: Msg
    event: Event
    attempt: int  # 1 on the first delivery
    replay: str | None  # `replay_tag`
    log: Any  # the runner's logger bound to the event and attempt
    origin: Origin | None = None  # stamped on the outputs, once handling starts
    started_at: datetime = field(default_factory=utcnow)  # wall clock, for the record
    started: float = field(default_factory=time.perf_counter)  # for the handle-time figures


class StageRunner:
    """Runs one stage until `stop` is set: consumes and delivers through its transport
    (`transport`; default: a `NatsTransport` over the connection `run` makes and closes).

    With `services.runtime.testing.MemoryTransport` a test runs the stage, or drives single
    deliveries through `deliver`, without a server."""

    def __init__(
        self, stage: Stage, config: Config, worker: str = "", transport: Transport | None = None
    ):
        self.stage = stage
        self.transport = transport
        self._injected = transport is not None
        self.config = config
        self.settings = stage.settings
        self.name = stage.name
        self.worker = worker or stage.name
        self.log = get_logger(stage=self.name, worker=self.worker)
        self._executor = ThreadPoolExecutor(
            max_workers=self.settings.concurrency, thread_name_prefix=f"tp-{self.name}"
        )
        self._accepts = {kind.kind for kind in stage.consumes}
        if inspect.iscoroutinefunction(stage.handle):
            self._mode = "async"
        else:
            self._mode = "thread" if stage.blocking else "inline"
        # id(message) -> (message, monotonic time of its last beat)
        self._in_flight: dict[int, tuple[Msg, float]] = {}
        self.m = _StageMetrics(self.name)
        self.m.in_flight.set_function(lambda: len(self._in_flight))
        self.monitor = StageMonitor(self.name, config.nats.stream, stage.produces)
        self.held: set[str] = set()  # acquisitions on hold (`tilepipe pause --acq`)
        self.ready = asyncio.Event()
        self.stopping = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop` is set, then drain in-flight work and close."""
        self.stopping = stop
        if self.transport is None:
            self.transport = await NatsTransport.connect(
                self.config.nats, name=f"tilepipe-{self.worker}"
            )
        transport = self.transport
        tasks: set[asyncio.Task] = set()
        background: list[asyncio.Task] = []
        consumer: Consumer | None = None
        try:
            consumer = await transport.bind(
                self.name, type(self.stage), self.settings, stop, self.log
            )
            if consumer is None:
                return
            await self.stage.setup(transport)
            await consumer.start(lambda msg: self._spawn(msg, consumer, tasks))
            background = [
                asyncio.create_task(job)
                for job in (
                    self._poll_backlog(consumer, stop),
                    self._heartbeats(stop),
                    transport.watch(HOLD_BUCKET, self._on_hold, stop, self.log),
                )
            ]
            self.ready.set()
            self.log.info("stage_started", concurrency=self.settings.concurrency)
            await consumer.watch(stop)
        finally:
            if consumer is not None:
                await consumer.stop()  # no new deliveries
            await self._drain(tasks)
            for job in background:
                job.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            if not self._injected:
                await transport.close()
            self._executor.shutdown(wait=False, cancel_futures=True)
            self.log.info("stage_stopped")

    def _on_hold(self, acq: str, held: bool) -> None:
        """Keep `held` in step with the keys of the holds bucket."""
        if held:
            self.held.add(acq)
        else:
            self.held.discard(acq)

    def _spawn(self, msg: Msg, consumer: Consumer, tasks: set) -> None:
        task = asyncio.create_task(self._deliver_and_release(msg, consumer))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def _deliver_and_release(self, msg: Msg, consumer: Consumer) -> None:
        try:
            await self.deliver(msg)
        finally:
            await consumer.release()

    async def _drain(self, tasks: set[asyncio.Task]) -> None:
        """Let in-flight work finish (bounded); what is cut off is redelivered later."""
        if not tasks:
            return
        self.log.info("draining", in_flight=len(tasks))
        _done, pending = await asyncio.wait(set(tasks), timeout=self.settings.drain_timeout_s)
        for task in pending:
            task.cancel()
        if pending:
            self.log.warning("drain_timeout", abandoned=len(pending))

    async def deliver(self, msg: Msg) -> None:
        """Handle one delivery end to end, ending in exactly one outcome (`_ok`, `_retry`,
        `_fail`, `_park`; `_wait_for_space` inside the handling); never raises."""
        attempt = delivery_count(msg)
        if attempt > 1:
            self.m.redeliveries.inc()
        event = await self._accept(msg)
        if event is None:
            return
        log = self.log.bind(**event.log_context(), attempt=attempt)
        d = Delivery(msg, event, attempt, replay_tag(msg), log)
        if event.acq in self.held:
            await self._park(d)
            return
        if attempt > self.settings.max_deliver:
            error = f"no acknowledgement after {self.settings.max_deliver} deliveries (worker lost)"
            await self._fail(d, error, attempt - 1)
            return
        self._in_flight[id(msg)] = (msg, time.monotonic())
        try:
            result, outputs = await self._handle(d)
        except (PermanentError, PathEscapeError) as exc:  # retrying cannot help
            await self._fail(d, f"{type(exc).__name__}: {exc}", attempt)
        except Exception as exc:  # every handler error is retried or recorded
            error = f"{type(exc).__name__}: {exc}"
            if attempt >= self.settings.max_deliver:
                d.log.exception("handler_failed_final", error=error)
                await self._fail(d, error, attempt)
            else:
                await self._retry(d, error)
        else:
            await self._ok(d, result, outputs)
        finally:
            self._in_flight.pop(id(msg), None)
            self.m.seconds.observe(time.perf_counter() - d.started)

    async def _accept(self, msg: Msg) -> Event | None:
        """The event a delivery carries, or None: a payload that is not what its subject says
        (kind, acquisition, slice, tile, stage) is terminated with a logged, counted reason.
        Permissions are granted on subjects, so the subject vouches for the payload."""
        try:
            return decode_event(msg.data, accept=self._accepts, subject=msg.subject)
        except InvalidEvent as exc:
            EVENTS_INVALID.labels(self.name, exc.reason).inc()
            self.m.invalid.inc()
            self.log.warning(
                "event_rejected",
                reason=exc.reason,
                detail=exc.detail,
                subject=msg.subject,
                stream_seq=msg.metadata.sequence.stream,
            )
            await _quietly(msg.term())
            return None

    async def _handle(self, d: Delivery) -> tuple[Result, list[Event]]:
        """Call the handler (waiting out a full disk), publish its outputs, ack the input."""
        d.origin = Origin(  # here: a value it refuses fails the delivery, not the task
            arrived_at=arrival_time(d.event),
            stage=self.name,
            input_type=d.event.kind,
            attempt=d.attempt,
            host=HOSTNAME,
            worker=self.worker,
            started_at=d.started_at,
            replay=d.replay or "",
        )
        try:
            result = await self._call_handler(d)
        except Exception as exc:
            if not out_of_space(exc) or self.stopping.is_set():
                raise
            result = await self._wait_for_space(d, exc)
        # events built in the handler already carry `origin`; others get a stamped copy
        outputs = [
            out if out.origin is d.origin else out.model_copy(update={"origin": d.origin})
            for out in result.events
        ]
        if result.unchanged:  # a forced replay recomputes: never unchanged
            outputs = [out for out in outputs if not await self._in_log(out)]
            if not outputs:
                result.detail = result.detail or "unchanged: outputs and events exist"
        for out in outputs:
            await self._publish(out, replay=d.replay)
        await d.msg.ack()
        return result, outputs

    async def _ok(self, d: Delivery, result: Result, outputs: list[Event]) -> None:
        """Outcome: handled, outputs published and the input acknowledged."""
        seconds = time.perf_counter() - d.started
        m = self.m
        m.ok.inc()
        if result.bytes_read:
            m.bytes_read.inc(result.bytes_read)
        if result.bytes_written:
            m.bytes_written.inc(result.bytes_written)
        slow = self.monitor.observed(outputs, d.replay)
        if slow:  # outputs whose progress or latency needs a look at the stream
            await self.monitor.handled_slow(self.transport, d.event, slow, replay=d.replay)
        d.log.info(
            "event_handled",
            seconds=round(seconds, 4),
            published=[e.kind for e in outputs],
        )
        if not outputs or result.detail:  # else the outputs carry the record
            await self._record(d, "ok", detail=result.detail)

    async def _retry(self, d: Delivery, error: str) -> None:
        """Outcome: the handler failed with deliveries left: redelivered after a backoff."""
        delay = retry_delay(self.settings, d.attempt)
        self.m.retry.inc()
        d.log.warning("handler_failed_retry", error=error, retry_in_s=delay)
        await _quietly(d.msg.nak(delay=delay))
        await self._record(d, "retry", error)

    async def _wait_for_space(self, d: Delivery, exc: BaseException) -> Result:
        """The handler failed for want of disk space (`exc`): call it again after a pause
        until it succeeds. A full disk is no fault of the input, so it must not use up the
        input's deliveries (the heartbeats keep the delivery alive). When stopping, or on
        another error, the error takes the normal path."""
        waits = 0
        while True:
            waits += 1
            delay = retry_delay(self.settings, waits)
            NO_SPACE_WAITS.labels(self.name).inc()
            d.log.warning("no_space_waiting", error=str(exc), waits=waits, retry_in_s=delay)
            await sleep_or_stop(self.stopping, delay)
            try:
                return await self._call_handler(d)
            except Exception as again:
                if not out_of_space(again) or self.stopping.is_set():
                    raise
                exc = again

    async def _call_handler(self, d: Delivery) -> Result:
        """The stage's handler, with `origin` current so the events it builds carry it."""
        ctx = Context(
            config=self.config,
            settings=self.settings,
            attempt=d.attempt,
            worker=self.worker,
            store=self.transport,
            log=d.log,
            replay=d.replay,
        )
        token = CURRENT_ORIGIN.set(d.origin)
        try:
            if self._mode == "inline":
                result = self.stage.handle(d.event, ctx)
            elif self._mode == "async":
                result = await self.stage.handle(d.event, ctx)
            else:
                loop = asyncio.get_running_loop()
                run = contextvars.copy_context().run
                result = await loop.run_in_executor(
                    self._executor, run, self.stage.handle, d.event, ctx
                )
        finally:
            CURRENT_ORIGIN.reset(token)
        if not isinstance(result, Result):
            raise TypeError(f"{self.name}.handle returned {type(result).__name__}, not Result")
        return result

    async def _in_log(self, event: Event) -> bool:
        """Whether the newest event on `event`'s subject is `event` (its de-duplication id):
        unlike the server's duplicate window, this holds however long ago it was published.
        Unsure (no permission, a lost connection): False, the publish is de-duplicated as
        usual."""
        try:
            last = await self.transport.last(event.subject())
        except Exception:
            return False
        return last is not None and last.headers.get(MSG_ID) == event.msg_id()

    async def _publish(
        self, event: Event, replay: str | None = None, msg_id: str | None = None
    ) -> None:
        msg_id = event_msg_id(event, msg_id, replay)
        ack = await self.transport.publish(event.subject(), event.to_json(), msg_id, replay)
        self.m.published(event.kind).inc()
        if ack.duplicate:
            self.m.duplicate.inc()

    async def _fail(self, d: Delivery, error: str, attempts: int) -> None:
        """Outcome: record the failure as an event, then stop redelivery of the input.

        Failures never trigger failures: an input that is itself a `stage_failed` is logged,
        counted and terminated, never failed again (a stage consuming failures would
        receive its own failure in turn, without end)."""
        msg, event, log = d.msg, d.event, d.log
        if isinstance(event, StageFailed):
            self.m.failed.inc()
            log.error("failure_dropped", error=error, attempts=attempts, failed_stage=event.stage)
            await _quietly(msg.term())
            await self._record(d, "failed", error, attempt=attempts)
            return
        failed = failure_event(self.name, event, msg.subject, error, attempts)
        try:
            await self._publish(
                failed, replay=d.replay, msg_id=f"{failed.msg_id()}:{msg.metadata.sequence.stream}"
            )
        except TRANSIENT_NATS_ERRORS as exc:
            log.warning("stage_failed_publish_failed", error=str(exc))
            return  # not acknowledged: redelivered, recorded on the next try
        self.m.failed.inc()
        log.error("stage_failed", error=error, attempts=attempts)
        await _quietly(msg.term())
        await self._record(d, "failed", error, attempt=attempts)

    async def _park(self, d: Delivery) -> None:
        """Outcome: set aside an input of a held acquisition until `tilepipe resume --acq`."""
        msg, event = d.msg, d.event
        try:
            await self.transport.publish(
                hold_subject(self.name, event.acq, event.slice_token(), event.tile_token()),
                msg.data,
                f"hold:{self.name}:{msg.metadata.sequence.stream}",
                d.replay,
            )
        except TRANSIENT_NATS_ERRORS as exc:
            d.log.warning("hold_failed", error=str(exc) or type(exc).__name__)
            await _quietly(msg.nak(delay=1.0))
            return
        await _quietly(msg.ack())
        d.log.info("input_held")
        await self._record(d, "held")

    async def _record(
        self,
        d: Delivery,
        outcome: str,
        error: str = "",
        detail: str = "",
        attempt: int | None = None,
    ) -> None:
        """Publish the attempt record (fire and forget: history, not a work item)."""
        if not self.settings.record_attempts or self.transport is None:
            return
        event = d.event
        record = Attempt(
            acq=event.acq,
            stage=self.name,
            input_type=event.kind,
            input_subject=d.msg.subject,
            attempt=d.attempt if attempt is None else attempt,
            outcome=outcome,
            host=HOSTNAME,
            worker=self.worker,
            started_at=d.started_at,
            ended_at=utcnow(),
            error=error[:8000],
            detail=detail[:8000],
            replay=d.replay or "",
            producer=self.name,
            **where(event),
        )
        with contextlib.suppress(Exception):
            await self.transport.send(record.subject(), record.to_json(), record.msg_id())

    async def _heartbeats(self, stop: asyncio.Event) -> None:
        """Tell the server which messages are still being worked on (resets `ack_wait`).

        One loop for the runner: a message is beaten once it has been in flight for a third
        of `ack_wait`, and again every third after that.
        """
        interval = max(self.settings.ack_wait_s / 3.0, 0.05)
        while not stop.is_set():
            await sleep_or_stop(stop, interval / 2)
            now = time.monotonic()
            for key, (msg, last) in list(self._in_flight.items()):
                if now - last >= interval and key in self._in_flight:
                    self._in_flight[key] = (msg, now)
                    await _quietly(msg.in_progress())

    async def _poll_backlog(
        self, consumer: Consumer, stop: asyncio.Event, interval: float = 5.0
    ) -> None:
        """Export the consumer's backlog gauges, and how full the streams it uses are (the
        event stream, the holds bucket, its bookkeeping buckets)."""
        buckets = (HOLD_BUCKET, *self.stage.buckets)
        streams = [self.config.nats.stream, *(f"KV_{bucket}" for bucket in buckets)]
        while not stop.is_set():
            with contextlib.suppress(Exception):
                state = await consumer.state()
                CONSUMER_PENDING.labels(self.name).set(state.pending)
                CONSUMER_ACK_PENDING.labels(self.name).set(state.ack_pending)
                CONSUMER_REDELIVERED.labels(self.name).set(state.redelivered)
                CONSUMER_PAUSED.labels(self.name).set(1 if state.paused else 0)
            for stream in streams:
                with contextlib.suppress(Exception):
                    used, limit = await self.transport.usage(stream)
                    STREAM_USED.labels(stream).set(used)
                    if limit > 0:  # unlimited: nothing to compare to
                        STREAM_MAX.labels(stream).set(limit)
            await sleep_or_stop(stop, interval)


class _StageMetrics:
    """A stage's labelled metric children, looked up once."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.ok = EVENTS_HANDLED.labels(stage, "ok")
        self.retry = EVENTS_HANDLED.labels(stage, "retry")
        self.failed = EVENTS_HANDLED.labels(stage, "failed")
        self.invalid = EVENTS_HANDLED.labels(stage, "invalid")
        self.redeliveries = REDELIVERIES.labels(stage)
        self.duplicate = EVENTS_DUPLICATE.labels(stage)
        self.seconds = HANDLE_SECONDS.labels(stage)
        self.in_flight = IN_FLIGHT.labels(stage)
        self.bytes_read = BYTES_READ.labels(stage)
        self.bytes_written = BYTES_WRITTEN.labels(stage)
        self._published: dict[str, object] = {}

    def published(self, kind: str):
        if kind not in self._published:
            self._published[kind] = EVENTS_PUBLISHED.labels(self.stage, kind)
        return self._published[kind]


async def _quietly(awaitable) -> None:
    """Acks and naks are best effort: a lost one means a redelivery, which stages tolerate."""
    try:
        await awaitable
    except Exception as exc:
        get_logger().debug("ack_failed", error=str(exc) or type(exc).__name__)
