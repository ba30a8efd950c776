"""`StageRunner.run` consuming through the in-memory transport: a chain of two stages end to
end, retries then a failure, a held acquisition, a drain on stop; no server."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from messages import TileConverted, TileProcessed, decode_event
from messages.events import Event
from services.core.config import Config, StageSettings
from services.runtime.bus import MSG_ID, event_msg_id
from services.runtime.runner import StageRunner
from services.runtime.testing import MemoryTransport
from services.state.buckets import HOLD_BUCKET
from tests.conftest import running_stage, wait_for
from tests.stages_for_tests import ConvertLike, ProcessLike, arrived

pytestmark = pytest.mark.unit


def unique(cls, **settings):
    """A stage of `cls` under a name of its own (metrics and consumers are per name)."""
    options = settings.pop("options", {})
    stage_settings = StageSettings(**{**cls.defaults, **settings, "options": options})
    return cls(Config(), stage_settings, name=f"{cls.name}-{uuid.uuid4().hex[:6]}")


async def publish(transport: MemoryTransport, event: Event) -> None:
    await transport.publish(event.subject(), event.to_json(), event_msg_id(event))


def outcomes(transport: MemoryTransport, stage: str) -> list[tuple[int, str]]:
    records = transport.events("tp.attempt.>")
    return [(r["attempt"], r["outcome"]) for r in records if r["stage"] == stage]


async def test_a_chain_of_two_stages_consumes_end_to_end_and_publishes_each_output_once():
    transport = MemoryTransport()
    convert, process = unique(ConvertLike, concurrency=2), unique(ProcessLike)
    async with (
        running_stage(convert, Config(), transport=transport),
        running_stage(process, Config(), transport=transport),
    ):
        for col in range(3):
            await publish(transport, arrived(0, col))
        await publish(transport, arrived(0, 1))  # the same event again: de-duplicated
        await wait_for(lambda: len(transport.events("tp.tile_processed.>")) == 3, timeout=10)
    for kind in (TileConverted, TileProcessed):
        stored = list(transport.matching(f"tp.{kind.kind}.>"))
        events = [decode_event(m.data) for m in stored]
        assert sorted(e.tile.col for e in events) == [0, 1, 2]
        assert [m.headers for m in stored] == [{MSG_ID: e.msg_id()} for e in events]
    assert [c.unacked for c in transport.consumers.values()] == [{}, {}]
    assert transport.events("tp.stage_failed.>") == []


async def test_a_failing_handler_is_retried_after_its_backoff_then_failed_after_max_deliver():
    transport = MemoryTransport()
    stage = unique(ConvertLike, max_deliver=2, backoff_s=[0.3], options={"fail_until_attempt": 99})
    async with running_stage(stage, Config(), transport=transport):
        await publish(transport, arrived(0, 0))
        await wait_for(lambda: outcomes(transport, stage.name) == [(1, "retry")], timeout=5)
        await asyncio.sleep(0.15)
        assert outcomes(transport, stage.name) == [(1, "retry")]  # the nak's delay holds
        await wait_for(lambda: transport.events("tp.stage_failed.>"), timeout=5)
        await asyncio.sleep(0.1)
    [failed] = transport.events("tp.stage_failed.>")
    assert (failed["stage"], failed["attempts"]) == (stage.name, 2)
    assert failed["error"] == "RuntimeError: injected failure on attempt 2"
    assert outcomes(transport, stage.name) == [(1, "retry"), (2, "failed")]
    assert transport.consumers[stage.name].unacked == {}  # terminated: never again


async def test_an_input_unacknowledged_past_ack_wait_is_redelivered():
    transport = MemoryTransport()
    stage = unique(ConvertLike, concurrency=2, ack_wait_s=0.2, options={"sleep_s": 0.5})
    runner = StageRunner(stage, Config(), transport=transport)
    runner._heartbeats = _no_heartbeats  # a worker that never reports progress
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    await wait_for(runner.ready.is_set, timeout=5)
    await publish(transport, arrived(0, 0))
    consumer = transport.consumers[stage.name]
    await wait_for(lambda: any(u.delivered == 2 for u in consumer.unacked.values()), timeout=5)
    await wait_for(lambda: transport.events("tp.tile_converted.>"), timeout=5)
    stop.set()
    await task
    assert len(transport.events("tp.tile_converted.>")) == 1  # the same id both times


async def _no_heartbeats(stop: asyncio.Event) -> None:
    await stop.wait()


async def test_inputs_of_a_held_acquisition_are_parked_until_the_hold_is_lifted():
    transport = MemoryTransport()
    holds = await transport.kv(HOLD_BUCKET)
    await holds.put("held", b"{}")
    stage = unique(ConvertLike)
    async with running_stage(stage, Config(), transport=transport) as runner:
        await wait_for(lambda: runner.held == {"held"}, timeout=5)  # read at start
        await publish(transport, arrived(0, 0, acq="held"))
        await publish(transport, arrived(0, 1, acq="free"))
        await wait_for(lambda: transport.events("tp.tile_converted.>"), timeout=5)
        await wait_for(lambda: list(transport.matching(f"tp.hold_{stage.name}.>")), timeout=5)
        await holds.delete("held")
        assert runner.held == set()  # pushed by the watch
    [converted] = transport.events("tp.tile_converted.>")
    assert converted["acq"] == "free"
    [parked] = list(transport.matching(f"tp.hold_{stage.name}.held.>"))
    assert decode_event(parked.data).acq == "held"
    assert outcomes(transport, stage.name) == [(1, "held")]


async def test_stop_drains_the_deliveries_in_flight():
    transport = MemoryTransport()
    stage = unique(ConvertLike, concurrency=2, options={"sleep_s": 0.3})
    runner = StageRunner(stage, Config(), transport=transport)
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    for col in range(3):
        await publish(transport, arrived(0, col))
    await wait_for(lambda: len(runner._in_flight) == 2, timeout=5)
    stop.set()
    await task
    assert len(transport.events("tp.tile_converted.>")) == 2  # the two in hand, finished
    consumer = transport.consumers[stage.name]
    assert consumer.unacked == {} and consumer.next_seq == 3  # the third never taken
