"""Operator commands against a real server: pause/resume, replay, failed/retry, history, status."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from rich.console import Console

from messages import (
    AcquisitionStarted,
    StageFailed,
    TileArrived,
    TileConverted,
    TileCoord,
    decode_event,
    utcnow,
)
from services.ops import control as ops
from services.runtime.bus import publish_event
from services.stages import stage_settings
from services.state.status import failures, snapshot
from services.state.status_view import render
from tests.conftest import make_stage, running_stage, stream_messages, tilepipe, wait_for
from tests.stages_for_tests import ConvertLike, arrived

REPO = Path(__file__).resolve().parents[1]


def running(config, **settings):
    return running_stage(make_stage(ConvertLike, config, **settings), config)


async def count(js, kind: str) -> int:
    return len(await stream_messages(js, f"tp.{kind}.>"))


async def test_pause_stops_delivery_and_resume_loses_nothing(config, js):
    async with running(config, concurrency=2):
        proc = await asyncio.to_thread(
            tilepipe, "pause", "convert_like", "--for", "1h", config=config
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        info = await js.consumer_info("TILEPIPE", "convert_like")
        assert info.paused
        for col in range(5):
            await publish_event(js, arrived(0, col))
        await asyncio.sleep(2.0)
        assert await count(js, "tile_converted") == 0
        proc = await asyncio.to_thread(tilepipe, "resume", "convert_like", config=config)
        assert proc.returncode == 0, proc.stdout + proc.stderr

        async def all_five():
            return await count(js, "tile_converted") == 5

        await wait_for(all_five, timeout=30)
    bad = await asyncio.to_thread(tilepipe, "pause", "nosuchstage", config=config)
    assert bad.returncode == 2 and "no such stage" in bad.stdout


async def test_replay_reprocesses_exactly_the_selected_tiles(config, js, tmp_path):
    marks = tmp_path / "marks"
    async with running(config, options={"marker_dir": str(marks)}):
        for s in (0, 1):
            for col in range(3):
                await publish_event(js, arrived(s, col))

        async def six():
            return await count(js, "tile_converted") == 6

        await wait_for(six)
        sent = await ops.replay(js, "TILEPIPE", "convert_like", ["tile_arrived"], "ops", 1)
        assert len(sent) == 3

        async def nine():
            return await count(js, "tile_converted") == 9

        await wait_for(nine)
        await asyncio.sleep(0.5)
    starts = {p.name: len(p.read_text().splitlines()) for p in marks.glob("start-*")}
    # tile tokens do not carry the slice: each col ran once for slice 0 and twice for slice 1
    assert starts == {"start-m0-r0-c0": 3, "start-m0-r0-c1": 3, "start-m0-r0-c2": 3}
    converted = [decode_event(m.data) for m in await stream_messages(js, "tp.tile_converted.>")]
    assert sorted(e.tile.slice for e in converted) == [0, 0, 0, 1, 1, 1, 1, 1, 1]


async def test_history_shows_failed_attempt_then_success(config, js):
    async with running(config, backoff_s=[0.2], options={"fail_until_attempt": 1}):
        await publish_event(js, arrived(0, 7))
        await wait_for(lambda: _has_ok(js), timeout=20)
    events = await ops.history(js, "TILEPIPE", "ops", 0, "m0-r0-c7")
    rows = ops.history_rows(events)
    outcomes = [(r[1], r[2], r[3], r[5]) for r in rows if r[2] == "tile_arrived" and r[3]]
    assert outcomes == [
        ("convert_like", "tile_arrived", "1", "retry"),
        ("convert_like", "tile_arrived", "2", "ok"),
    ]
    failed_row = next(r for r in rows if r[5] == "retry")
    assert "injected failure on attempt 1" in failed_row[7]
    assert failed_row[4].endswith("/convert_like")
    proc = await asyncio.to_thread(tilepipe, "history", "ops", "0", "r0-c7", config=config)
    assert proc.returncode == 0 and "retry" in proc.stdout and "injected failure" in proc.stdout


async def _has_ok(js) -> bool:
    """A successful attempt: an `attempt` record, or an output carrying its origin."""
    found = [decode_event(m.data) for m in await stream_messages(js, "tp.>")]
    return any(getattr(e, "outcome", None) == "ok" or e.origin is not None for e in found)


async def test_failed_then_retry_after_fix(config, js):
    async with running(config, max_deliver=1, options={"fail_until_attempt": 99}):
        await publish_event(js, arrived(0, 1))
        await publish_event(js, arrived(0, 2))

        async def two_failed():
            return await count(js, "stage_failed") == 2

        await wait_for(two_failed)
    failed = await failures(js, "TILEPIPE", "ops")
    assert sorted(f.event.tile.col for f in failed) == [1, 2]
    listing = await asyncio.to_thread(tilepipe, "failed", "ops", config=config)
    assert listing.returncode == 0 and "injected failure" in listing.stdout
    async with running(config):  # the "fixed" stage
        proc = await asyncio.to_thread(tilepipe, "retry", "ops", config=config)
        assert proc.returncode == 0 and "re-queued 2" in proc.stdout

        async def two_converted():
            return await count(js, "tile_converted") == 2

        await wait_for(two_converted)
    assert await failures(js, "TILEPIPE", "ops") == []


async def test_status_renders_done_running_failed_and_missing(config, js):
    await publish_event(
        js,
        AcquisitionStarted(
            acq="st",
            manifest="st/manifest.toml",
            slices=1,
            mosaics=1,
            rows=2,
            cols=3,
            tiles_expected=6,
        ),
    )
    tiles = [TileCoord(slice=0, row=r, col=c) for r in range(2) for c in range(3)]
    for tile in tiles[:5]:  # (1, 2) never arrives
        await publish_event(
            js,
            TileArrived(
                acq="st",
                tile=tile,
                path=f"t{tile.token()}",
                manifest="st/manifest.toml",
                size_bytes=1,
                completed_at=utcnow(),
            ),
        )
    for tile in tiles[:2]:
        await publish_event(
            js,
            TileConverted(
                acq="st",
                tile=tile,
                path=f"c/{tile.token()}",
                raw_path="r",
                shape=[1],
                dtype="uint16",
            ),
        )
    await publish_event(
        js,
        StageFailed(
            acq="st",
            stage="convert",
            input_type="tile_arrived",
            input_subject="s",
            error="boom",
            attempts=5,
            tile=tiles[2],
        ),
    )
    status = await snapshot(js, "TILEPIPE", "st", ["convert"])
    console = Console(width=70, record=True, color_system=None)
    console.print(render(status, (1, [(2, 3, "normal")])))
    text = console.export_text()
    # the tile convert gave up on did arrive (issue 19: it was counted as not arrived)
    assert status.expected == 6 and status.count("tile_arrived") == 5
    assert "arrived │  5/6" in text or "arrived │ 5/6" in text
    lines = [line.rstrip() for line in text.splitlines()]
    top = lines.index("slice 0 mosaic 0 (normal)")
    grid = lines[top + 1 : top + 3]
    assert grid == ["c c X", "a a ·"]
    assert "per min" in text and "ETA" in text
    proc = await asyncio.to_thread(tilepipe, "status", "st", "--json", config=config)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["tiles"] == {"tile_arrived": 5, "tile_converted": 2, "tile_processed": 0}
    assert data["failed_tiles"] == ["0.m0-r0-c2"] and data["expected"] == 6
    assert data["stages"]["convert"]["failed"] == 1


async def test_stage_added_while_running_back_fills(config, js):
    for col in range(4):  # events before the stage exists
        await publish_event(js, arrived(0, col))
    async with running(config):

        async def four():
            return await count(js, "tile_converted") == 4

        await wait_for(four)
        await publish_event(js, arrived(0, 9))  # and what comes after

        async def five():
            return await count(js, "tile_converted") == 5

        await wait_for(five)


async def test_command_stage_runs_a_program_per_tile_with_history(config, js, tmp_path):
    from services.core.config import Config
    from services.stages import stage_for

    options = {
        "consumes": "tile_arrived",
        "output": "{acq}/cmd/slice{slice}/{tile}.txt",
        "command": [
            "sh",
            "-c",
            "test {col} != 3 || exit 3; echo {acq} {tile} {row} > {output};"
            " echo note-from-{tile} >&2",
        ],
        "timeout_s": 30,
    }
    cfg = Config.model_validate(
        {
            **config.model_dump(),
            "stages": {
                "qc": {"impl": "command", "max_deliver": 2, "backoff_s": [0.1], "options": options}
            },
        }
    )
    cls = stage_for(cfg, "qc")
    stage = cls(cfg, stage_settings(cfg, "qc"), name="qc")
    async with running_stage(stage, cfg):
        await publish_event(js, arrived(0, 1))
        await publish_event(js, arrived(0, 3))  # the program fails for col 3

        async def done():
            return await count(js, "stage_failed") == 1 and await _has_ok(js)

        await wait_for(done, timeout=30)
    out = config.roots.work / "ops/cmd/slice0/m0-r0-c1.txt"
    assert out.read_text().split() == ["ops", "m0-r0-c1", "0"]
    ok_rows = ops.history_rows(await ops.history(js, "TILEPIPE", "ops", 0, "m0-r0-c1"))
    assert any(
        r[5] == "ok" and "exit code 0" in r[7] and "note-from-m0-r0-c1" in r[7] for r in ok_rows
    )
    bad_rows = ops.history_rows(await ops.history(js, "TILEPIPE", "ops", 0, "m0-r0-c3"))
    assert [r[5] for r in bad_rows if r[1] == "qc" and r[3]] == ["retry", "failed", "gave up"]
    assert all("exit code 3" in r[7] for r in bad_rows if r[5] in ("retry", "gave up"))


async def test_hold_one_acquisition_while_others_continue(config, js):
    async with running(config, concurrency=2):
        proc = await asyncio.to_thread(tilepipe, "pause", "--acq", "held", config=config)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        await asyncio.sleep(0.5)
        for col in range(3):
            await publish_event(js, arrived(0, col, acq="held"))
        for col in range(2):
            await publish_event(js, arrived(0, col, acq="free"))

        async def free_done():
            return len(await stream_messages(js, "tp.tile_converted.free.>")) == 2

        await wait_for(free_done)
        await asyncio.sleep(1.0)
        assert await stream_messages(js, "tp.tile_converted.held.>") == []
        assert len(await stream_messages(js, "tp.hold_convert_like.held.>")) == 3
        proc = await asyncio.to_thread(tilepipe, "resume", "--acq", "held", config=config)
        assert proc.returncode == 0 and "3 held inputs sent back" in proc.stdout

        async def held_done():
            return len(await stream_messages(js, "tp.tile_converted.held.>")) == 3

        await wait_for(held_done)
        await asyncio.sleep(0.5)
    assert await stream_messages(js, "tp.hold_convert_like.held.>") == []
    converted = await stream_messages(js, "tp.tile_converted.>")
    assert len(converted) == 5
