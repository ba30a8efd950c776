"""`tilepipe repair`: republish exactly what is missing, on a real pipeline."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from services import repair
from services.atomic import is_complete
from services.layout import converted_path, mosaic_path, products_path
from services.simulate import PhantomParams, simulate, small_manifest, write_manifest
from tests.conftest import pipeline, stream_messages, tilepipe, wait_for
from tests.test_stitch_service import OPTIONS, STAGES, events

REPO = Path(__file__).resolve().parents[1]


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
