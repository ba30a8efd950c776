"""convert and process stages on a simulated acquisition, against a real nats-server."""

from __future__ import annotations

import asyncio
import hashlib

import numpy as np
import zarr
from prometheus_client import REGISTRY

from kernels.forward import depth_bin_of
from messages import TileArrived, utcnow
from services.core.config import StageSettings
from services.core.manifest import load_manifest
from services.local.simulate import (
    PhantomParams,
    Simulator,
    simulate,
    small_manifest,
    write_manifest,
)
from services.runtime.bus import publish_event
from services.stages.convert import Convert
from services.stages.process import Process
from tests.conftest import events, pipeline, running_stage, wait_for

STAGES = (Convert, Process)
PARAMS = PhantomParams(scatterers=8, scatterer_spacing_um=30.0)


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_simulated_tiles_converted_and_processed(config, js):
    manifest = small_manifest("sim", slices=1, rows=2, cols=2, alines=48, bscans=48, settle_s=0.2)
    path = write_manifest(manifest, config.roots.raw / "sim")
    truth = await asyncio.to_thread(simulate, path, manifest, 0, params=PARAMS)
    raw_files = sorted((config.roots.raw / "sim").rglob("*.nii"))
    before = {p: sha(p) for p in raw_files}
    async with pipeline(config, js, STAGES):

        async def all_done():
            return len(await events(js, "tile_processed")) == 4

        await wait_for(all_done, timeout=120)
    assert {p: sha(p) for p in raw_files} == before  # raw data untouched
    processed = await events(js, "tile_processed")
    sim = Simulator(manifest, PARAMS)
    cal = load_manifest(path).spectrometer()
    for event in processed:
        assert event.device == "cpu"
        group = zarr.open_group(
            str(config.roots.work / event.products["db"].rsplit("/", 1)[0]), mode="r"
        )
        assert group["db"].shape == (48, 48, cal.n_depth)
        assert [c.cname.value for c in group["db"].compressors] == ["lz4"]  # the default codec
        fields = sim.tile_fields(truth.tile(event.tile))
        surface = np.asarray(group["surface"][:], dtype=float)
        expected = depth_bin_of(fields["surface_um"], cal)
        err = surface - expected
        # the toolbox's gradient detector (Gaussian sigma 5, 5+5 step) marks the start of the
        # surface's rise, a fixed 3-6 bins before the reflector's peak, and must follow the
        # surface relief
        assert -7.0 <= np.median(err) <= -1.0 and np.std(err) <= 1.5, (np.median(err), np.std(err))
        assert np.corrcoef(surface.ravel(), expected.ravel())[0, 1] > 0.9
        aip = np.asarray(group["aip"][:])
        corr = np.corrcoef(aip.ravel(), np.log(fields["reflectivity"]).ravel())[0, 1]
        assert corr > 0.6, corr
    converted = await events(js, "tile_converted")
    assert len(converted) == 4 and await events(js, "stage_failed") == []
    assert not list(config.roots.work.rglob(".*tmp-*"))

    # a redelivered input (same event again) rewrites nothing that is complete and valid
    stores = sorted(config.roots.work.rglob("zarr.json"))
    stamps = {p: p.stat().st_mtime_ns for p in stores}
    first_arrived = (await events(js, "tile_arrived"))[0]
    first_converted = (await events(js, "tile_converted"))[0]

    def ok(stage: str) -> float:
        labels = {"stage": stage, "outcome": "ok"}
        return REGISTRY.get_sample_value("tilepipe_events_handled_total", labels) or 0.0

    before = {stage: ok(stage) for stage in ("convert", "process")}
    async with pipeline(config, js, STAGES):
        await publish_event(js, first_arrived, msg_id="redelivered-1")
        await publish_event(js, first_converted, msg_id="redelivered-2")

        def handled_again():
            return all(ok(stage) == before[stage] + 1 for stage in ("convert", "process"))

        await wait_for(handled_again, timeout=60)
    assert {p: p.stat().st_mtime_ns for p in stores} == stamps
    assert sorted(config.roots.work.rglob("zarr.json")) == stores
    assert len(await events(js, "tile_processed")) == 4  # republished outputs are duplicates

    # a replay (operator: "reprocess") recomputes
    async with pipeline(config, js, STAGES):
        await publish_event(js, first_converted, replay="fix-calibration")

        async def replayed():
            return len(await events(js, "tile_processed")) == 5

        await wait_for(replayed, timeout=60)
    changed = [p for p in stores if p.stat().st_mtime_ns != stamps[p]]
    assert changed and all(first_converted.tile.token() in str(p) for p in changed)


async def test_corrupt_and_truncated_tiles_fail_cleanly(config, js):
    manifest = small_manifest("bad", slices=1, rows=1, cols=2, alines=8, bscans=8, samples=128)
    manifest = manifest.model_copy(
        update={"calibration": manifest.calibration.model_copy(update={"autocorr_bins": 4})}
    )
    acq_dir = config.roots.raw / "bad"
    write_manifest(manifest, acq_dir)
    coords = list(manifest.coords())
    corrupt = acq_dir / manifest.path_of(coords[0])
    truncated = acq_dir / manifest.path_of(coords[1])
    corrupt.parent.mkdir(parents=True, exist_ok=True)
    corrupt.write_bytes(b"\x00" * manifest.raw.expected_bytes)  # right size, no NIfTI header
    truncated.write_bytes(b"\x00" * (manifest.raw.expected_bytes // 2))
    before = {p: sha(p) for p in (corrupt, truncated)}
    stage = Convert(config, StageSettings(max_deliver=2, backoff_s=[0.1]))
    async with running_stage(stage, config):
        for coord, path in zip(coords, (corrupt, truncated), strict=True):
            await publish_event(
                js,
                TileArrived(
                    acq="bad",
                    tile=coord,
                    path=str(path.relative_to(config.roots.raw)),
                    manifest="bad/manifest.toml",
                    size_bytes=path.stat().st_size,
                    completed_at=utcnow(),
                ),
            )

        async def two_failed():
            return len(await events(js, "stage_failed")) == 2

        await wait_for(two_failed, timeout=30)
    failed = {e.tile.col: e for e in await events(js, "stage_failed")}
    assert "not a NIfTI-1" in failed[coords[0].col].error
    assert "truncated" in failed[coords[1].col].error
    assert {e.attempts for e in failed.values()} == {1}  # RawFormatError: never retried
    assert {p: sha(p) for p in (corrupt, truncated)} == before
    assert not (config.roots.work / "bad").exists() or not list(
        (config.roots.work / "bad").rglob("*.zarr")
    )
    assert await events(js, "tile_converted") == []
