"""The runner's delivery outcomes (ok, retry, fail, park, no-space), driven through
`StageRunner.deliver` with the in-memory transport: no server."""

from __future__ import annotations

import errno
import json
import uuid

import pytest
from prometheus_client import REGISTRY

from messages import TileArrived, TileConverted, decode_event, utcnow
from messages.events import StageFailed, TileCoord
from messages.subjects import filter_matches
from services.core.config import Config, StageSettings
from services.core.errors import PermanentError
from services.runtime.bus import MSG_ID, REPLAY_HEADER
from services.runtime.options import StageOptions
from services.runtime.runner import StageRunner
from services.runtime.stage import Context, Result, Stage
from services.runtime.testing import MemoryTransport

pytestmark = pytest.mark.unit


def arrived(col: int = 0, acq: str = "u1") -> TileArrived:
    return TileArrived(
        acq=acq,
        tile=TileCoord(slice=0, row=0, col=col, index=col),
        path=f"{acq}/t{col}.nii",
        manifest=f"{acq}/manifest.toml",
        size_bytes=10,
        completed_at=utcnow(),
    )


class ScriptedOptions(StageOptions):
    unchanged: bool = False  # the handler reports its outputs complete with the same basis


class Scripted(Stage):
    """TileArrived -> TileConverted, or what `script[call]` says: an exception to raise."""

    name = "scripted"
    blocking = False
    consumes = (TileArrived,)
    produces = (TileConverted,)
    options_model = ScriptedOptions

    def __init__(self, script: list[BaseException | None] | None = None, **kw) -> None:
        super().__init__(Config(), StageSettings(**kw), name=f"unit-{uuid.uuid4().hex[:8]}")
        self.script = list(script or [])
        self.calls: list[int] = []  # ctx.attempt of each call

    def handle(self, event: TileArrived, ctx: Context) -> Result:
        self.calls.append(ctx.attempt)
        if self.script:
            error = self.script.pop(0)
            if error is not None:
                raise error
        out = TileConverted(
            acq=event.acq,
            tile=event.tile,
            path=f"conv/{event.tile.token()}.zarr",
            raw_path=event.path,
            shape=[1, 2, 3],
            dtype="uint16",
            producer=self.name,
        )
        return Result(events=[out], unchanged=self.options.unchanged)


def runner_of(stage: Stage) -> tuple[StageRunner, MemoryTransport]:
    transport = MemoryTransport()
    return StageRunner(stage, Config(), transport=transport), transport


def count(metric: str, **labels) -> float:
    return REGISTRY.get_sample_value(metric, labels) or 0.0


def handled(stage: Stage, outcome: str) -> float:
    return count("tilepipe_events_handled_total", stage=stage.name, outcome=outcome)


def attempts(transport: MemoryTransport) -> list[tuple[int, str]]:
    return [(a["attempt"], a["outcome"]) for a in transport.events("tp.attempt.>")]


async def test_ok_publishes_the_outputs_with_their_message_id_then_acks():
    stage = Scripted()
    runner, transport = runner_of(stage)
    msg = await transport.delivery(arrived(3))
    await runner.deliver(msg)
    assert transport.outcome(msg) == "ack"
    [out] = list(transport.matching("tp.tile_converted.>"))
    event = decode_event(out.data)
    assert out.headers == {MSG_ID: event.msg_id()}
    assert event.origin.stage == stage.name and event.origin.attempt == 1
    assert handled(stage, "ok") == 1
    assert attempts(transport) == []  # the output carries the record


async def test_a_replayed_delivery_publishes_new_ids_and_passes_the_tag_on():
    stage = Scripted()
    runner, transport = runner_of(stage)
    await runner.deliver(await transport.delivery(arrived(), replay="fix"))
    [out] = list(transport.matching("tp.tile_converted.>"))
    event = decode_event(out.data)
    assert out.headers == {MSG_ID: f"{event.msg_id()}:replay:fix", REPLAY_HEADER: "fix"}
    assert event.origin.replay == "fix"


async def test_a_raising_handler_is_retried_with_backoff_then_failed_after_max_deliver():
    boom = RuntimeError("boom")
    stage = Scripted([boom, boom], max_deliver=2, backoff_s=[0.5])
    runner, transport = runner_of(stage)
    event = arrived()
    first = await transport.delivery(event, attempt=1)
    await runner.deliver(first)
    assert transport.outcome(first) == "nak" and transport.nak_delay(first) == 0.5
    assert list(transport.matching("tp.stage_failed.>")) == []
    second = await transport.delivery(event, attempt=2)
    await runner.deliver(second)
    assert transport.outcome(second) == "term"
    [failed] = [decode_event(m.data) for m in transport.matching("tp.stage_failed.>")]
    assert isinstance(failed, StageFailed)
    assert (failed.stage, failed.attempts, failed.error) == (stage.name, 2, "RuntimeError: boom")
    assert stage.calls == [1, 2]
    assert attempts(transport) == [(1, "retry"), (2, "failed")]
    assert (handled(stage, "retry"), handled(stage, "failed")) == (1, 1)


async def test_a_delivery_past_max_deliver_fails_without_calling_the_handler():
    stage = Scripted(max_deliver=2, backoff_s=[0.1])
    runner, transport = runner_of(stage)
    msg = await transport.delivery(arrived(), attempt=3)  # the worker holding it was lost
    await runner.deliver(msg)
    assert transport.outcome(msg) == "term" and stage.calls == []
    [failed] = transport.events("tp.stage_failed.>")
    assert failed["attempts"] == 2 and "worker lost" in failed["error"]


