"""`tilepipe repair`: republish exactly what is missing, on a real pipeline."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from services.io.atomic import is_complete
from services.io.layout import converted_path, mosaic_path, products_path
from services.local.simulate import PhantomParams, simulate, small_manifest, write_manifest
from services.ops import repair
from services.stages.convert import Convert
from services.stages.process import Process
from services.stages.stitch import Stitch
from tests.conftest import events, pipeline, stream_messages, tilepipe, wait_for

REPO = Path(__file__).resolve().parents[1]
STAGES = (Convert, Process, Stitch)
OPTIONS = {Stitch: {"fuse_volume": True}}


async def test_repair_republishes_exactly_what_was_deleted(config, js):
    manifest = small_manifest("rep", slices=1, rows=2, cols=2, alines=48, bscans=48, settle_s=0.2)
    path = write_manifest(manifest, config.roots.raw / "rep")
    await asyncio.to_thread(simulate, path, manifest, 0, params=PhantomParams(scatterers=4))
    async with pipeline(config, js, STAGES, OPTIONS):
        await wait_for(lambda: events(js, "slice_stitched"), timeout=120)
    assert await repair.plan(js, config, "rep") == []

    a, b, c = (
        next(t for t in manifest.coords() if (t.row, t.col) == rc)
        for rc in ((0, 0), (0, 1), (1, 1))
    )
    work, out = config.roots.work, config.roots.output
    shutil.rmtree(work / converted_path("rep", a))
    shutil.rmtree(work / products_path("rep", b))
    shutil.rmtree(out / mosaic_path("rep", 0, 0))
    arrived_c = next(
        m
        for m in await stream_messages(js, "tp.tile_arrived.rep.>")
        if m.subject.endswith(c.token())
    )
    await js.delete_msg("TILEPIPE", arrived_c.metadata.sequence.stream)

    dry = await asyncio.to_thread(tilepipe, "repair", "rep", config=config)
    assert dry.returncode == 0, dry.stderr
    assert "4 actions (dry run" in dry.stdout
    actions = await repair.plan(js, config, "rep")
    assert sorted((x.stage, x.tile.row, x.tile.col) for x in actions) == [
        ("convert", 0, 0),
        ("process", 0, 1),
        ("stitch", 1, 0),  # the first tile in scan order (image 1: bottom of column 0)
        ("watcher", 1, 1),
    ]

    async with pipeline(config, js, STAGES, OPTIONS):
        assert await repair.apply(js, config, "rep", actions) == 4

        async def repaired():
            return (
                is_complete(work / converted_path("rep", a))
                and is_complete(work / products_path("rep", b))
                and (out / mosaic_path("rep", 0, 0)).exists()
                and await stream_messages(js, f"tp.tile_arrived.rep.0.{c.token()}")
            )

        await wait_for(repaired, timeout=120)
        await asyncio.sleep(1.0)
    assert await repair.plan(js, config, "rep") == []


async def test_status_failed_and_repair_agree_when_an_intermediate_is_gone(config, js):
    """Issue 19 (13): a converted store deleted under a tile makes process give up; status,
    `tilepipe failed` and repair then agree (one failed tile, still counted as arrived), repair
    rebuilds the store, process succeeds on it, and the failure is resolved everywhere."""
    from services.ops.finish import finish
    from services.state.status import failures, snapshot

    manifest = small_manifest("agree", slices=1, rows=1, cols=2, alines=32, bscans=16)
    path = write_manifest(manifest, config.roots.raw / "agree")
    await asyncio.to_thread(simulate, path, manifest, 0, params=PhantomParams(scatterers=4))
    fast = {"max_deliver": 2, "backoff_s": [0.1]}
    async with pipeline(config, js, STAGES, OPTIONS, **fast):
        await wait_for(lambda: events(js, "slice_stitched"), timeout=120)
    await finish(config, "agree")
    tile = next(manifest.coords())
    shutil.rmtree(config.roots.work / converted_path("agree", tile))
    shutil.rmtree(config.roots.work / products_path("agree", tile))
    async with pipeline(config, js, STAGES, OPTIONS, **fast):
        replay = await asyncio.to_thread(
            tilepipe, "replay", "process", "--acq", "agree", config=config
        )
        assert replay.returncode == 0, replay.stderr
        await wait_for(lambda: events(js, "stage_failed"), timeout=60)

    failed = await failures(js, "TILEPIPE", "agree")
    assert [(f.event.stage, f.where) for f in failed] == [("process", f"0.{tile.token()}")]
    status = await snapshot(js, "TILEPIPE", "agree", ["convert", "process"])
    assert status.failed_tiles == {f"0.{tile.token()}"}
    assert status.tile_kind(0, 0, tile.row, tile.col) == "failed"
    assert status.count("tile_arrived") == 2  # the failed tile did arrive
    assert status.stages["process"].failed == 1 and status.eta_s() is None  # finished, idle
    actions = await repair.plan(js, config, "agree")
    assert [(a.stage, a.tile.col) for a in actions] == [("convert", tile.col)]
    assert "process failed on it" in actions[0].reason

    async with pipeline(config, js, STAGES, OPTIONS, **fast):
        assert await repair.apply(js, config, "agree", actions) == 1

        async def resolved():
            return not await failures(js, "TILEPIPE", "agree")

        await wait_for(resolved, timeout=120)
    status = await snapshot(js, "TILEPIPE", "agree", ["convert", "process"])
    assert status.failed_tiles == set() and status.count("tile_processed") == 2
    assert status.tile_kind(0, 0, tile.row, tile.col) != "failed"
    assert is_complete(config.roots.work / products_path("agree", tile))
    assert await repair.plan(js, config, "agree") == []
