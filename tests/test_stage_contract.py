"""A stage is a function of its event and a Context: real stages called with the test context
(`services.runtime.testing.context`, bookkeeping in the in-memory transport) on a tiny
simulated acquisition. No server."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path

import pytest

from messages import TileArrived, utcnow
from messages.events import (
    AcquisitionFinished,
    SliceStitched,
    StageFailed,
    TileConverted,
    TileCoord,
    TileProcessed,
)
from services.core.config import Config, Roots, StageSettings
from services.local.simulate import PhantomParams, simulate, small_manifest, write_manifest
from services.runtime.testing import MemoryTransport, context
from services.stages.convert import Convert
from services.stages.process import Process
from services.stages.stitch import Stitch
from services.state.acquisitions import lookup_acquisition, record_acquisition
from services.state.lattice import LATTICE_BUCKET, MosaicBook

pytestmark = pytest.mark.unit


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return Config(
        roots=Roots(raw=tmp_path / "raw", work=tmp_path / "work", output=tmp_path / "out")
    )


async def test_convert_process_and_stitch_through_their_handlers(config: Config):
    manifest = small_manifest("u", slices=1, rows=1, cols=2, alines=32, bscans=32, samples=256)
    path = write_manifest(manifest, config.roots.raw / "u")
    await asyncio.to_thread(simulate, path, manifest, 0, params=PhantomParams(scatterers=8))
    transport = MemoryTransport()
    await record_acquisition(transport, manifest, "u/manifest.toml", "acquiring")  # the watcher's
    assert await lookup_acquisition(transport, "u") == {
        "manifest": "u/manifest.toml",
        "state": "acquiring",
    }
    ctx = context(config, store=transport)
    convert, process = Convert(config, StageSettings()), Process(config, StageSettings())
    stitch = Stitch(config, StageSettings())

    processed: list[TileProcessed] = []
    for tile in manifest.coords():
        rel = f"u/{manifest.path_of(tile)}"
        arrived = TileArrived(
            acq="u",
            tile=tile,
            path=rel,
            manifest="u/manifest.toml",
            size_bytes=config.roots.resolve("raw", rel).stat().st_size,
            completed_at=utcnow(),
        )
        [converted] = convert.handle(arrived, ctx).events
        assert isinstance(converted, TileConverted) and converted.tile == tile
        [out] = process.handle(converted, ctx).events
        assert isinstance(out, TileProcessed)
        assert config.roots.resolve("work", out.products["aip"]).is_dir()
        processed.append(out)
    assert process.handle(converted, ctx).unchanged  # complete with the same basis

    first = await stitch.handle(processed[0], ctx)
    assert first.events == []  # its neighbour is not processed yet
    second = await stitch.handle(processed[1], ctx)
    assert [e.kind for e in second.events] == ["pair_aligned", "slice_stitched"]
    stitched = second.events[1]
    assert isinstance(stitched, SliceStitched) and stitched.missing == []
    assert config.roots.resolve("output", stitched.path).is_dir()
    state = await (await MosaicBook.open(ctx, "u", 0, 0)).state()
    assert state.processed() == {(0, 0), (0, 1)}
    assert set(state.pairs) == {((0, 0), (0, 1))}
    assert state.stitched_digest == state.digest() == stitched.inputs

    again = await stitch.handle(processed[1], ctx)  # redelivered: nothing recomputed
    assert again.unchanged and [e.kind for e in again.events] == ["slice_stitched"]

    # a tile declared missing after it was processed stays processed (create, never put)
    lattice = await transport.kv(LATTICE_BUCKET)
    key = "u.0.m0.tile.r0-c1"
    revision = lattice.revision(key)
    finished = AcquisitionFinished(
        acq="u", complete=False, tiles_arrived=1, missing=[processed[1].tile]
    )
    await stitch.handle(finished, ctx)
    assert lattice.revision(key) == revision
    after = await (await MosaicBook.open(ctx, "u", 0, 0)).state()
    assert after.processed() == {(0, 0), (0, 1)}


async def test_stitch_ignores_a_failure_of_an_unknown_acquisition(config: Config):
    failure = StageFailed(
        acq="nobody",
        stage="process",
        input_type="tile_converted",
        input_subject="tp.tile_converted.nobody.0.m0-r0-c0",
        error="x",
        attempts=1,
        tile=TileCoord(slice=0, row=0, col=0),
    )
    result = await Stitch(config, StageSettings()).handle(failure, context(config))
    assert result.events == [] and result.detail == "ignored: unknown acquisition"


def test_no_stage_and_no_book_imports_nats():
    """The contract holds in the code: stages, the Context and the books see the server only
    through the transport's protocols."""
    root = Path(__file__).resolve().parents[1] / "services"
    paths = [
        *sorted((root / "stages").glob("*.py")),
        root / "runtime" / "stage.py",
        root / "state" / "buckets.py",
        root / "state" / "lattice.py",
    ]
    found = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            found += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "nats"]
    assert len(paths) > 10 and found == []