async def test_a_permanent_error_fails_at_once():
    stage = Scripted([PermanentError("never")], max_deliver=5, backoff_s=[0.1])
    runner, transport = runner_of(stage)
    msg = await transport.delivery(arrived())
    await runner.deliver(msg)
    assert transport.outcome(msg) == "term"
    [failed] = transport.events("tp.stage_failed.>")
    assert (failed["attempts"], failed["error"]) == (1, "PermanentError: never")


async def test_a_failure_that_cannot_be_recorded_is_left_for_redelivery():
    stage = Scripted([PermanentError("never")])
    runner, transport = runner_of(stage)
    msg = await transport.delivery(arrived())
    transport.down = True
    await runner.deliver(msg)
    assert transport.outcome(msg) is None  # neither acked nor terminated: it comes again
    assert handled(stage, "failed") == 0


async def test_a_full_disk_is_waited_out_without_using_up_deliveries():
    full = OSError(errno.ENOSPC, "No space left on device")
    stage = Scripted([full, full], max_deliver=1, backoff_s=[0.01])
    runner, transport = runner_of(stage)
    msg = await transport.delivery(arrived())
    await runner.deliver(msg)
    assert transport.outcome(msg) == "ack"
    assert stage.calls == [1, 1, 1]  # the same delivery, called again
    assert count("tilepipe_no_space_waits_total", stage=stage.name) == 2
    assert len(list(transport.matching("tp.tile_converted.>"))) == 1


async def test_a_repeated_input_publishes_no_second_output():
    stage = Scripted()
    runner, transport = runner_of(stage)
    event = arrived()
    for attempt in (1, 2):  # redelivered after its outputs were published
        msg = await transport.delivery(event, attempt=attempt)
        await runner.deliver(msg)
        assert transport.outcome(msg) == "ack"
    assert len(list(transport.matching("tp.tile_converted.>"))) == 1  # the id is the same
    assert count("tilepipe_events_duplicate_total", stage=stage.name) == 1


async def test_unchanged_outputs_are_published_only_where_the_log_lacks_them():
    stage = Scripted(options={"unchanged": True})
    runner, transport = runner_of(stage)
    await runner.deliver(await transport.delivery(arrived(0)))
    assert len(list(transport.matching("tp.tile_converted.>"))) == 1  # not in the log yet
    await runner.deliver(await transport.delivery(arrived(0), attempt=2))
    assert count("tilepipe_events_duplicate_total", stage=stage.name) == 0  # not even tried
    [record] = transport.events("tp.attempt.>")
    assert (record["outcome"], record["detail"]) == ("ok", "unchanged: outputs and events exist")


async def test_an_input_of_a_held_acquisition_is_parked():
    stage = Scripted()
    runner, transport = runner_of(stage)
    runner.held.add("u1")
    msg = await transport.delivery(arrived(acq="u1"), replay="r1")
    await runner.deliver(msg)
    assert transport.outcome(msg) == "ack" and stage.calls == []
    [parked] = list(transport.matching(f"tp.hold_{stage.name}.u1.>"))
    assert parked.data == msg.data
    seq = msg.metadata.sequence.stream
    assert parked.headers == {MSG_ID: f"hold:{stage.name}:{seq}", REPLAY_HEADER: "r1"}
    assert attempts(transport) == [(1, "held")]


async def test_a_payload_its_subject_does_not_vouch_for_is_terminated():
    stage = Scripted()
    runner, transport = runner_of(stage)
    forged = arrived(acq="other").to_json()
    msg = await transport.delivery(arrived(acq="u1"), data=forged)
    await runner.deliver(msg)
    assert transport.outcome(msg) == "term" and stage.calls == []
    assert count("tilepipe_events_handled_total", stage=stage.name, outcome="invalid") == 1
    assert list(transport.matching("tp.tile_converted.>")) == []


async def test_a_failure_is_never_failed_in_turn():
    class OnFailures(Scripted):
        consumes = (StageFailed,)

    stage = OnFailures([PermanentError("no")])
    runner, transport = runner_of(stage)
    failure = StageFailed(
        acq="u1", stage="x", input_type="t", input_subject="s", error="e", attempts=1
    )
    msg = await transport.delivery(failure)
    await runner.deliver(msg)
    assert transport.outcome(msg) == "term"
    assert len(transport.events("tp.stage_failed.>")) == 1  # only the input itself


async def test_the_double_deduplicates_matches_subjects_and_keeps_kv_revisions():
    transport = MemoryTransport()
    first = await transport.publish("tp.a.x", b"1", "id-1")
    again = await transport.publish("tp.a.x", b"2", "id-1")
    other = await transport.publish("tp.a.y", b"3", "id-2")
    assert (first.seq, again.seq, again.duplicate, other.seq) == (1, 1, True, 2)
    assert (await transport.last("tp.a.x")).data == b"1"
    assert await transport.last("tp.b") is None
    assert await transport.subjects("tp.*.>") == {"tp.a.x": 1, "tp.a.y": 1}
    assert filter_matches("tp.*.x", "tp.a.x") and filter_matches("tp.>", "tp.a.b")
    assert not filter_matches("tp.>", "tp") and not filter_matches("tp.*", "tp.a.b")
    kv = await transport.kv("b")
    assert await transport.kv("b") is kv
    assert await kv.create("k.1", b"v") == 1 and await kv.create("k.1", b"w") is None
    assert await kv.put("k.2", json.dumps({"a": 1}).encode()) == 2
    await kv.delete("k.1")
    assert await kv.get("k.1") is None and kv.revision("k.1") == 3
    assert await kv.create("k.1", b"again") == 4  # a deleted key can be created again
    assert await kv.entries("k") == {"1": b"again", "2": b'{"a": 1}'}
