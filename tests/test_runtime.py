"""The stage runtime against a real nats-server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from messages import StageFailed, TileArrived, TileConverted, TileCoord, decode_event, utcnow
from services.core.config import Config, StageSettings, dump_toml
from services.local.natsserver import free_port
from services.runtime.bus import publish_event
from services.runtime.stage import Result, Stage
from tests.conftest import make_stage, running_stage, stream_messages, wait_for
from tests.stages_for_tests import ConvertLike, ProcessLike

REPO = Path(__file__).resolve().parents[1]


def arrived(i: int, acq: str = "acq1", cols: int = 10) -> TileArrived:
    return TileArrived(
        acq=acq,
        tile=TileCoord(slice=0, row=i // cols, col=i % cols),
        path=f"raw/t{i}.nii",
        manifest="acq1/manifest.toml",
        size_bytes=100,
        completed_at=utcnow(),
    )


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def running(stage_cls, config: Config, **settings):
    return running_stage(make_stage(stage_cls, config, **settings), config)


async def kinds_on(js, subject: str) -> list:
    return [decode_event(m.data) for m in await stream_messages(js, subject)]


async def test_two_stage_chain_end_to_end(config, js):
    async with running(ConvertLike, config, concurrency=4), running(ProcessLike, config):
        for i in range(30):
            await publish_event(js, arrived(i))

        async def done():
            return len(await stream_messages(js, "tp.tile_processed.>")) == 30

        await wait_for(done)
    processed = await kinds_on(js, "tp.tile_processed.acq1.>")
    assert sorted(e.tile.row * 10 + e.tile.col for e in processed) == list(range(30))
    assert all(e.producer == "process_like" for e in processed)


class PrebuiltLike(ConvertLike):
    """Returns an event built outside any delivery (at start-up), handled inline."""

    name = "prebuilt_like"
    blocking = False

    def __init__(self, config, settings) -> None:
        super().__init__(config, settings)
        self.prebuilt = TileConverted(
            acq="acq9",
            tile=TileCoord(slice=0, row=0, col=0),
            path="conv/prebuilt.zarr",
            raw_path="raw/t0.nii",
            shape=[1],
            dtype="uint16",
        )

    def handle(self, event: TileArrived, ctx) -> Result:
        return Result(events=[self.prebuilt])


@pytest.mark.parametrize("stage_cls", [ConvertLike, PrebuiltLike])
async def test_outputs_carry_the_origin_of_their_delivery(config, js, stage_cls):
    """Built in the handler (a worker thread, an async handler) or before any delivery
    (stamped on a copy): every output names the delivery that produced it, and the
    origin does not leak into events built afterwards outside a delivery."""
    tile_in = arrived(0, acq="acq9")
    async with running(stage_cls, config), running(ProcessLike, config):
        await publish_event(js, tile_in)

        async def done():
            return len(await stream_messages(js, "tp.tile_processed.acq9.>")) == 1

        await wait_for(done, timeout=20)
    (converted,) = await kinds_on(js, "tp.tile_converted.acq9.>")
    (processed,) = await kinds_on(js, "tp.tile_processed.acq9.>")
    for out, stage, input_type in (
        (converted, stage_cls.name, "tile_arrived"),
        (processed, "process_like", "tile_converted"),
    ):
        assert out.origin is not None
        assert (out.origin.stage, out.origin.input_type, out.origin.attempt) == (
            stage,
            input_type,
            1,
        )
        assert out.origin.arrived_at == tile_in.completed_at  # carried forward
    assert arrived(1).origin is None


async def test_handler_error_retried_with_backoff_then_stage_failed(config, js, tmp_path):
    marks = tmp_path / "marks"
    before = metric("tilepipe_events_handled_total", stage="convert_like", outcome="failed")
    async with running(
        ConvertLike,
        config,
        max_deliver=3,
        backoff_s=[0.3, 0.6],
        ack_wait_s=5,
        options={"fail_until_attempt": 99, "marker_dir": str(marks)},
    ):
        await publish_event(js, arrived(7))
        failed = await wait_for(lambda: kinds_on(js, "tp.stage_failed.>"))
        # no further delivery after the failure was recorded
        await asyncio.sleep(1.0)
    assert len(failed) == 1
    event = failed[0]
    assert event.stage == "convert_like" and event.attempts == 3
    assert "injected failure on attempt 3" in event.error
    assert event.tile == arrived(7).tile and event.input_type == "tile_arrived"
    starts = [line.split() for line in (marks / "start-m0-r0-c7").read_text().splitlines()]
    assert [int(a) for a, _ in starts] == [1, 2, 3]
    times = [float(t) for _, t in starts]
    assert times[1] - times[0] >= 0.3 and times[2] - times[1] >= 0.6
    assert await kinds_on(js, "tp.tile_converted.>") == []
    after = metric("tilepipe_events_handled_total", stage="convert_like", outcome="failed")
    assert after - before == 1


async def test_transient_error_retried_then_succeeds(config, js, tmp_path):
    async with running(ConvertLike, config, backoff_s=[0.1], options={"fail_until_attempt": 1}):
        await publish_event(js, arrived(3))
        converted = await wait_for(lambda: kinds_on(js, "tp.tile_converted.>"))
    assert len(converted) == 1
    assert await kinds_on(js, "tp.stage_failed.>") == []


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"not json at all", "not_json"),
        (b"[1, 2]", "not_object"),
        (json.dumps({**json.loads(arrived(1).to_json()), "v": 99}).encode(), "unsupported_version"),
        (
            json.dumps({**json.loads(arrived(1).to_json()), "size_bytes": "big"}).encode(),
            "invalid_fields",
        ),
        (
            json.dumps({**json.loads(arrived(1).to_json()), "path": "../../etc/passwd"}).encode(),
            "invalid_fields",
        ),
        (arrived(2).to_json(), "subject_mismatch"),  # another tile's event on this subject
        (arrived(1, acq="acq2").to_json(), "subject_mismatch"),  # another acquisition's
    ],
)
async def test_invalid_payload_terminated_counted_never_retried(
    config, js, tmp_path, payload, reason
):
    marks = tmp_path / "marks"
    before = metric("tilepipe_events_invalid_total", stage="convert_like", reason=reason)
    async with running(
        ConvertLike, config, ack_wait_s=0.5, options={"marker_dir": str(marks)}
    ) as runner:
        await js.publish("tp.tile_arrived.acq1.0.m0-r0-c1", payload)
        await wait_for(
            lambda: (
                metric("tilepipe_events_invalid_total", stage="convert_like", reason=reason)
                > before
            )
        )
        await asyncio.sleep(1.5)  # three ack_wait periods: a non-terminated message would return
        info = await js.consumer_info("TILEPIPE", runner.name)
    assert (
        metric("tilepipe_events_invalid_total", stage="convert_like", reason=reason) == before + 1
    )
    assert info.num_ack_pending == 0 and info.num_redelivered == 0 and info.num_pending == 0
    assert not marks.exists()


async def test_duplicate_publish_dropped(config, js):
    event = arrived(5)
    first = await publish_event(js, event)
    second = await publish_event(js, event)
    assert not first.duplicate and second.duplicate
    async with running(ConvertLike, config):
        await wait_for(lambda: kinds_on(js, "tp.tile_converted.>"))
        await asyncio.sleep(0.5)
    assert len(await stream_messages(js, "tp.tile_arrived.>")) == 1
    assert len(await stream_messages(js, "tp.tile_converted.>")) == 1


async def _publish_retrying(js, event) -> None:
    for _ in range(200):
        try:
            await publish_event(js, event, timeout=1.0)
            return
        except Exception:
            await asyncio.sleep(0.1)
    raise AssertionError("could not publish after server restart")


async def test_server_killed_and_restarted_mid_run_loses_nothing(config, js, nats_server):
    async with running(ConvertLike, config, concurrency=4, ack_wait_s=2, options={"sleep_s": 0.05}):
        for i in range(20):
            await publish_event(js, arrived(i))
        await wait_for(lambda: kinds_on(js, "tp.tile_converted.>"))
        nats_server.kill()
        await asyncio.sleep(0.5)
        nats_server.start()
        for i in range(20, 40):
            await _publish_retrying(js, arrived(i))

        async def all_converted():
            return len(await stream_messages(js, "tp.tile_converted.>")) >= 40

        await wait_for(all_converted, timeout=60)
    converted = await kinds_on(js, "tp.tile_converted.>")
    tokens = [e.tile.token() for e in converted]
    assert len(tokens) == 40 and len(set(tokens)) == 40


def _write_config(config: Config, path: Path, **stages: dict) -> Path:
    config = config.model_copy(
        update={"stages": {n: StageSettings(**s) for n, s in stages.items()}}
    )
    path.write_text(dump_toml(config))
    return path


async def test_sigterm_drains_in_flight_work(config, js, tmp_path):
    marks = tmp_path / "marks"
    cfg = _write_config(
        config,
        tmp_path / "tp.toml",
        convert_like={
            "impl": "tests.stages_for_tests:ConvertLike",
            "concurrency": 3,
            "ack_wait_s": 30,
            "options": {"sleep_s": 2.0, "marker_dir": str(marks)},
        },
    )
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.ops.cli",
            "run",
            "convert_like",
            "--config",
            str(cfg),
            "--metrics-port",
            str(port),
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stderr=subprocess.PIPE,
    )
    try:
        for i in range(3):
            await publish_event(js, arrived(i))
        await wait_for(lambda: len(list(marks.glob("start-*"))) == 3)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        assert 'tilepipe_in_flight{stage="convert_like"} 3.0' in text
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0
    assert len(list(marks.glob("done-*"))) == 3
    assert len(await stream_messages(js, "tp.tile_converted.>")) == 3
    info = await js.consumer_info("TILEPIPE", "convert_like")
    assert info.num_ack_pending == 0 and info.num_redelivered == 0
    logs = [json.loads(line) for line in proc.stderr.read().decode().splitlines()]
    handled = [rec for rec in logs if rec["event"] == "event_handled"]
    assert len(handled) == 3
    assert all({"acq", "slice", "row", "col", "stage"} <= rec.keys() for rec in handled)
    assert {rec["kind"] for rec in handled} == {"tile_arrived"}  # the input's kind survives


async def test_long_work_is_kept_alive_by_heartbeats(config, js, tmp_path):
    marks = tmp_path / "marks"
    async with running(
        ConvertLike, config, ack_wait_s=0.6, options={"sleep_s": 2.5, "marker_dir": str(marks)}
    ) as runner:
        await publish_event(js, arrived(4))
        await wait_for(lambda: kinds_on(js, "tp.tile_converted.>"), timeout=15)
        await asyncio.sleep(1.0)
        info = await js.consumer_info("TILEPIPE", runner.name)
    assert len((marks / "start-m0-r0-c4").read_text().splitlines()) == 1
    assert info.num_redelivered == 0 and info.num_ack_pending == 0
    assert len(await stream_messages(js, "tp.tile_converted.>")) == 1


@pytest.mark.parametrize(
    "reply",
    [
        "$JS.ACK.TILEPIPE.convert.3.1024.17.1764108000000000000.5",  # v1: no domain
        "$JS.ACK.hub.ACCHASH.TILEPIPE.convert.3.1024.17.1764108000000000000.5.tok",  # v2
        "$JS.ACK._.ACCHASH.TILEPIPE.convert.3.1024.17.1764108000000000000.5",
    ],
)
def test_delivery_count_reads_the_ack_subject_as_nats_py_does(reply):
    from nats.aio.msg import Msg

    from services.runtime.bus import delivery_count

    msg = Msg(None, subject="tp.x", reply=reply, data=b"")
    assert delivery_count(msg) == msg.metadata.num_delivered == 3


def test_delivery_count_refuses_a_message_that_is_not_from_jetstream():
    from nats.aio.msg import Msg
    from nats.errors import NotJSMessageError

    from services.runtime.bus import delivery_count

    with pytest.raises(NotJSMessageError):
        delivery_count(Msg(None, subject="tp.x", reply="_INBOX.abc", data=b""))


async def test_an_over_long_replay_tag_is_cut_not_a_stuck_delivery(config, js):
    """A replay header set by hand (`nats pub -H`) longer than an origin holds: the input is
    handled with the tag cut to 64 characters, not left unacknowledged."""
    tag = "t" * 100
    event = arrived(0, acq="acq8")
    async with running(ConvertLike, config, record_attempts=True):
        await js.publish(
            event.subject(), event.to_json(), headers={"Nats-Msg-Id": "long", "Tp-Replay": tag}
        )
        await wait_for(lambda: kinds_on(js, "tp.tile_converted.acq8.>"), timeout=15)
        info = await js.consumer_info("TILEPIPE", "convert_like")
    (out,) = await kinds_on(js, "tp.tile_converted.acq8.>")
    assert out.origin is not None and out.origin.replay == tag[:64]
    assert info.num_ack_pending == 0 and info.num_redelivered == 0


class FailsOnFailures(Stage):
    """Consumes failures and can act on none of them (the handler always raises)."""

    name = "fails_on_failures"
    consumes = (StageFailed,)

    def handle(self, event: StageFailed, ctx) -> Result:
        raise RuntimeError(f"cannot act on {event.stage}'s failure")


async def test_a_failure_is_never_failed_again(config, js):
    """Failures never trigger failures: a stage that gives up on a `stage_failed` input
    logs it, counts it and terminates it, but publishes no `stage_failed` of its own (which
    a stage consuming failures would receive in turn, without end)."""
    failed = StageFailed(
        acq="acq7",
        stage="convert",
        input_type="tile_arrived",
        input_subject="tp.tile_arrived.acq7.0.m0-r0-c0",
        error="boom",
        attempts=5,
        tile=TileCoord(slice=0, row=0, col=0),
    )
    labels = {"stage": FailsOnFailures.name, "outcome": "failed"}
    before = metric("tilepipe_events_handled_total", **labels)
    async with running(FailsOnFailures, config, max_deliver=2, backoff_s=[0.1]) as runner:
        await publish_event(js, failed)
        await wait_for(lambda: metric("tilepipe_events_handled_total", **labels) > before)
        await asyncio.sleep(1.0)  # a failure of the failure would be published by now
        info = await js.consumer_info("TILEPIPE", runner.name)
    assert [e.stage for e in await kinds_on(js, "tp.stage_failed.>")] == ["convert"]
    assert metric("tilepipe_events_handled_total", **labels) == before + 1
    assert info.num_ack_pending == 0 and info.num_pending == 0  # terminated, not redelivered
