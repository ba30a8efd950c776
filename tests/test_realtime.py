"""Real-time figures (`services.state.timeline`) and the demo (`tilepipe up --demo`) end to end."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from messages import TileArrived, TileCoord
from messages.events import (
    ArtifactUploaded,
    Origin,
    SliceRegistered,
    SliceStitched,
    StageFailed,
    TileConverted,
    TileProcessed,
)
from services.core.config import Config, StageSettings
from services.local.demo import demo_config, expected_uploads
from services.local.natsserver import free_port_block
from services.local.simulate import small_manifest
from services.runtime.bus import publish_event
from services.runtime.provision import ensure_consumer
from services.stages import stage_settings
from services.stages.convert import Convert
from services.state.timeline import (
    BacklogSampler,
    Timeline,
    figures,
    markdown_table,
    read_timeline,
    tail_slack,
)
from tests.conftest import wait_for

REPO = Path(__file__).resolve().parents[1]
T0 = datetime(2026, 1, 1, tzinfo=UTC)
ACQ = "rt1"
MOSAIC = "rt1/mosaics/slice0000-m0.ome.zarr"
VOLUME = "rt1/volume/registered.ome.zarr"


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def origin(stage: str, started: float) -> Origin:
    return Origin(stage=stage, input_type="x", attempt=1, started_at=at(started))


def tile_events(col: int, complete: float) -> list:
    """One tile: complete at `complete`, converted 1 s later (0.5 s work), processed 2 s later
    (0.75 s work), its products uploaded 2.5 s later."""
    tile = TileCoord(slice=0, row=0, col=col)
    return [
        TileArrived(
            acq=ACQ,
            tile=tile,
            path=f"t{col}.nii",
            manifest="manifest.toml",
            size_bytes=1,
            completed_at=at(complete),
            emitted_at=at(complete + 0.3),
        ),
        TileConverted(
            acq=ACQ,
            tile=tile,
            path=f"c{col}.zarr",
            raw_path=f"t{col}.nii",
            shape=[1],
            dtype="uint16",
            emitted_at=at(complete + 1.0),
            origin=origin("convert", complete + 0.5),
        ),
        TileProcessed(
            acq=ACQ,
            tile=tile,
            products={"aip": f"p{col}.zarr/aip"},
            device="cpu",
            seconds=0.7,
            emitted_at=at(complete + 2.0),
            origin=origin("process", complete + 1.25),
        ),
        ArtifactUploaded(
            acq=ACQ,
            tile=tile,
            product="psoct",
            source=f"p{col}.zarr",
            key=f"s3://b/p{col}",
            bytes=1,
            checksum="sha256:0",
            seconds=0.1,
            emitted_at=at(complete + 2.5),
            origin=origin("upload", complete + 2.3),
        ),
    ]


def slice_events(stitched: float) -> list:
    """Slice 0: stitched (1 s work), registered 2 s later (1 s work), mosaic uploaded 1.5 s
    after stitching, the volume 0.5 s after registration (0.25 s work)."""
    return [
        SliceStitched(
            acq=ACQ,
            slice=0,
            path=MOSAIC,
            emitted_at=at(stitched),
            origin=origin("stitch", stitched - 1.0),
        ),
        SliceRegistered(
            acq=ACQ,
            slice=0,
            path=VOLUME,
            transform=[[1, 0, 0], [0, 1, 0], [0, 0, 1]],
            quality=1.0,
            accepted=True,
            emitted_at=at(stitched + 2.0),
            origin=origin("register", stitched + 1.0),
        ),
        ArtifactUploaded(
            acq=ACQ,
            slice=0,
            product="mosaic",
            source=MOSAIC,
            key="s3://b/mosaic",
            bytes=1,
            checksum="sha256:0",
            seconds=0.1,
            emitted_at=at(stitched + 1.5),
            origin=origin("upload", stitched + 1.0),
        ),
        ArtifactUploaded(
            acq=ACQ,
            slice=0,
            product="volume",
            source=VOLUME,
            key="s3://b/volume",
            bytes=1,
            checksum="sha256:0",
            seconds=0.1,
            emitted_at=at(stitched + 2.5),
            origin=origin("upload", stitched + 2.25),
        ),
    ]


def acquisition() -> list:
    """Three tiles complete at t = 0, 1, 2; the slice stitched at 4.5, done at 7."""
    return [e for col in range(3) for e in tile_events(col, float(col))] + slice_events(4.5)


def test_timeline_latencies_tail_and_budget():
    tl = Timeline.of(reversed(acquisition()))  # order of arrival does not matter
    assert sorted(tl.latencies("processed")) == pytest.approx([2.0] * 3)
    assert sorted(tl.latencies("uploaded")) == pytest.approx([2.5] * 3)
    sl = tl.slices[(0, 0)]
    assert sl.last_complete == pytest.approx(at(2).timestamp())
    assert sl.after_last_tile(sl.stitched) == pytest.approx(2.5)
    assert sl.after_last_tile(sl.registered) == pytest.approx(4.5)
    # uploaded = mosaic and volume both stored; the volume finished it (0.25 s of work)
    assert sl.after_last_tile(sl.uploaded) == pytest.approx(5.0)
    assert sl.upload_s == pytest.approx(0.25)
    assert tl.acq_end == pytest.approx(at(2).timestamp())
    assert tl.done_after() == pytest.approx(5.0)
    assert tl.written_per_s() == pytest.approx(1.0)
    assert tl.processing_start == pytest.approx(at(0.5).timestamp())  # first convert began
    budget = tl.budget(slack_s=1.0)
    # last tile: convert 0.5 + process 0.75; slice: stitch 1 + register 1 + upload 0.25
    assert budget.tile_s == pytest.approx(1.25)
    assert budget.slice_s == pytest.approx(2.25)
    assert budget.total_s == pytest.approx(4.5)
    assert budget.measured_s == pytest.approx(5.0) and not budget.met
    assert tl.budget(slack_s=1.5).met
    assert tl.complete(expected_tiles=3, slices=1, upload=True, register=True)
    assert not tl.complete(expected_tiles=4, slices=1, upload=True, register=True)


def test_slice_not_uploaded_until_volume_is_and_failures_count():
    events = [e for e in acquisition() if getattr(e, "product", "") != "volume"]
    failed = StageFailed(
        acq=ACQ,
        stage="process",
        input_type="tile_converted",
        input_subject="tp.tile_converted.rt1.0.m0-r1-c0",
        error="boom",
        attempts=5,
        tile=TileCoord(slice=0, row=1, col=0),
    )
    tl = Timeline.of([*events, failed])
    assert tl.slices[(0, 0)].uploaded is None
    assert tl.failures == 1
    assert not tl.complete(expected_tiles=4, slices=1, upload=True, register=True)
    assert tl.complete(expected_tiles=4, slices=1, upload=False, register=True)


def test_restitched_slice_uses_the_last_mosaic():
    later = SliceStitched(
        acq=ACQ,
        slice=0,
        path=MOSAIC,
        inputs="other",
        emitted_at=at(9.0),
        origin=origin("stitch", 8.0),
    )
    tl = Timeline.of([*acquisition(), later])
    sl = tl.slices[(0, 0)]
    assert sl.after_last_tile(sl.stitched) == pytest.approx(7.0)
    assert tl.last_output == pytest.approx(at(9.0).timestamp())


def test_figures_rows_and_table():
    tl = Timeline.of(acquisition())
    rows = figures(tl, slack_s=2.0, backlog={"convert": 3})
    assert rows["tile: complete -> processed p50 / p99 s"] == "2.00 / 2.00"
    assert rows["slice 0 m0: last tile -> stitched / registered / uploaded s"] == (
        "2.50 / 4.50 / 5.00"
    )
    assert rows["max backlog convert"] == "3"
    assert rows["tail budget s (tile + slice + slack)"] == "5.50 (1.25 + 2.25 + 2.00)"
    assert rows["tail <= budget"] == "yes"
    batch = figures(tl, None, start=at(0).timestamp())
    assert "tail <= budget" not in batch
    assert batch["end of acquisition -> last output s"] == "7.00"
    table = markdown_table({"streaming": rows, "batch": batch}).splitlines()
    assert table[0] == "| figure | streaming | batch |"
    assert "| max backlog convert | 3 |  |" in table
    assert tail_slack(0.3, ["watcher", "convert", "process", "stitch", "plugin"]) == (
        pytest.approx(0.3 + 4 * 0.25)
    )


async def test_timeline_and_backlog_from_a_real_stream(config, js):
    for event in acquisition():
        await publish_event(js, event)
    tl = await read_timeline(js, config.nats.stream, ACQ)
    assert len(tl.tiles) == 3 and tl.done_after() == pytest.approx(5.0)
    assert tl.slices[(0, 0)].after_last_tile(tl.slices[(0, 0)].uploaded) == pytest.approx(5.0)
    # the convert consumer has the three tile_arrived events pending: a backlog of 3
    await ensure_consumer(js, config.nats.stream, "convert", Convert, StageSettings())
    sampler = BacklogSampler(["convert", "absent"])
    stop = asyncio.Event()
    task = asyncio.create_task(sampler.run(js, config.nats.stream, stop, interval=0.05))
    await wait_for(lambda: len(sampler.samples["convert"]) >= 2, timeout=30)
    stop.set()
    await task
    assert sampler.max() == {"convert": 3, "absent": 0}


def test_demo_config_uploads_to_a_local_store(tmp_path):
    config = demo_config(Config(), tmp_path)
    upload = stage_settings(config, "upload")
    assert upload.enabled and upload.options["url"] == (tmp_path / "object-store").as_uri()
    assert upload.concurrency == 4  # the stage's defaults still apply
    assert (tmp_path / "object-store").is_dir()
    mine = Config(stages={"upload": StageSettings(options={"url": "s3://b/p"})})
    assert demo_config(mine, tmp_path) is mine
    off = Config(stages={"upload": StageSettings(enabled=False)})
    assert demo_config(off, tmp_path) is off
    manifest = small_manifest("x", slices=2, rows=3, cols=3)
    everything = ["convert", "process", "stitch", "register", "upload"]
    # per slice: its mosaic with 6 NIfTI copies and 6 previews, its volume plane
    assert expected_uploads(manifest, everything) == 18 + 2 * (13 + 1)
    assert expected_uploads(manifest, everything, exports=False) == 18 + 2 * 2
    assert expected_uploads(manifest, ["convert", "process", "stitch", "register"]) == 0
    both = small_manifest("x", slices=2, rows=3, cols=3, mosaics=2)  # + each slice's axis
    # + the axis products with 6 NIfTI copies and 5 previews
    assert expected_uploads(both, everything) == 36 + 2 * (2 * 13 + 1 + 12)
    assert expected_uploads(both, everything, exports=False) == 36 + 2 * (2 + 1 + 1)


def test_demo_runs_end_to_end_with_upload(tmp_path):
    """The README's first command (with a config that uploads to a local store)."""
    store = tmp_path / "store"
    cfg = tmp_path / "tp.toml"
    cfg.write_text(
        '[roots]\nraw = "w/raw"\nwork = "w/work"\noutput = "w/output"\n'
        f"[metrics]\nbase_port = {free_port_block(16)}\n"
        f'[nats]\nurl = "nats://127.0.0.1:{free_port_block(1)}"\n'
        f'[stages.upload]\nenabled = true\noptions = {{ url = "{store.as_uri()}" }}\n'
    )
    args = ["up", "--demo", "--config", str(cfg), "--work", str(tmp_path / "w")]
    proc = subprocess.run(
        [sys.executable, "-m", "services.ops.cli", *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=280,
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert re.search(r"demo demo-\S+: 36 tiles, 2 slices \(4 mosaics\), done in", out), out
    assert out.count("  mosaic:  ") == 4 and "  volume:  " in out  # normal and tilted
    assert out.count("  axis (3-D):  ") == 2 and "  axis volume:  " in out  # per slice, stacked
    axis = re.findall(r"slice \d: last tile -> axis s\s+([\d.]+)", out)
    assert len(axis) == 2, out
    assert f"uploaded to:    {store.as_uri()}" in out
    index = re.search(r"  previews:\s+(\S+index\.html)", out)
    assert index and Path(index.group(1)).is_file(), out
    assert len(list(store.rglob("*.nii.gz"))) == 2 * (2 * 6 + 6)  # mosaics' and axis' NIfTI
    assert "tiles (failed)" in out and "36 (0)" in out
    slices = re.findall(r"slice \d m0: last tile -> stitched / registered / uploaded s\s+(.*)", out)
    assert len(slices) == 2 and all("-" not in s for s in slices), out
    tilted = re.findall(r"slice \d m1: last tile -> .* s\s+[\d.]+ / - / [\d.]+", out)
    assert len(tilted) == 2, out  # the tilted mosaics are stitched and uploaded, not stacked
    assert re.search(r"tile: complete -> uploaded p50 / p99 s\s+\d", out), out
    assert re.search(r"tail <= budget\s+(yes|no)", out), out
    stored = {p.name for p in store.rglob("*.ome.zarr")}
    assert any("volume" in name for name in stored) and any("mosaic" in n for n in stored)
    assert sum(name.endswith("_axis.ome.zarr") for name in stored) == 2
    assert any(name.endswith("_axisvolume.ome.zarr") for name in stored)
