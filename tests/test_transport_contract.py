"""The in-memory transport keeps the semantics of the NATS one: the same checks run against
`MemoryTransport` (unit) and `NatsTransport` on a real server."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from nats.aio.msg import Msg

from messages import TileConverted, decode_event
from services.core.config import StageSettings
from services.core.logs import get_logger
from services.runtime.bus import MSG_ID, REPLAY_HEADER, event_msg_id
from services.runtime.testing import MemoryTransport
from services.runtime.transport import Consumer, NatsTransport, Transport
from services.state.buckets import HOLD_BUCKET
from services.state.lattice import LATTICE_BUCKET
from tests.conftest import wait_for
from tests.stages_for_tests import ConvertLike, arrived


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


# ------------------------------------------------------------------------------ consumers
@contextlib.asynccontextmanager
async def bound(transport: Transport, **settings) -> AsyncIterator[Deliveries]:
    """ConvertLike's consumer (a name of its own) on `transport`, delivering into a queue."""
    stop = asyncio.Event()
    name = f"contract-{uuid.uuid4().hex[:6]}"
    stage_settings = StageSettings(**settings)
    consumer = await transport.bind(name, ConvertLike, stage_settings, stop, get_logger())
    got = Deliveries(consumer)
    await consumer.start(got.queue.put_nowait)
    watching = asyncio.create_task(consumer.watch(stop))
    try:
        yield got
    finally:
        stop.set()
        await consumer.stop()
        await watching


@dataclass
class Deliveries:
    consumer: Consumer
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)

    async def next(self, timeout: float = 5.0) -> Msg:
        return await asyncio.wait_for(self.queue.get(), timeout)

    async def none_within(self, seconds: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await self.next(seconds)
            return False
        return True

    async def done(self, msg: Msg, answer) -> None:
        await answer
        await self.consumer.release()


async def publish_tiles(transport: Transport, cols: range) -> None:
    for col in cols:
        event = arrived(0, col, acq="k1")
        await transport.publish(event.subject(), event.to_json(), event_msg_id(event))


def col_of(msg: Msg) -> int:
    return decode_event(msg.data).tile.col


async def test_a_consumer_delivers_its_subjects_in_order_within_max_ack_pending(
    transport: Transport,
):
    converted = TileConverted(
        acq="k1", tile=arrived(0, 0).tile, path="c", raw_path="r", shape=[1], dtype="uint16"
    )
    await transport.publish(converted.subject(), converted.to_json(), "not-for-convert")
    await publish_tiles(transport, range(3))
    async with bound(transport, concurrency=2) as got:
        first, second = await got.next(), await got.next()
        assert [col_of(first), col_of(second)] == [0, 1]
        assert (
            first.metadata.num_delivered == 1 and first.subject == arrived(0, 0, acq="k1").subject()
        )
        assert await got.none_within(0.3)  # two unacknowledged: max_ack_pending
        state = await got.consumer.state()
        assert (state.pending, state.ack_pending) == (1, 2)
        await got.done(first, first.ack())
        third = await got.next()
        assert col_of(third) == 2  # never the tile_converted
        await got.done(second, second.term())
        await got.done(third, third.ack())
        assert await got.none_within(0.3)  # acked and terminated: never again


async def test_a_nak_redelivers_after_its_delay_up_to_max_deliver(transport: Transport):
    await publish_tiles(transport, range(1))
    async with bound(transport, max_deliver=2, backoff_s=[0.1]) as got:
        first = await got.next()
        await got.done(first, first.nak(delay=0.4))
        assert await got.none_within(0.2)
        second = await got.next()
        assert second.metadata.num_delivered == 2
        await got.done(second, second.nak())
        third = await got.next()  # one beyond max_deliver, for the runtime to record
        assert third.metadata.num_delivered == 3
        await got.done(third, third.nak())
        assert await got.none_within(0.5)


async def test_an_unacknowledged_delivery_comes_again_after_ack_wait(transport: Transport):
    await publish_tiles(transport, range(1))
    async with bound(transport, ack_wait_s=0.5) as got:
        first = await got.next()
        await asyncio.sleep(0.3)
        await first.in_progress()  # a beat: ack_wait starts over
        assert await got.none_within(0.35)
        await got.consumer.release()  # the worker gave up on it
        again = await got.next()
        assert again.metadata.num_delivered == 2
        assert (await got.consumer.state()).redelivered == 1
        await got.done(again, again.ack())


async def test_a_watch_reports_a_buckets_keys_then_their_changes(transport: Transport):
    holds = await transport.kv(HOLD_BUCKET)
    await holds.put("before", b"{}")
    seen: list[tuple[str, bool]] = []
    stop = asyncio.Event()
    watching = asyncio.create_task(
        transport.watch(HOLD_BUCKET, lambda key, live: seen.append((key, live)), stop, get_logger())
    )
    await wait_for(lambda: seen == [("before", True)], timeout=5)
    await holds.put("after", b"{}")
    await holds.delete("before")
    await wait_for(lambda: len(seen) == 3, timeout=5)
    stop.set()
    watching.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watching
    assert seen == [("before", True), ("after", True), ("before", False)]
    used, _limit = await transport.usage(f"KV_{HOLD_BUCKET}")
    assert used > 0
    await publish_tiles(transport, range(1))
    assert (await transport.usage(transport.stream))[0] > 0
