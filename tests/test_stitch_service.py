"""The stitch stage on a simulated acquisition: pairs while acquiring, a mosaic at the end."""

from __future__ import annotations

import asyncio
import json

import nibabel
import numpy as np
import zarr
from ome_zarr_models.v05.image import Image

from services.io.focus_plane import plane_of
from services.io.omezarr import open_level, read_multiscale
from services.local.simulate import PhantomParams, simulate, small_manifest, write_manifest
from services.ops.finish import finish
from services.stages.convert import Convert
from services.stages.process import Process
from services.stages.stitch import Stitch
from tests.conftest import events, pipeline, wait_for

PARAMS = PhantomParams(scatterers=8, scatterer_spacing_um=30.0)
LOW_TEXTURE = (0, 0, 1, 1)
MISSING = (2, 3)


STAGES = (Convert, Process, Stitch)
OPTIONS = {Stitch: {"fuse_volume": True}}


async def test_stitch_while_acquiring_with_low_texture_and_missing_tile(config, js):
    manifest = small_manifest("st", slices=1, rows=3, cols=4, alines=64, bscans=64, settle_s=0.2)
    path = write_manifest(manifest, config.roots.raw / "st")
    async with pipeline(config, js, STAGES, OPTIONS):
        truth = await asyncio.to_thread(
            simulate,
            path,
            manifest,
            3.0,
            params=PARAMS,
            jitter_px=3.0,
            low_texture=frozenset({LOW_TEXTURE}),
            only=lambda c: (c.row, c.col) != MISSING,
        )

        async def eleven_processed():
            return len(await events(js, "tile_processed")) == 11

        await wait_for(eleven_processed, timeout=120)
        assert await events(js, "slice_stitched") == []  # waits for the missing tile
        declared = await finish(config, "st")
        assert [(t.row, t.col) for t in declared.missing] == [MISSING]
        stitched = await wait_for(lambda: events(js, "slice_stitched"), timeout=60)
    assert len(stitched) == 1
    event = stitched[0]
    assert [(t.row, t.col) for t in event.missing] == [MISSING]

    # positions against ground truth, after removing the global offset
    found = {(p.row, p.col): (p.y, p.x) for p in event.positions}
    assert len(found) == 11
    true = {(t.row, t.col): (t.y_px, t.x_px) for t in truth.tiles}
    diff = np.array([np.subtract(found[k], true[k]) for k in found])
    diff -= diff.mean(axis=0)
    err = np.hypot(diff[:, 0], diff[:, 1])
    assert np.sqrt(np.mean(err**2)) <= 0.3 and err.max() <= 1.0, err

    # pairwise alignment ran while the slice was still being acquired
    arrived = await events(js, "tile_arrived")
    last_tile_done = max(e.completed_at for e in arrived)
    pairs = await events(js, "pair_aligned")
    assert len(pairs) == 17 - 2  # lattice pairs minus the two of the missing tile
    assert min(p.emitted_at for p in pairs) < last_tile_done
    low = [
        p
        for p in pairs
        if (LOW_TEXTURE[2], LOW_TEXTURE[3]) in ((p.a.row, p.a.col), (p.b.row, p.b.col))
    ]
    assert len(low) == 4

    # the mosaic: multiscale OME-Zarr with the hole marked
    store = config.roots.output / event.path
    meta = read_multiscale(store)
    channels = ["aip", "mip", "retardance", "orientation", "birefringence", "mask"]
    assert meta["channel_names"] == channels
    attrs = zarr.open_group(str(store), mode="r").attrs["tilepipe"]
    assert attrs["missing_tiles"] == ["r2-c3"] and attrs["slice"] == 0
    level0 = np.asarray(open_level(store, 0)[:])
    assert level0.shape[0] == 6  # aip, mip, retardance, orientation, birefringence, mask
    aip = level0[0]
    assert np.isnan(aip).any() and np.isfinite(aip).mean() > 0.8
    orientation = level0[3][np.isfinite(level0[3])]
    assert orientation.min() >= -90 and orientation.max() < 90
    # the lab's mask (smoothed AIP above the mosaic's threshold): tissue everywhere here
    mask = level0[5]
    assert np.array_equal(np.isfinite(mask), np.isfinite(aip)) and np.nanmean(mask) > 0.95
    assert attrs["mask"] == {"of": "aip", "threshold_db": 45.0, "sigma_px": 5.0}
    # NIfTI copies beside the store (the mosaic transposed: X x Y x 1), previews, the index
    assert sorted(event.exports) == sorted(
        [f"nifti.{k}" for k in ("aip", "mip", "ret", "ori", "biref", "mask")]
        + [f"preview.{k}" for k in ("aip", "mip", "ret", "ori", "biref", "mask")]
    )
    nii = nibabel.load(config.roots.output / event.exports["nifti.aip"])
    assert np.array_equal(nii.get_fdata()[:, :, 0], aip.T, equal_nan=True)
    assert (config.roots.output / "st/index.html").is_file()

    # the 3-D volumes, fused out of core, cropped below the focus plane, masked
    assert event.volumes == {
        p: event.path.replace(".ome.zarr", f"-{p}.ome.zarr") for p in ("dBI", "R3D", "O3D")
    }
    focus = json.loads((config.roots.output / "st/focus/focus-normal.json").read_text())
    assert focus["found_on"] == {"slice": 0, "mosaic": 0} and focus["pairs"] >= 15
    assert focus["surface"] == ["surface_raw"]
    origin = np.floor(np.array([(p.y, p.x) for p in event.positions]).min(axis=0)).astype(int)
    p00 = found[(0, 0)]
    y0, x0 = round(p00[0]) - origin[0], round(p00[1]) - origin[1]
    tile_store = config.roots.work / "st/products/slice0000/m0-r0-c0.zarr"
    group = zarr.open_group(str(tile_store), mode="r")
    plane = plane_of(focus, group["db"].shape[:2])
    start = 30 + round(float(plane[20, 20]))
    for product, array in (("dBI", "db"), ("R3D", "retardance"), ("O3D", "orientation")):
        volume_store = config.roots.output / event.volumes[product]
        volume = zarr.open_array(str(volume_store / "0"), mode="r")[:]
        depth = min(500, group[array].shape[2] - 30)
        assert volume.shape == (depth, *level0.shape[1:])  # the en-face mosaic's frame
        assert mask[y0 + 20, x0 + 20] == 1
        tile = group[array][20, 20, start : start + depth]
        got = volume[: len(tile), y0 + 20, x0 + 20]
        assert np.allclose(got, tile, atol=1e-4), product
        assert np.isnan(volume[:, mask != 1]).all()  # masked: no tissue or no data
        Image.from_zarr(zarr.open_group(str(volume_store), mode="r"))  # NGFF 0.5
        attrs = zarr.open_group(str(volume_store), mode="r").attrs["tilepipe"]
        assert attrs["focus_plane"]["found_on"] == {"slice": 0, "mosaic": 0}
        assert attrs["crop"] == {"offset": 30, "depth": depth, "focus_plane": True}
    o3d = zarr.open_array(str(config.roots.output / event.volumes["O3D"] / "0"), mode="r")[:]
    assert np.nanmin(o3d) >= -90 and np.nanmax(o3d) < 90
    Image.from_zarr(zarr.open_group(str(store), mode="r"))


