"""What the runtime and the stages need from the server, as one small protocol.

`Transport`: publish with a de-duplication id (and a replay tag), a publish nobody waits on,
the newest message on a subject and the subjects of the event stream, key-value buckets
(`services.state.buckets`) and a watch of one, how full a stream is, and `bind`: a stage's
durable consumer (`Consumer`), whose deliveries are nats-py messages (ack, nak with a delay,
term, in-progress, `num_delivered` in their metadata). `NatsTransport` wraps a nats-py
JetStream context (`NatsTransport.connect` makes one that owns its connection); the in-memory
double with the same semantics is `services.runtime.testing.MemoryTransport`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import PubAck
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError

from services.core.config import NatsSettings, StageSettings
from services.runtime import bus
from services.runtime.provision import ensure_consumer
from services.runtime.pullfeed import PullFeed
from services.runtime.stage import Stage
from services.state.buckets import Buckets
from services.state.eventlog import subjects_seen

TRANSIENT_NATS_ERRORS = (
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.NoServersError,
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.StaleConnectionError,
    nats.errors.Error,
    asyncio.TimeoutError,
    OSError,
)


@dataclass(frozen=True)
class Stored:
    """A message as the event stream keeps it."""

    subject: str
    data: bytes
    headers: dict[str, str] = field(default_factory=dict)
    seq: int = 0


@dataclass(frozen=True)
class ConsumerState:
    """A consumer's backlog, for the gauges."""

    pending: int = 0  # not yet delivered
    ack_pending: int = 0  # delivered, not yet acknowledged
    redelivered: int = 0
    paused: bool = False


class Consumer(Protocol):
    """A stage's durable consumer: deliveries for this worker's free slots."""

    async def start(self, on_message: Callable[[Msg], None]) -> None:
        """Begin delivering; `on_message` gets each delivery (it must `release` it)."""

    async def release(self) -> None:
        """One delivery is finished (acked, nak'd or abandoned): its slot is free again."""

    async def watch(self, stop: asyncio.Event) -> None:
        """Keep deliveries coming until `stop` is set."""

    async def stop(self) -> None:
        """Deliver nothing more; deliveries in hand are still acked by their owner."""

    async def state(self) -> ConsumerState:
        """The consumer's backlog as the server counts it."""


class Transport(Buckets, Protocol):
    """The server as the runtime sees it; `stream` is the event stream."""

    stream: str

    async def publish(
        self, subject: str, data: bytes, msg_id: str, replay: str | None = None
    ) -> PubAck:
        """Store `data` on `subject` once per `msg_id` (a repeat: `duplicate=True`), with the
        replay tag as a header; raises what an unreachable server would."""

    async def send(self, subject: str, data: bytes, msg_id: str) -> None:
        """Publish without waiting for the server's acknowledgement (history records)."""

    async def last(self, subject: str) -> Stored | None:
        """The newest message of the event stream on `subject`, or None."""

    async def subjects(self, subject_filter: str) -> dict[str, int]:
        """Subjects of the event stream matching `subject_filter`, with message counts."""

    async def bind(
        self, name: str, stage: type[Stage], settings: StageSettings, stop: asyncio.Event, log
    ) -> Consumer | None:
        """Create or update stage `name`'s durable consumer (waiting for the stream to exist,
        logging why) and return it; None when `stop` was set first."""

    async def watch(
        self, bucket: str, on_change: Callable[[str, bool], None], stop: asyncio.Event, log
    ) -> None:
        """Call `on_change(key, live)` for every key of `bucket` and every later change
        (`live` False: deleted), until `stop` is set."""

    async def usage(self, stream: str) -> tuple[int, int]:
        """Bytes stored in `stream` (the event stream or `KV_<bucket>`), and its limit
        (0: none)."""

    async def close(self) -> None:
        """Flush and close what the transport opened itself (nothing for an injected one)."""


