"""An in-memory stand-in for the server, for tests without one.

`MemoryTransport` is a `Transport` with the semantics the runtime relies on: one event log with
sequence numbers and message-id de-duplication (for ever: the server's window is
`[nats] duplicate_window_s`), the newest message per subject, subject counts with NATS
wildcards, key-value buckets with revisions (`create` refuses a live key) and their watch,
and one durable consumer per stage (`bind`, `MemoryConsumer`), so `StageRunner(...,
transport=MemoryTransport()).run(stop)` consumes published events end to end.
`delivery` hands a `StageRunner.deliver` a real nats-py message whose acknowledgements land
here (`outcome`), and `context` builds the `Context` a stage's `handle` can be called with:

    transport = MemoryTransport()
    result = await Stitch(config, settings).handle(event, context(config, store=transport))
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import nats.errors
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, PubAck

from messages.events import Event
from messages.subjects import filter_matches
from services.core.config import Config, StageSettings
from services.core.logs import get_logger
from services.runtime.bus import event_msg_id, headers_of
from services.runtime.provision import consumer_config
from services.runtime.stage import Context, Stage
from services.runtime.transport import ConsumerState, Stored, sleep_or_stop
from services.state.buckets import Buckets


@dataclass
class MemoryKeyValue:
    """One bucket: key -> (value, revision); a deleted key keeps its revision, holds None."""

    name: str
    _keys: dict[str, tuple[bytes | None, int]] = field(default_factory=dict)
    _revision: int = 0
    watchers: list[Callable[[str, bool], None]] = field(default_factory=list)

    async def get(self, key: str) -> bytes | None:
        return self._keys.get(key, (None, 0))[0]

    async def put(self, key: str, value: bytes) -> int:
        self._revision += 1
        self._keys[key] = (bytes(value), self._revision)
        for on_change in list(self.watchers):
            on_change(key, True)
        return self._revision

    async def create(self, key: str, value: bytes) -> int | None:
        if await self.get(key) is not None:
            return None
        return await self.put(key, value)

    async def delete(self, key: str) -> None:
        self._revision += 1
        self._keys[key] = (None, self._revision)
        for on_change in list(self.watchers):
            on_change(key, False)

    async def entries(self, prefix: str, timeout: float = 15.0) -> dict[str, bytes]:
        start = f"{prefix}."
        return {
            key[len(start) :]: value
            for key, (value, _rev) in self._keys.items()
            if key.startswith(start) and value is not None
        }

    def revision(self, key: str) -> int:
        """The revision of the last write (or delete) of `key`, 0 if never written."""
        return self._keys.get(key, (None, 0))[1]


class MemoryTransport:
    """A `Transport` (and `Buckets`) kept in memory; see the module docstring.

    `down = True` makes every publish fail as an unreachable server would (TimeoutError).
    """

    def __init__(self, stream: str = "TILEPIPE") -> None:
        self.stream = stream
        self.log: list[Stored] = []  # the event stream, oldest first
        self.buckets: dict[str, MemoryKeyValue] = {}
        self.acks: dict[str, list[bytes]] = {}  # reply subject of a delivery -> what it got
        self.down = False
        self._ids: dict[str, int] = {}  # message id -> sequence of the message stored with it
        self.consumers: dict[str, MemoryConsumer] = {}

    async def publish(
        self, subject: str, data: bytes, msg_id: str, replay: str | None = None
    ) -> PubAck:
        if self.down:
            raise nats.errors.TimeoutError()
        if msg_id in self._ids:
            return PubAck(stream=self.stream, seq=self._ids[msg_id], duplicate=True)
        seq = len(self.log) + 1
        self.log.append(Stored(subject, bytes(data), headers_of(msg_id, replay), seq))
        self._ids[msg_id] = seq
        return PubAck(stream=self.stream, seq=seq)

    async def send(self, subject: str, data: bytes, msg_id: str) -> None:
        await self.publish(subject, data, msg_id)

    async def last(self, subject: str) -> Stored | None:
        return next((m for m in reversed(self.log) if m.subject == subject), None)

    async def subjects(self, subject_filter: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        for m in self.matching(subject_filter):
            counts[m.subject] = counts.get(m.subject, 0) + 1
        return counts

    async def kv(self, bucket: str) -> MemoryKeyValue:
        if bucket not in self.buckets:
            self.buckets[bucket] = MemoryKeyValue(bucket)
        return self.buckets[bucket]

    async def bind(
        self, name: str, stage: type[Stage], settings: StageSettings, stop: asyncio.Event, log
    ) -> MemoryConsumer | None:
        """Stage `name`'s durable consumer (the server's `consumer_config`), created once."""
        if stop.is_set():
            return None
        if name not in self.consumers:
            config = consumer_config(name, stage, settings)
            self.consumers[name] = MemoryConsumer(self, config, settings.concurrency)
        return self.consumers[name]

    async def watch(
        self, bucket: str, on_change: Callable[[str, bool], None], stop: asyncio.Event, log
    ) -> None:
        kv = await self.kv(bucket)
        for key, (value, _rev) in list(kv._keys.items()):
            if value is not None:
                on_change(key, True)
        kv.watchers.append(on_change)
        try:
            await stop.wait()
        finally:
            kv.watchers.remove(on_change)

    async def usage(self, stream: str) -> tuple[int, int]:
        if stream == self.stream:
            return sum(len(m.data) for m in self.log), 0
        kv = self.buckets.get(stream.removeprefix("KV_"))
        values = kv._keys.values() if kv is not None else ()
        return sum(len(value or b"") for value, _rev in values), 0

    async def close(self) -> None:
        """Nothing to close."""

    # --------------------------------------------------------------- for the tests' eyes
    def matching(self, subject_filter: str) -> Iterator[Stored]:
        """Messages of the log on subjects matching `subject_filter`, oldest first."""
        return (m for m in self.log if filter_matches(subject_filter, m.subject))

    def events(self, subject_filter: str = ">") -> list[dict]:
        """The JSON payloads of the matching messages."""
        return [json.loads(m.data) for m in self.matching(subject_filter)]

    async def delivery(
        self,
        event: Event,
        attempt: int = 1,
        replay: str | None = None,
        consumer: str = "stage",
        data: bytes | None = None,
    ) -> Msg:
        """`event` stored in the log (once per id) and delivered for the `attempt`-th time,
        as JetStream hands it to a consumer; `data` replaces its payload (a forged one)."""
        ack = await self.publish(
            event.subject(), event.to_json(), event_msg_id(event, replay=replay), replay
        )
        stored = self.log[ack.seq - 1]
        reply = f"$JS.ACK.{self.stream}.{consumer}.{attempt}.{ack.seq}.{ack.seq}.{time.time_ns()}.0"
        self.acks[reply] = []
        body = stored.data if data is None else data
        client = _Acks(self)
        return Msg(client, subject=stored.subject, reply=reply, data=body, headers=stored.headers)

    def outcome(self, msg: Msg) -> str | None:
        """How the delivery ended: "ack", "nak", "term", or None (not yet); progress beats
        ("+WPI") are not an end."""
        for answer in reversed(self.acks.get(msg.reply, [])):
            if answer.startswith(b"+ACK") or answer == b"":
                return "ack"
            if answer.startswith(b"-NAK"):
                return "nak"
            if answer.startswith(b"+TERM"):
                return "term"
        return None

    def nak_delay(self, msg: Msg) -> float | None:
        """The redelivery delay of the delivery's last negative ack, in seconds."""
        for answer in reversed(self.acks.get(msg.reply, [])):
            if answer.startswith(b"-NAK"):
                return _nak_delay(answer)
        return None


