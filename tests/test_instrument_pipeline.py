"""An acquisition directory laid out exactly as the instrument writes it, end to end.

Both illuminations (normal 3x2 tiles, tilted 3x3 half-width tiles), the instrument's names, a
wave-pixel.mat and float64 dispersion file, and an opticstream scan config: `tilepipe
import-opticstream` writes the manifest, the simulated microscope writes its tiles (2048
samples, channel 2 reversed), and the real services (watcher, convert, process, stitch,
register as processes on a real nats-server) produce every mosaic and the registered volume;
for spectral NIfTI, 12-bit `.raw` and complex tiles.
"""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import numpy as np
import pytest

from services.core.manifest import load_manifest
from services.io.layout import mosaic_path, volume_path
from services.io.omezarr import open_level, read_multiscale
from services.local.init import provision
from services.local.simulate import Instrument, PhantomParams, simulate
from services.ops.opticstream_import import import_command
from tests.conftest import events, wait_for
from tests.procs import ALL_STAGES, Services, fault_config

PARAMS = PhantomParams(scatterers=6)


def scan_config(saving: str) -> dict:
    return {
        "project_name": "sub-E2E ses 1",
        "project_base_path": "/data/lab",
        "mosaics_per_slice": 2,
        "acquisition": {
            "grid_size_x_normal": 2,
            "grid_size_x_tilted": 3,
            "grid_size_y": 3,
            "tile_size_x_normal": 24,
            "tile_size_x_tilted": 12,
            "tile_size_y": 24,
            "tile_overlap": 20.0,
            "scan_resolution_3d": [0.01, 0.01, 0.0025],
            "tile_saving_type": saving,
        },
        "processing": {"phase_offset_deg": 100.0, "flip_z": True},
        "zarr_config": {},
    }


@pytest.mark.parametrize("saving", ["spectral", "spectral_12bit", "complex"])
async def test_instrument_acquisition_end_to_end(config, js, tmp_path, saving):
    lab = tmp_path / "lab"
    Instrument(samples=2048).write_calibration(lab)  # the lab's wave-pixel.mat and .dat
    (lab / "scan_config.json").write_text(json.dumps(scan_config(saving)))
    acq_dir = config.roots.raw / "sub-E2E"
    args = SimpleNamespace(
        scan_config=lab / "scan_config.json",
        out=acq_dir,
        calibration=lab / "calibration" / "wave-pixel.mat",
        dispersion=lab / "calibration" / "dispersion.dat",
        slices=2,
        first_slice=None,
        id="e2e",
        force=False,
    )
    assert import_command(args) == 0
    manifest = load_manifest(acq_dir / "manifest.toml")
    assert manifest.lattice.mosaics == 2 and manifest.tiles == 2 * (6 + 9)
    await asyncio.to_thread(simulate, acq_dir / "manifest.toml", manifest, 0, params=PARAMS)
    names = sorted(p.name for p in acq_dir.glob("mosaic_*"))
    ext = {"spectral": "spectral_0001.nii", "spectral_12bit": "spectral_0001.raw"}
    assert names[0] == "mosaic_001_image_0001_" + ext.get(saving, "processed.nii")
    assert names[-1].startswith("mosaic_004_image_0009_")  # slice 2, tilted, last image

    cfg = fault_config(config, ALL_STAGES)
    await provision(cfg)
    with Services(cfg, tmp_path / "svc", ["watcher", *ALL_STAGES]) as services:

        async def done() -> bool:
            services.restart_crashed()
            return (
                len(await events(js, "slice_stitched")) >= 4
                and len(await events(js, "slice_registered")) >= 2
            )

        try:
            await wait_for(done, timeout=240, interval=0.5)
        except TimeoutError:
            raise AssertionError(
                "\n".join(services.log_tail(n, 1500) for n in ("watcher", *ALL_STAGES))
            ) from None
    assert await events(js, "stage_failed") == []
    assert len(await events(js, "tile_processed")) == manifest.tiles
    for s in range(2):
        for m, width in ((0, 24), (1, 12)):
            store = config.roots.output / mosaic_path("e2e", s, m)
            meta = read_multiscale(store)
            assert meta["channel_names"][:2] == ["aip", "mip"]
            aip = np.asarray(open_level(store, 0)[0])
            geometry = manifest.geometry(m)
            # the mosaic spans its own grid: rows of 24 B-lines, columns of its own A-lines
            assert aip.shape[0] >= 24 + 2 * 19 - 8 and aip.shape[1] >= width * geometry.cols - 8
            # tilted tiles are 12 A-lines wide (2.4 px of overlap): some of their pairs cannot
            # be aligned and are placed by the stage model, jitter (+-3 px) and all, so their
            # mosaic's bounding box holds less data (0.73 .. 0.84 with the tilted beam's view)
            assert np.isfinite(aip).mean() > (0.8 if m == 0 else 0.7)
    registered = [e for e in await events(js, "slice_registered") if e.mosaic == 0]
    assert sorted(e.slice for e in registered) == [0, 1]
    assert (config.roots.output / volume_path("e2e")).exists()
