"""The in-memory transport keeps the semantics of the NATS one: the same checks run against
`MemoryTransport` (unit) and `NatsTransport` on a real server."""

from __future__ import annotations

import pytest

from services.runtime.bus import MSG_ID, REPLAY_HEADER
from services.runtime.testing import MemoryTransport
from services.runtime.transport import NatsTransport, Transport
from services.state.lattice import LATTICE_BUCKET


@pytest.fixture(params=[pytest.param("memory", marks=pytest.mark.unit), "nats"])
def transport(request) -> Transport:
    if request.param == "memory":
        return MemoryTransport()
    return NatsTransport(request.getfixturevalue("js"), "TILEPIPE")


async def test_publish_deduplicates_by_message_id_and_keeps_the_headers(transport: Transport):
    first = await transport.publish("tp.tile_arrived.c1.0.m0-r0-c0", b"1", "id-1")
    again = await transport.publish("tp.tile_arrived.c1.0.m0-r0-c0", b"2", "id-1")
    other = await transport.publish("tp.tile_arrived.c1.0.m0-r0-c1", b"3", "id-2", "tag")
    assert not first.duplicate and again.duplicate and again.seq == first.seq
    assert other.seq > first.seq and not other.duplicate
    last = await transport.last("tp.tile_arrived.c1.0.m0-r0-c1")
    assert (last.data, last.seq) == (b"3", other.seq)
    assert last.headers == {MSG_ID: "id-2", REPLAY_HEADER: "tag"}
    assert (await transport.last("tp.tile_arrived.c1.0.m0-r0-c0")).data == b"1"
    assert await transport.last("tp.tile_arrived.c1.0.m0-r9-c9") is None
    await transport.send("tp.tile_arrived.c1.1.m0-r0-c0", b"4", "id-3")
    await transport.publish("tp.tile_arrived.c1.1.m0-r0-c0", b"5", "id-4")  # after the send
    assert await transport.subjects("tp.tile_arrived.c1.>") == {
        "tp.tile_arrived.c1.0.m0-r0-c0": 1,
        "tp.tile_arrived.c1.0.m0-r0-c1": 1,
        "tp.tile_arrived.c1.1.m0-r0-c0": 2,
    }
    assert list(await transport.subjects("tp.tile_arrived.c1.*.m0-r0-c1")) == [
        "tp.tile_arrived.c1.0.m0-r0-c1"
    ]


async def test_key_value_revisions_create_and_prefix_reads(transport: Transport):
    kv = await transport.kv(LATTICE_BUCKET)
    assert await kv.get("c2.0.m0.tile.r0-c0") is None
    first = await kv.put("c2.0.m0.tile.r0-c0", b'{"state": "processed"}')
    assert await kv.create("c2.0.m0.tile.r0-c0", b"{}") is None  # a live key: refused
    created = await kv.create("c2.0.m0.tile.r0-c1", b'{"state": "missing"}')
    assert created is not None and created > first
    await kv.put("c2.0.m0.stitched", b"")
    await kv.put("c2.1.m0.tile.r0-c0", b"other slice")
    assert await kv.get("c2.0.m0.tile.r0-c0") == b'{"state": "processed"}'
    assert await kv.entries("c2.0.m0") == {
        "tile.r0-c0": b'{"state": "processed"}',
        "tile.r0-c1": b'{"state": "missing"}',
        "stitched": b"",
    }
    assert await kv.entries("c2.9") == {}
