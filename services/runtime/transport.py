"""What the runtime and the stages need from the server, as one small protocol.

`Transport`: publish with a de-duplication id (and a replay tag), a publish nobody waits on,
the newest message on a subject and the subjects of the event stream, and key-value buckets
(`services.state.buckets`). `NatsTransport` wraps a nats-py JetStream context; the in-memory
double with the same semantics is `services.runtime.testing.MemoryTransport`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import nats.errors
from nats.js import JetStreamContext
from nats.js.api import PubAck
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError

from services.runtime import bus
from services.state.buckets import Buckets
from services.state.eventlog import subjects_seen


@dataclass(frozen=True)
class Stored:
    """A message as the event stream keeps it."""

    subject: str
    data: bytes
    headers: dict[str, str] = field(default_factory=dict)
    seq: int = 0


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


class NatsTransport:
    """`Transport` over a nats-py JetStream context (publishes through `bus.publish`)."""

    def __init__(self, js: JetStreamContext, stream: str = "TILEPIPE") -> None:
        self.js = js
        self.stream = stream
        self._buckets: dict[str, NatsKeyValue] = {}

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
