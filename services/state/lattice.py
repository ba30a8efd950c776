"""Per-mosaic bookkeeping in the JetStream KV bucket `tp-lattice` (survives restarts).

Keys: `<acq>.<slice>.m<mosaic>.tile.r<R>-c<C>` -> {"state": processed|failed|missing, ...}
      `<acq>.<slice>.m<mosaic>.pair.r<R>-c<C>.r<R>-c<C>` -> the pair's alignment record
      `<acq>.<slice>.m<mosaic>.stitched` -> {"digest": ...} of the inputs last stitched
      `<acq>.register.m<mosaic>.<slice>.stitched|registered` (services/stages/register.py)
      `<acq>.register.axis.<slice>.m<mosaic>|done` (the thru-plane step, stages/thruplane.py)
Tiles write their own keys, then read their neighbours': of two neighbours finishing at the
same time at least one sees the other, so no pair is missed (a pair done twice is harmless).

Only the bookkeeping stages (stitch, register) may read this bucket, each may write only its
own keys (`LATTICE_KEYS`, the permissions of its NATS user); the holds every stage watches
are in a bucket of their own, `tp-holds`, which only operators write.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import nats.errors
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

LATTICE_BUCKET = "tp-lattice"
# The keys each bookkeeping stage writes, as subject patterns after `$KV.tp-lattice.`.
LATTICE_KEYS: dict[str, tuple[str, ...]] = {
    "stitch": ("*.*.*.tile.*", "*.*.*.pair.*.*", "*.*.*.stitched"),  # MosaicBook
    "register": ("*.register.*.*.*",),  # services.stages.register.RegisterBook
}
HOLD_BUCKET = "tp-holds"  # key `<acq>`: the acquisition is on hold in every stage
TERMINAL = ("processed", "failed", "missing")


def tile_name(row: int, col: int) -> str:
    return f"r{row}-c{col}"


@dataclass
class MosaicState:
    """What is known of one mosaic of one slice."""

    tiles: dict[tuple[int, int], dict] = field(default_factory=dict)
    pairs: dict[tuple[tuple[int, int], tuple[int, int]], dict] = field(default_factory=dict)
    stitched_digest: str | None = None

    def processed(self) -> set[tuple[int, int]]:
        return {rc for rc, rec in self.tiles.items() if rec.get("state") == "processed"}

    def digest(self) -> str:
        """Identity of the inputs a mosaic would be stitched from."""
        body = json.dumps(
            [
                sorted((f"{k}", v) for k, v in self.tiles.items()),
                sorted(f"{a}{b}" for a, b in self.pairs),
            ],
            default=str,
        )
        return hashlib.sha256(body.encode()).hexdigest()[:16]


class MosaicBook:
    """Read and write one mosaic's keys."""

    def __init__(self, js: JetStreamContext, kv, acq: str, slice_index: int, mosaic: int) -> None:
        self.js = js
        self.kv = kv
        self.prefix = f"{acq}.{slice_index}.m{mosaic}"

    @staticmethod
    async def open(js: JetStreamContext, acq: str, slice_index: int, mosaic: int) -> MosaicBook:
        return MosaicBook(js, await js.key_value(LATTICE_BUCKET), acq, slice_index, mosaic)

    async def mark_tile(self, row: int, col: int, state: str, **details: object) -> None:
        await self.kv.put(
            f"{self.prefix}.tile.{tile_name(row, col)}",
            json.dumps({"state": state, **details}).encode(),
        )

    async def mark_missing(self, row: int, col: int) -> bool:
        """Mark a tile declared missing, unless it has a state already (a late tile that was
        processed, or failed, is never undone by an `acq_finished` handled after it, e.g.
        redelivered or replayed). Returns whether it was marked."""
        key = f"{self.prefix}.tile.{tile_name(row, col)}"
        try:
            await self.kv.create(key, json.dumps({"state": "missing"}).encode())
        except KeyWrongLastSequenceError:
            return False
        return True

    async def record_pair(self, a: tuple[int, int], b: tuple[int, int], record: dict) -> None:
        key = f"{self.prefix}.pair.{tile_name(*a)}.{tile_name(*b)}"
        await self.kv.put(key, json.dumps(record).encode())

    async def mark_stitched(self, digest: str) -> None:
        await self.kv.put(f"{self.prefix}.stitched", json.dumps({"digest": digest}).encode())

    async def state(self, timeout: float = 15.0) -> MosaicState:
        """Every key of this mosaic (`read_keys`: counted, never a partial read)."""
        state = MosaicState()
        for key, value in (await read_keys(self.js, self.kv, self.prefix, timeout)).items():
            parts = key.split(".")
            if parts[0] == "tile":
                state.tiles[_rc(parts[1])] = value
            elif parts[0] == "pair":
                state.pairs[(_rc(parts[1]), _rc(parts[2]))] = value
            elif parts[0] == "stitched":
                state.stitched_digest = value.get("digest")
        return state


async def read_keys(js: JetStreamContext, kv, prefix: str, timeout: float = 15.0) -> dict:
    """Every live key under `prefix` of the lattice bucket -> its JSON value, keys without
    the prefix, through a server-side filtered watch (not a bucket scan).

    The keys are counted first and the watch is read until that many arrived: its "no more
    initial values" marker alone is not enough, because nats-py can queue it before entries
    already on the wire (seen under load: a mosaic read as empty, a pair never aligned, a
    slice never stitched or registered). Raises TimeoutError (the stage retries) rather
    than return a partial state.
    """
    expected = await _count_keys(js, prefix)
    values: dict[str, dict] = {}
    seen: set[str] = set()
    watcher = await kv.watch(f"{prefix}.>")
    try:
        while True:
            try:
                entry = await watcher.updates(timeout)
            except nats.errors.TimeoutError:
                raise TimeoutError(
                    f"lattice {prefix}: read {len(seen)} of {expected} keys"
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
                values[key] = json.loads(entry.value) if entry.value else {}
            if entry.delta == 0 and len(seen) >= expected:
                break
    finally:
        await watcher.stop()
    return values


async def _count_keys(js: JetStreamContext, prefix: str) -> int:
    """How many keys (live or deleted) the lattice bucket has under `prefix` now."""
    info = await js.stream_info(
        f"KV_{LATTICE_BUCKET}", subjects_filter=f"$KV.{LATTICE_BUCKET}.{prefix}.>"
    )
    return len(info.state.subjects or {})


def _rc(name: str) -> tuple[int, int]:
    r, c = name.split("-")
    return int(r[1:]), int(c[1:])


async def tile_state(
    js: JetStreamContext, acq: str, slice_index: int, mosaic: int, row: int, col: int
) -> dict | None:
    kv = await js.key_value(LATTICE_BUCKET)
    try:
        entry = await kv.get(f"{acq}.{slice_index}.m{mosaic}.tile.{tile_name(row, col)}")
    except KeyNotFoundError:
        return None
    return json.loads(entry.value)