async def test_rejections_and_stage_placed_tiles_are_in_the_event(config, js):
    """Issue 19 (16): what the solve did not use is visible in `slice_stitched` (and its log):
    here no pair passes a confidence of 0.9999, so every pair is listed with the aligner's
    reason and every tile is placed by the stage model."""
    manifest = small_manifest("rj", slices=1, rows=2, cols=2, alines=48, bscans=48, settle_s=0.2)
    path = write_manifest(manifest, config.roots.raw / "rj")
    options = {Stitch: {"min_confidence": 0.9999}}
    async with pipeline(config, js, STAGES, options):
        await asyncio.to_thread(simulate, path, manifest, 0, params=PARAMS)
        stitched = await wait_for(lambda: events(js, "slice_stitched"), timeout=120)
    event = stitched[0]
    pairs = await events(js, "pair_aligned")
    assert len(pairs) == 4 and not any(p.accepted for p in pairs)
    rejected = {(tuple(r.a), tuple(r.b)): r.reason for r in event.rejected}
    assert set(rejected) == {((p.a.row, p.a.col), (p.b.row, p.b.col)) for p in pairs}
    assert all("low confidence" in reason for reason in rejected.values())
    assert sorted(tuple(t) for t in event.stage_placed) == [(0, 0), (0, 1), (1, 0), (1, 1)]


