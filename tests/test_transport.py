"""The runtime's transport against a real nats-server: standing pull requests (`PullFeed`)
and publish acknowledgements matched on one subscription (`PubAcks`)."""

from __future__ import annotations

import asyncio
import time

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.js.api import AckPolicy, ConsumerConfig

from services.runtime.bus import MSG_ID, PubAcks, delivery_count, pubacks
from services.runtime.pullfeed import PullFeed
from tests.conftest import wait_for

STREAM = "TILEPIPE"


async def consumer(js, name: str, max_ack_pending: int = 100, ack_wait: float = 30.0) -> None:
    await js.add_consumer(
        STREAM,
        ConsumerConfig(
            durable_name=name,
            filter_subject="tp.tile_arrived.>",
            ack_policy=AckPolicy.EXPLICIT,
            max_ack_pending=max_ack_pending,
            ack_wait=ack_wait,
        ),
    )


async def publish_n(js, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        await js.publish(f"tp.tile_arrived.a.0.m0-r0-c{i}", f"{i}".encode())


# ----------------------------------------------------------------------------- PubAcks
async def test_pubacks_acknowledges_deduplicates_and_raises_typed_errors(js):
    publisher = pubacks(js)
    assert pubacks(js) is publisher  # one per connection
    first = await publisher.publish("tp.tile_arrived.a.0.x", b"1", {MSG_ID: "id-1"}, 5.0)
    again = await publisher.publish("tp.tile_arrived.a.0.x", b"1", {MSG_ID: "id-1"}, 5.0)
    other = await publisher.publish("tp.tile_arrived.a.0.y", b"2", {MSG_ID: "id-2"}, 5.0)
    assert (first.stream, first.duplicate, again.duplicate) == (STREAM, None, True)
    assert again.seq == first.seq and other.seq == first.seq + 1
    # concurrent publishes are matched to their own acknowledgements
    acks = await asyncio.gather(
        *(
            publisher.publish(f"tp.tile_arrived.a.1.c{i}", b"x", {MSG_ID: f"c{i}"}, 5.0)
            for i in range(50)
        )
    )
    assert sorted(a.seq for a in acks) == list(range(other.seq + 1, other.seq + 51))
    with pytest.raises(nats.js.errors.BadRequestError):  # the server's error answer, typed
        await publisher.publish(
            "tp.tile_arrived.a.0.z", b"3", {"Nats-Expected-Stream": "OTHER"}, 5.0
        )
    with pytest.raises(nats.js.errors.NoStreamResponseError):  # no stream takes the subject
        await publisher.publish("nostream.here", b"4", {}, 5.0)
    assert not publisher._waiting


async def test_pubacks_times_out_and_fails_fast_on_close(config, js):
    nc = await nats.connect(config.nats.url)
    silent = await nc.subscribe("silent.subject")  # interest, but nobody answers
    publisher = PubAcks(nc)
    started = time.monotonic()
    with pytest.raises(nats.errors.TimeoutError):
        await publisher.publish("silent.subject", b"x", {}, 0.5)
    assert 0.5 <= time.monotonic() - started < 0.5 + 3 * PubAcks.SWEEP_S + 0.5
    waiting = asyncio.create_task(publisher.publish("silent.subject", b"y", {}, 60.0))
    await wait_for(lambda: publisher._waiting)
    started = time.monotonic()
    await nc.close()
    with pytest.raises(nats.errors.ConnectionClosedError):
        await waiting
    assert time.monotonic() - started < 2.0
    del silent


# ---------------------------------------------------------------------------- PullFeed
async def test_pullfeed_never_holds_more_than_its_capacity(js):
    await consumer(js, "cap")
    await publish_n(js, 30)
    got, most = [], [0]

    def on_message(msg) -> None:
        got.append(msg)
        most[0] = max(most[0], feed.in_hand)

    feed = PullFeed(js._nc, STREAM, "cap", 4, on_message)
    await feed.start()
    await wait_for(lambda: len(got) == 4)
    await asyncio.sleep(0.3)  # the server has been asked for no more
    assert len(got) == 4 and feed.in_hand == 4
    done = 0
    while done < 30:
        await wait_for(lambda n=done: len(got) > n)
        msg = got[done]
        await msg.ack()
        await feed.release()
        done += 1
    assert most[0] == 4 and feed.in_hand == 0
    assert sorted(int(m.data) for m in got) == list(range(30))
    assert all(delivery_count(m) == 1 for m in got)
    await feed.stop()


async def test_pullfeed_renews_expired_requests(js):
    await consumer(js, "renew")
    got = []
    feed = PullFeed(js._nc, STREAM, "renew", 8, got.append, expires_s=0.6, heartbeat_s=0.2)
    await feed.start()
    stop = asyncio.Event()
    watcher = asyncio.create_task(feed.watch(stop, every_s=0.1))
    await asyncio.sleep(2.0)  # several requests expire (408) and are asked again
    await publish_n(js, 3)
    await wait_for(lambda: len(got) == 3, timeout=5)
    assert feed.requested == 8 - 3 and feed.in_hand == 3
    stop.set()
    await watcher
    await feed.stop()


async def test_pullfeed_stop_leaves_nothing_standing(js):
    """After `stop`, new messages go to the next worker at once (first delivery), not to a
    stopped worker's standing requests where they would wait out `ack_wait`."""
    await consumer(js, "handover", ack_wait=60.0)
    first = []
    feed = PullFeed(js._nc, STREAM, "handover", 8, first.append)
    await feed.start()
    await publish_n(js, 2)
    await wait_for(lambda: len(first) == 2)
    await feed.stop()
    await publish_n(js, 5, start=2)
    nc2 = await nats.connect(js._nc.connected_url.geturl())
    second = []
    other = PullFeed(nc2, STREAM, "handover", 8, second.append)
    await other.start()
    await wait_for(lambda: len(second) == 5, timeout=10)
    assert sorted(int(m.data) for m in second) == [2, 3, 4, 5, 6]
    assert all(delivery_count(m) == 1 for m in second)
    assert len(first) == 2
    await other.stop()
    await nc2.close()


def test_pullfeed_rejects_bad_settings(js):
    with pytest.raises(ValueError, match="capacity"):
        PullFeed(js._nc, STREAM, "x", 0, print)
    with pytest.raises(ValueError, match="heartbeat"):
        PullFeed(js._nc, STREAM, "x", 4, print, expires_s=1.0, heartbeat_s=0.6)


async def test_pullfeed_recovers_when_the_server_ends_its_requests(js):
    """A deleted and re-created consumer: the server ends the standing requests (409), the
    feed starts its bookkeeping over and, once the consumer is back, receives again."""
    await consumer(js, "reborn")
    got = []
    feed = PullFeed(js._nc, STREAM, "reborn", 4, got.append, expires_s=5.0, heartbeat_s=0.5)
    statuses = []
    on_msg = feed._on_msg

    async def spy(msg):
        if msg.headers and msg.headers.get("Status"):
            statuses.append(msg.headers["Status"])
        await on_msg(msg)

    feed._on_msg = spy
    await feed.start()
    stop = asyncio.Event()
    watcher = asyncio.create_task(feed.watch(stop, every_s=0.1))
    assert feed.requested == 4

    async def standing() -> int:
        return (await js.consumer_info(STREAM, "reborn")).num_waiting

    await wait_for(standing)  # the request is on the server before the consumer goes
    await js.delete_consumer(STREAM, "reborn")
    await wait_for(lambda: "409" in statuses, timeout=5)
    await consumer(js, "reborn")
    await publish_n(js, 2)
    await wait_for(lambda: len(got) == 2, timeout=15)
    assert feed.in_hand == 2 and feed.requested <= 2
    stop.set()
    await watcher
    await feed.stop()


async def test_pubacks_first_publishes_at_once_make_one_subscription(config, js):
    """Subscribing can yield (nats-py waits when its flush queue is full): publishes that
    start meanwhile must not subscribe again (each reply would be read once per copy)."""
    nc = await nats.connect(config.nats.url)
    subscribe = nc.subscribe

    async def slow_subscribe(*args, **kwargs):
        await asyncio.sleep(0.05)
        return await subscribe(*args, **kwargs)

    nc.subscribe = slow_subscribe
    before = len(nc._subs)
    publisher = PubAcks(nc)
    acks = await asyncio.gather(
        *(publisher.publish(f"tp.tile_arrived.b.0.c{i}", b"x", {}, 5.0) for i in range(20))
    )
    assert len({a.seq for a in acks}) == 20
    assert len(nc._subs) == before + 1
    await nc.close()
