"""Key-value bookkeeping as the books and stages see it, without NATS.

A bucket maps keys (dot-separated tokens) to bytes with a revision per write. The runtime's
transport provides buckets (`services.runtime.transport`: JetStream KV, or the in-memory double
of `services.runtime.testing`); books here and in the stages take any `Buckets`.
"""

from __future__ import annotations

import json
from typing import Protocol

HOLD_BUCKET = "tp-holds"  # key `<acq>`: the acquisition is on hold in every stage (operators)


class KeyValue(Protocol):
    """One bucket: the operations the books use."""

    async def get(self, key: str) -> bytes | None:
        """The live value of `key`, or None (never written, or deleted)."""

    async def put(self, key: str, value: bytes) -> int:
        """Write `key`; returns the new revision."""

    async def create(self, key: str, value: bytes) -> int | None:
        """Write `key` only if it has no live value; returns the revision, or None if it has."""

    async def entries(self, prefix: str, timeout: float = 15.0) -> dict[str, bytes]:
        """Every live key under `prefix.` -> its value, keys without `prefix.`; all of them or
        TimeoutError, never a partial read."""


class Buckets(Protocol):
    """Where key-value buckets come from (a transport, or a stage's Context)."""

    async def kv(self, bucket: str) -> KeyValue:
        """The bucket named `bucket` (it must exist: `tilepipe init` makes them)."""


async def get_json(kv: KeyValue, key: str) -> dict | None:
    """The JSON value of `key`, or None (absent, or empty)."""
    value = await kv.get(key)
    return json.loads(value) if value else None


async def put_json(kv: KeyValue, key: str, record: dict) -> int:
    return await kv.put(key, json.dumps(record).encode())


async def entries_json(kv: KeyValue, prefix: str, timeout: float = 15.0) -> dict[str, dict]:
    """`KeyValue.entries` with JSON values (an empty value reads as {})."""
    found = await kv.entries(prefix, timeout)
    return {key: json.loads(value) if value else {} for key, value in found.items()}