def _nak_delay(answer: bytes) -> float:
    """The delay a negative ack (`-NAK` with an optional JSON body) asks for, in seconds."""
    body = answer[len(b"-NAK") :].strip()
    return json.loads(body)["delay"] / 1e9 if body else 0.0


class _Acks:
    """The client of a delivery: its acknowledgements are recorded (and handed to the
    consumer that delivered it, if any), never sent."""

    def __init__(self, transport: MemoryTransport, consumer: MemoryConsumer | None = None):
        self.transport = transport
        self.consumer = consumer

    async def publish(self, subject: str, payload: bytes = b"", reply: str = "", headers=None):
        self.transport.acks.setdefault(subject, []).append(bytes(payload))
        if self.consumer is not None:
            self.consumer.answer(subject, bytes(payload))


@dataclass
class _Unacked:
    """A delivered message not yet acknowledged: how often delivered, when it is due again."""

    delivered: int
    due: float  # monotonic time of the redelivery (ack_wait, or a nak's delay)


@dataclass
class MemoryConsumer:
    """A durable pull consumer over a `MemoryTransport`'s log, as JetStream keeps one.

    Modelled: the consumer's filter subjects, deliver-all from the first message, explicit
    ack, redelivery after a nak (after its delay) or after `ack_wait` without an ack or a
    progress beat, `max_deliver` (then dropped, as the server does), term, `max_ack_pending`,
    and the worker's free slots (`capacity`, freed by `release`). Not modelled: several
    workers on one consumer (one `on_message` at a time), pausing, the server's backoff list,
    limits on the stream, reconnects. Checked every `tick_s` seconds.
    """

    transport: MemoryTransport
    config: ConsumerConfig
    capacity: int
    tick_s: float = 0.01
    next_seq: int = 1  # the next message of the log not yet looked at
    unacked: dict[int, _Unacked] = field(default_factory=dict)  # by stream sequence
    in_hand: int = 0
    on_message: Callable[[Msg], None] | None = None
    _deliveries: int = 0  # the consumer sequence
    _replies: dict[str, int] = field(default_factory=dict)  # ack subject -> stream sequence

    async def start(self, on_message: Callable[[Msg], None]) -> None:
        self.on_message = on_message
        self.pull()

    async def release(self) -> None:
        self.in_hand -= 1
        self.pull()

    async def watch(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.pull()
            await sleep_or_stop(stop, self.tick_s)

    async def stop(self) -> None:
        self.on_message = None

    async def state(self) -> ConsumerState:
        pending = sum(1 for m in self.transport.log[self.next_seq - 1 :] if self._wants(m))
        redelivered = sum(1 for unacked in self.unacked.values() if unacked.delivered > 1)
        return ConsumerState(pending, len(self.unacked), redelivered)

    def pull(self) -> None:
        """Hand out what is due (redeliveries first, then new messages) into the free slots."""
        now = time.monotonic()
        for seq, unacked in sorted(self.unacked.items()):
            if self.in_hand >= self.capacity or self.on_message is None:
                return
            if unacked.due > now:
                continue
            if unacked.delivered >= self.config.max_deliver:
                del self.unacked[seq]  # the server gives up on it
                continue
            self._deliver(seq, unacked.delivered + 1)
        log = self.transport.log
        while self.next_seq <= len(log) and len(self.unacked) < self.config.max_ack_pending:
            if self.in_hand >= self.capacity or self.on_message is None:
                return
            seq, self.next_seq = self.next_seq, self.next_seq + 1
            if self._wants(log[seq - 1]):
                self._deliver(seq, 1)

    def answer(self, reply: str, payload: bytes) -> None:
        """An acknowledgement of the delivery with ack subject `reply`."""
        seq = self._replies.get(reply, 0)
        unacked = self.unacked.get(seq)
        if unacked is None:
            return
        now = time.monotonic()
        if payload.startswith(b"-NAK"):
            unacked.due = now + _nak_delay(payload)
        elif payload.startswith(b"+WPI"):
            unacked.due = now + self.config.ack_wait
        else:  # ack or term
            del self.unacked[seq]
            self._replies.pop(reply, None)

    def _wants(self, stored: Stored) -> bool:
        return any(filter_matches(f, stored.subject) for f in self.config.filter_subjects)

    def _deliver(self, seq: int, delivered: int) -> None:
        stored = self.transport.log[seq - 1]
        self._deliveries += 1
        self.unacked[seq] = _Unacked(delivered, time.monotonic() + self.config.ack_wait)
        stream, name = self.transport.stream, self.config.durable_name
        reply = f"$JS.ACK.{stream}.{name}.{delivered}.{seq}.{self._deliveries}.{time.time_ns()}.0"
        self._replies[reply] = seq
        client = _Acks(self.transport, self)
        self.in_hand += 1
        self.on_message(
            Msg(
                client,
                subject=stored.subject,
                reply=reply,
                data=stored.data,
                headers=stored.headers,
            )
        )


def context(
    config: Config | None = None,
    settings: StageSettings | None = None,
    store: Buckets | None = None,
    attempt: int = 1,
    replay: str | None = None,
) -> Context:
    """A `Context` for calling a stage's `handle` directly (a fresh `MemoryTransport` as its
    store unless given one)."""
    return Context(
        config=config or Config(),
        settings=settings or StageSettings(),
        attempt=attempt,
        worker="test",
        store=store if store is not None else MemoryTransport(),
        log=get_logger(stage="test"),
        replay=replay,
    )
