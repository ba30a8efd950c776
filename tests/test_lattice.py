"""Mosaic bookkeeping in the KV bucket: a state read is complete, never partial."""

from __future__ import annotations

import asyncio

from services.runtime.transport import NatsTransport
from services.state.lattice import LATTICE_BUCKET, MosaicBook


async def test_state_reads_every_key_of_a_large_mosaic(js):
    book = await MosaicBook.open(NatsTransport(js), "lat", 3, 0)
    other = await MosaicBook.open(NatsTransport(js), "lat", 4, 0)  # another slice: not read
    tiles = [(r, c) for r in range(25) for c in range(24)]  # 600 keys: more than a watch queues
    await asyncio.gather(*(book.mark_tile(r, c, "processed", path=f"t{r}-{c}") for r, c in tiles))
    await asyncio.gather(
        *(book.record_pair((0, c), (0, c + 1), {"dy": 0.5, "dx": c}) for c in range(10))
    )
    await book.mark_stitched("abc")
    await other.mark_tile(0, 0, "processed")
    kv = await js.key_value(LATTICE_BUCKET)
    await book.mark_tile(99, 99, "processed")
    await kv.delete(f"{book.prefix}.tile.r99-c99")  # a deleted key counts, holds nothing

    states = await asyncio.gather(*(book.state() for _ in range(8)))  # concurrent readers
    for state in states:
        assert set(state.tiles) == set(tiles)
        assert state.tiles[(24, 23)] == {"state": "processed", "path": "t24-23"}
        assert len(state.pairs) == 10 and state.pairs[((0, 3), (0, 4))]["dx"] == 3
        assert state.stitched_digest == "abc"
        assert state.processed() == set(tiles)


async def test_state_of_an_empty_mosaic(js):
    state = await (await MosaicBook.open(NatsTransport(js), "lat", 0, 0)).state()
    assert state.tiles == {} and state.pairs == {} and state.stitched_digest is None


async def test_register_book_reads_every_slice_it_was_given(js):
    """The register stage's book reads through the same counted watch: a slice whose
    `stitched` key was just written is always seen (missing it left the slice unregistered
    for good, seen in CI under load)."""
    from services.stages.register import RegisterBook

    transport = NatsTransport(js)
    book = await RegisterBook.open(transport, "regbook", 0)
    other = await RegisterBook.open(transport, "regbook", 1)  # another mosaic index: not read
    await asyncio.gather(
        *(book.put(s, "stitched", {"path": f"s{s}.ome.zarr"}) for s in range(300)),
        *(book.put(s, "registered", {"basis": f"b{s}"}) for s in range(0, 300, 2)),
    )
    await other.put(0, "stitched", {"path": "other"})
    kv = await js.key_value(LATTICE_BUCKET)
    await book.put(999, "stitched", {"path": "gone"})
    await kv.delete(f"{book.prefix}.999.stitched")

    readers = [book.state() for _ in range(40)]  # concurrent readers
    for state in await asyncio.gather(*readers):
        assert sorted(state) == list(range(300))
        assert state[299] == {"stitched": {"path": "s299.ome.zarr"}}
        assert state[298]["registered"] == {"basis": "b298"}