async def test_focus_plane_found_on_first_slice_reused_after_a_restart(config, js):
    """Slice 0 finds and stores one focus plane per illumination; the stages stop; the normal
    record is edited (as if another host had found a different plane); restarted stages fuse
    slice 1 with the stored planes, not new ones."""
    manifest = small_manifest(
        "fp", slices=2, rows=2, cols=2, alines=48, bscans=48, settle_s=0.2, mosaics=2
    )
    path = write_manifest(manifest, config.roots.raw / "fp")
    record_path = config.roots.output / "fp/focus/focus-normal.json"
    tilted_path = config.roots.output / "fp/focus/focus-tilted.json"

    async def stitched(k: int) -> list:
        found = [e for e in await events(js, "slice_stitched") if e.slice == k]
        return sorted(found, key=lambda e: e.mosaic) if len(found) == 2 else []

    async with pipeline(config, js, STAGES, OPTIONS):
        await asyncio.to_thread(
            simulate, path, manifest, 0, params=PARAMS, only=lambda c: c.slice == 0
        )
        await wait_for(lambda: stitched(0), timeout=120)
    first = json.loads(record_path.read_text())
    assert first["found_on"] == {"slice": 0, "mosaic": 0}
    tilted = json.loads(tilted_path.read_text())
    assert tilted["found_on"] == {"slice": 0, "mosaic": 1} and tilted["tile_shape"] == [48, 24]
    edited = {**first, "coefficients": [9.0, 0.0, 0.0, 0.0, 0.0]}  # 0 at row 0, 9 at the end
    record_path.write_text(json.dumps(edited))
    async with pipeline(config, js, STAGES, OPTIONS):  # a fresh stage: nothing in memory
        await asyncio.to_thread(
            simulate, path, manifest, 0, params=PARAMS, only=lambda c: c.slice == 1
        )

        event, tilted_event = await wait_for(lambda: stitched(1), timeout=120)
    assert json.loads(record_path.read_text()) == edited  # reused, never refound
    assert json.loads(tilted_path.read_text()) == tilted
    tilted_store = config.roots.output / tilted_event.volumes["O3D"]
    tilted_attrs = zarr.open_group(str(tilted_store), mode="r").attrs["tilepipe"]
    assert tilted_attrs["focus_plane"]["found_on"] == {"slice": 0, "mosaic": 1}
    store = config.roots.output / event.volumes["dBI"]
    attrs = zarr.open_group(str(store), mode="r").attrs["tilepipe"]
    assert attrs["focus_plane"]["found_on"] == {"slice": 0, "mosaic": 0}
    volume = zarr.open_array(str(store / "0"), mode="r")[:]
    origin = np.floor(np.array([(p.y, p.x) for p in event.positions]).min(axis=0)).astype(int)
    p00 = next((p.y, p.x) for p in event.positions if (p.row, p.col) == (0, 0))
    y0, x0 = round(p00[0]) - origin[0], round(p00[1]) - origin[1]
    db = zarr.open_group(str(config.roots.work / "fp/products/slice0001/m0-r0-c0.zarr"), mode="r")
    for row in (2, 30):  # the edited plane: round(9 * row / 47) samples deeper than row 0
        shift = round(9 * row / 47)
        want = db["db"][row, 20, 30 + shift : 30 + shift + 8]
        assert np.allclose(volume[:8, y0 + row, x0 + 20], want, atol=1e-4), row
    assert round(9 * 30 / 47) == 6
