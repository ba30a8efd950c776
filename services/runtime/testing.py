"""An in-memory stand-in for the server, for tests without one.

`MemoryTransport` is a `Transport` with the semantics the runtime relies on: one event log with
sequence numbers and message-id de-duplication (for ever: the server's window is
`[nats] duplicate_window_s`), the newest message per subject, subject counts with NATS
wildcards, and key-value buckets with revisions (`create` refuses a live key).
`delivery` hands a `StageRunner.deliver` a real nats-py message whose acknowledgements land
here (`outcome`), and `context` builds the `Context` a stage's `handle` can be called with:

    transport = MemoryTransport()
    result = await Stitch(config, settings).handle(event, context(config, store=transport))
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import nats.errors
from nats.aio.msg import Msg
from nats.js.api import PubAck

from messages.events import Event
from messages.subjects import filter_matches
from services.core.config import Config, StageSettings
from services.core.logs import get_logger
from services.runtime.bus import event_msg_id, headers_of
from services.runtime.stage import Context
from services.runtime.transport import Stored
from services.state.buckets import Buckets


@dataclass
class MemoryKeyValue:
    """One bucket: key -> (value, revision); a deleted key keeps its revision, holds None."""

    name: str
    _keys: dict[str, tuple[bytes | None, int]] = field(default_factory=dict)
    _revision: int = 0

    async def get(self, key: str) -> bytes | None:
        return self._keys.get(key, (None, 0))[0]

    async def put(self, key: str, value: bytes) -> int:
        self._revision += 1
        self._keys[key] = (bytes(value), self._revision)
        return self._revision

    async def create(self, key: str, value: bytes) -> int | None:
        if await self.get(key) is not None:
            return None
        return await self.put(key, value)

    async def delete(self, key: str) -> None:
        self._revision += 1
        self._keys[key] = (None, self._revision)

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
                body = answer[len(b"-NAK") :].strip()
                return json.loads(body)["delay"] / 1e9 if body else 0.0
        return None


class _Acks:
    """The client of a `delivery`: its acknowledgements are recorded, never sent."""

    def __init__(self, transport: MemoryTransport) -> None:
        self.transport = transport

    async def publish(self, subject: str, payload: bytes = b"", reply: str = "", headers=None):
        self.transport.acks.setdefault(subject, []).append(bytes(payload))


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
