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
are in a bucket of their own, `tp-holds` (`services.state.buckets.HOLD_BUCKET`), which only
operators write.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from services.state.buckets import Buckets, KeyValue, entries_json, get_json, put_json

LATTICE_BUCKET = "tp-lattice"
# The keys each bookkeeping stage writes, as subject patterns after `$KV.tp-lattice.`.
LATTICE_KEYS: dict[str, tuple[str, ...]] = {
    "stitch": ("*.*.*.tile.*", "*.*.*.pair.*.*", "*.*.*.stitched"),  # MosaicBook
    "register": ("*.register.*.*.*",),  # services.stages.register.RegisterBook
}
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

    def __init__(self, kv: KeyValue, acq: str, slice_index: int, mosaic: int) -> None:
        self.kv = kv
        self.prefix = f"{acq}.{slice_index}.m{mosaic}"

    @staticmethod
    async def open(buckets: Buckets, acq: str, slice_index: int, mosaic: int) -> MosaicBook:
        return MosaicBook(await buckets.kv(LATTICE_BUCKET), acq, slice_index, mosaic)

    async def mark_tile(self, row: int, col: int, state: str, **details: object) -> None:
        await put_json(
            self.kv, f"{self.prefix}.tile.{tile_name(row, col)}", {"state": state, **details}
        )

    async def mark_missing(self, row: int, col: int) -> bool:
        """Mark a tile declared missing, unless it has a state already (a late tile that was
        processed, or failed, is never undone by an `acq_finished` handled after it, e.g.
        redelivered or replayed). Returns whether it was marked."""
        key = f"{self.prefix}.tile.{tile_name(row, col)}"
        return await self.kv.create(key, json.dumps({"state": "missing"}).encode()) is not None

    async def record_pair(self, a: tuple[int, int], b: tuple[int, int], record: dict) -> None:
        await put_json(self.kv, f"{self.prefix}.pair.{tile_name(*a)}.{tile_name(*b)}", record)

    async def mark_stitched(self, digest: str) -> None:
        await put_json(self.kv, f"{self.prefix}.stitched", {"digest": digest})

    async def state(self, timeout: float = 15.0) -> MosaicState:
        """Every key of this mosaic (`KeyValue.entries`: never a partial read)."""
        state = MosaicState()
        for key, value in (await entries_json(self.kv, self.prefix, timeout)).items():
            parts = key.split(".")
            if parts[0] == "tile":
                state.tiles[_rc(parts[1])] = value
            elif parts[0] == "pair":
                state.pairs[(_rc(parts[1]), _rc(parts[2]))] = value
            elif parts[0] == "stitched":
                state.stitched_digest = value.get("digest")
        return state


class SliceBook:
    """Per-slice records of one acquisition under `prefix` (`<prefix>.<slice>.<part>`); the
    register stage's books (RegisterBook, AxisBook) are these."""

    def __init__(self, kv: KeyValue, prefix: str) -> None:
        self.kv = kv
        self.prefix = prefix

    async def put(self, slice_index: int, part: str, record: dict) -> None:
        await put_json(self.kv, f"{self.prefix}.{slice_index}.{part}", record)

    async def get(self, slice_index: int, part: str) -> dict | None:
        return await get_json(self.kv, f"{self.prefix}.{slice_index}.{part}")

    async def state(self) -> dict[int, dict[str, dict]]:
        """slice -> part -> record (`KeyValue.entries`: never a partial read, which would
        leave a slice waiting for good)."""
        out: dict[int, dict[str, dict]] = {}
        for key, value in (await entries_json(self.kv, self.prefix)).items():
            s, _, part = key.partition(".")
            if s.isdigit() and part:  # not another writer's key that looks like one
                out.setdefault(int(s), {})[part] = value
        return out


def _rc(name: str) -> tuple[int, int]:
    r, c = name.split("-")
    return int(r[1:]), int(c[1:])


async def tile_state(
    buckets: Buckets, acq: str, slice_index: int, mosaic: int, row: int, col: int
) -> dict | None:
    kv = await buckets.kv(LATTICE_BUCKET)
    return await get_json(kv, f"{acq}.{slice_index}.m{mosaic}.tile.{tile_name(row, col)}")