class NatsTransport:
    """`Transport` over a nats-py JetStream context (publishes through `bus.publish`)."""

    def __init__(
        self, js: JetStreamContext, stream: str = "TILEPIPE", owned: Client | None = None
    ) -> None:
        self.js = js
        self.stream = stream
        self._buckets: dict[str, NatsKeyValue] = {}
        self._owned = owned  # the connection `close` closes

    @classmethod
    async def connect(cls, settings: NatsSettings, name: str) -> NatsTransport:
        """A transport over its own connection (`bus.connect`), closed by `close`."""
        nc = await bus.connect(settings, name=name)
        return cls(nc.jetstream(), settings.stream, owned=nc)

    async def bind(
        self, name: str, stage: type[Stage], settings: StageSettings, stop: asyncio.Event, log
    ) -> NatsConsumer | None:
        delay = 0.5
        while not stop.is_set():
            try:
                await ensure_consumer(self.js, self.stream, name, stage, settings)
                return NatsConsumer(self.js, self.stream, name, settings.concurrency, log)
            except NotFoundError:
                log.warning("stream_missing", stream=self.stream, hint="run `tilepipe init`")
            except TRANSIENT_NATS_ERRORS as exc:
                log.warning("consumer_setup_retry", error=str(exc) or type(exc).__name__)
            await sleep_or_stop(stop, delay)
            delay = min(delay * 2, 5.0)
        return None

    async def watch(
        self, bucket: str, on_change: Callable[[str, bool], None], stop: asyncio.Event, log
    ) -> None:
        """Pushed by the server; watched again after a lost connection."""
        while not stop.is_set():
            try:
                kv = await self.js.key_value(bucket)
                watcher = await kv.watch(">")
                async for entry in watcher:
                    if entry is not None:
                        on_change(entry.key, entry.operation not in ("DEL", "PURGE"))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # reconnecting: watch again
                log.debug("hold_watch_retry", error=str(exc) or type(exc).__name__)
                await sleep_or_stop(stop, 1.0)

    async def usage(self, stream: str) -> tuple[int, int]:
        info = await asyncio.wait_for(self.js.stream_info(stream), 2.0)
        return info.state.bytes or 0, max(info.config.max_bytes or 0, 0)

    async def close(self) -> None:
        """In-flight work is finished (acks and publishes sent): flush and close. A full
        `drain()` would wait on the idle pull request until its own timeout."""
        if self._owned is None:
            return
        with contextlib.suppress(Exception):
            await self._owned.flush(timeout=5)
        with contextlib.suppress(Exception):
            await self._owned.close()

    async def publish(
        self, subject: str, data: bytes, msg_id: str, replay: str | None = None
    ) -> PubAck:
        return await bus.publish(self.js, subject, data, msg_id, replay)

    async def send(self, subject: str, data: bytes, msg_id: str) -> None:
        await bus.send(self.js._nc, subject, data, msg_id)

    async def last(self, subject: str) -> Stored | None:
        try:
            msg = await self.js.get_last_msg(self.stream, subject)
        except NotFoundError:
            return None
        return Stored(msg.subject, msg.data or b"", dict(msg.headers or {}), msg.seq or 0)

    async def subjects(self, subject_filter: str) -> dict[str, int]:
        return await subjects_seen(self.js, self.stream, subject_filter)

    async def kv(self, bucket: str) -> NatsKeyValue:
        found = self._buckets.get(bucket)
        if found is None:
            found = NatsKeyValue(self.js, bucket, await self.js.key_value(bucket))
            self._buckets[bucket] = found
        return found


class NatsKeyValue:
    """`KeyValue` over one JetStream KV bucket."""

    def __init__(self, js: JetStreamContext, bucket: str, kv) -> None:
        self.js = js
        self.bucket = bucket
        self._kv = kv

    async def get(self, key: str) -> bytes | None:
        try:
            entry = await self._kv.get(key)
        except KeyNotFoundError:  # also a deleted key
            return None
        return entry.value if entry is not None else None

    async def put(self, key: str, value: bytes) -> int:
        return await self._kv.put(key, value)

    async def delete(self, key: str) -> None:
        await self._kv.delete(key)

    async def create(self, key: str, value: bytes) -> int | None:
        try:
            return await self._kv.create(key, value)
        except KeyWrongLastSequenceError:
            return None

    async def entries(self, prefix: str, timeout: float = 15.0) -> dict[str, bytes]:
        """Through a server-side filtered watch (not a bucket scan).

        The keys are counted first and the watch is read until that many arrived: its "no
        more initial values" marker alone is not enough, because nats-py can queue it before
        entries already on the wire (seen under load: a mosaic read as empty, a pair never
        aligned, a slice never stitched or registered). Raises TimeoutError (the stage
        retries) rather than return a partial read.
        """
        expected = await self._count(prefix)
        values: dict[str, bytes] = {}
        seen: set[str] = set()
        watcher = await self._kv.watch(f"{prefix}.>")
        try:
            while True:
                try:
                    entry = await watcher.updates(timeout)
                except nats.errors.TimeoutError:
                    raise TimeoutError(
                        f"{self.bucket} {prefix}: read {len(seen)} of {expected} keys"
                    ) from None
                if entry is None:
                    if len(seen) >= expected:
                        break
                    continue
                seen.add(entry.key)
                key = entry.key[len(prefix) + 1 :]
                if entry.operation in ("DEL", "PURGE"):  # counts as read, holds nothing
                    values.pop(key, None)
                else:
                    values[key] = entry.value or b""
                if entry.delta == 0 and len(seen) >= expected:
                    break
        finally:
            await watcher.stop()
        return values

    async def _count(self, prefix: str) -> int:
        """How many keys (live or deleted) the bucket has under `prefix` now."""
        info = await self.js.stream_info(
            f"KV_{self.bucket}", subjects_filter=f"$KV.{self.bucket}.{prefix}.>"
        )
        return len(info.state.subjects or {})


@dataclass
class NatsConsumer:
    """`Consumer` over a durable JetStream pull consumer, read through standing pull requests
    (`services.runtime.pullfeed.PullFeed`) for `capacity` slots."""

    js: JetStreamContext
    stream: str
    name: str
    capacity: int
    log: Any
    feed: PullFeed | None = None

    async def start(self, on_message: Callable[[Msg], None]) -> None:
        self.feed = PullFeed(
            self.js._nc, self.stream, self.name, self.capacity, on_message, log=self.log
        )
        await self.feed.start()

    async def release(self) -> None:
        await self.feed.release()

    async def watch(self, stop: asyncio.Event) -> None:
        await self.feed.watch(stop)

    async def stop(self) -> None:
        """No new deliveries; one still arriving is handed back."""
        if self.feed is not None:
            await self.feed.stop()

    async def state(self) -> ConsumerState:
        info = await self.js.consumer_info(self.stream, self.name, timeout=2.0)
        return ConsumerState(
            info.num_pending or 0,
            info.num_ack_pending or 0,
            info.num_redelivered or 0,
            bool(getattr(info, "paused", False)),
        )


async def sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    """Wait `seconds`, or less if `stop` is set meanwhile."""
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
