"""Issue 21: thru-plane registration (tilted illumination -> normal) and the 3-D optic axis.

* kernels: the affine model of :mod:`kernels.register` on two modalities of one texture, the
  lab's masks, :func:`kernels.thruplane.thruplane` on the simulator's fibre field projected for
  both beams (transform, azimuth, inclination, delta-n against the truth; the wrong sign of
  gamma fails);
* the register stage on NATS with en-face mosaics made from the same field: triggered by
  whichever mosaic of a slice is stitched last, idempotent, replayable, stacked;
* a simulated two-illumination acquisition through the real pipeline (raw spectra ->
  convert -> process -> stitch -> register): masks, the registered tilted mosaic and the axis
  products recovered within the issue's tolerances.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math

import nibabel
import numpy as np
import zarr

from kernels.optic_axis import project
from kernels.register import RegisterParams, register_slices, translation_matrix
from kernels.thruplane import CHANNELS, ThruPlaneParams, gaussian_nan, thruplane, tissue_mask
from messages import decode_event
from messages.events import SliceStitched
from services.core.manifest import load_manifest
from services.io.layout import axis_path, axis_volume_path, mosaic_path
from services.io.omezarr import open_level, read_multiscale, write_omezarr
from services.io.volume import Volume
from services.local.simulate import TILTED_VIEW, Phantom, PhantomParams
from services.runtime.bus import publish_event
from services.stages.register import Register
from services.stages.thruplane import toolbox_orientation
from tests.browser import chromium, images_loaded
from tests.conftest import make_stage, running_stage, stream_messages, wait_for
from tests.webhooks import Receiver, url_file

PX_UM = 10.0
GAMMA = -15.0
K_DN = 0.33  # delta-n per (rad/um) of the phantom's slopes, for the synthetic maps
PARAMS = PhantomParams(tilted_affine=TILTED_VIEW)
PHANTOM = Phantom(PARAMS, 4000.0)


# ----------------------------------------------------------------------------- helpers
def tilted_truth(params: PhantomParams = PARAMS) -> np.ndarray:
    """Tilted stage pixel -> normal stage pixel (PhantomParams.tilted_affine, stage origin 0)."""
    ayy, ayx, axy, axx, by, bx = params.tilted_affine
    return np.array([[ayy, ayx, by / PX_UM], [axy, axx, bx / PX_UM], [0.0, 0.0, 1.0]])


def max_displacement(a: np.ndarray, b: np.ndarray, shape) -> float:
    yy, xx = np.mgrid[0 : shape[0] : 4, 0 : shape[1] : 4]
    p = np.stack([yy.ravel(), xx.ravel(), np.ones(yy.size)])
    return float(np.hypot(*((np.asarray(a) - np.asarray(b)) @ p)[:2]).max())


def views(
    shape: tuple[int, int],
    origin_px=(0.0, 0.0),
    tilted: bool = False,
    section: int = 0,
    seed: int = 0,
    noise: float = 0.02,
    void: tuple[float, float, float] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """En-face maps one beam sees of the phantom's fibre field over a mosaic grid (stage
    pixels origin_px + (i, j)), with noise, and the truth (azimuth, inclination, delta-n)."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(float)
    y, x = (origin_px[0] + yy) * PX_UM, (origin_px[1] + xx) * PX_UM
    if tilted:
        ayy, ayx, axy, axx, by, bx = PARAMS.tilted_affine
        y, x = ayy * y + ayx * x + by, axy * y + axx * x + bx
    dy, dx, rot = PHANTOM.slice_transform(section)
    t = math.radians(rot)
    xs = math.cos(t) * x - math.sin(t) * y + dx
    ys = math.sin(t) * x + math.cos(t) * y + dy
    az, inc = PHANTOM.azimuth_deg(xs, ys, section), PHANTOM.inclination_deg(xs, ys, section)
    dn = K_DN * PHANTOM.birefringence(xs, ys, section)[0]
    normal_view, tilted_view = project(az, inc, dn, GAMMA)
    seen = tilted_view if tilted else normal_view
    rng = np.random.default_rng(seed + 10 * section + tilted)
    biref = seen.birefringence * (1.0 + noise * rng.standard_normal(shape))
    ori = (-seen.orientation_deg + 0.5 * rng.standard_normal(shape) + 90.0) % 180.0 - 90.0
    aip = 60.0 + 3.0 * np.log(PHANTOM.reflectivity(xs, ys, section)) + rng.normal(0, 1, shape)
    if void is not None:
        cy, cx, r = void
        hole = (xs - cx) ** 2 + (ys - cy) ** 2 < r * r
        aip = np.where(hole, 30.0 + rng.normal(0, 1, shape), aip)
        biref = np.where(hole, 1e-6 * rng.random(shape), biref)
        ori = np.where(hole, rng.uniform(-90, 90, shape), ori)
    maps = {
        "aip": aip,
        "mip": aip + 10.0,
        "retardance": 30.0 + 0.0 * aip,
        "orientation": ori,
        "birefringence": biref,
    }
    maps["mask"] = tissue_mask(maps["aip"], 50.0 if not tilted else 45.0)
    truth = {"azimuth": az, "inclination": inc, "delta_n": dn}
    return {k: np.asarray(v, np.float32) for k, v in maps.items()}, truth


def angle_errors(products: dict, truth: dict, mask: np.ndarray) -> dict[str, np.ndarray]:
    """Per-pixel |errors| on `mask`: azimuth (axial), inclination (same axis representative),
    delta-n relative to the truth smoothed like the fit's inputs (sigma 3 on its support)."""
    d = products["azimuth"] - truth["azimuth"]
    wrapped = (d + 90.0) % 180.0 - 90.0
    alpha = np.where(np.abs(d) > 90.0, -products["inclination"], products["inclination"])
    seen = gaussian_nan(np.where(mask, truth["delta_n"], np.nan), 3.0)
    return {
        "azimuth": np.abs(wrapped)[mask],
        "inclination": np.abs(alpha - truth["inclination"])[mask],
        "delta_n": np.abs(products["delta_n"] / seen - 1.0)[mask],
    }


# ----------------------------------------------------------------------------- kernels
def test_affine_model_recovers_an_anisotropic_transform_across_modalities():
    """Tilted -> normal differs by scale, shear and shift; the two beams' maps are different
    functions of one texture: rigid and similarity models cannot fit, the affine one can."""
    shape = (170, 90)
    fixed, _ = views((170, 170), seed=1)
    moving, _ = views(shape, tilted=True, seed=2)
    expected = tilted_truth()
    init = translation_matrix(0.0, 0.0)
    got = {}
    for model in ("rigid", "similarity", "affine"):
        params = RegisterParams(model=model, max_scale_change=0.1, max_rotation_deg=5.0)
        reg = register_slices(
            gaussian_nan(fixed["birefringence"], 3),
            gaussian_nan(moving["birefringence"], 3),
            init=init,
            params=params,
        )
        got[model] = max_displacement(reg.matrix, expected, shape)
    assert got["affine"] <= 0.3, got
    assert got["rigid"] > 1.0 and got["similarity"] > 1.0, got


def test_tissue_mask_is_the_labs_smoothed_threshold():
    rng = np.random.default_rng(0)
    aip = np.full((60, 60), 70.0) + rng.normal(0, 8, (60, 60))
    aip[:, :20] = 40.0 + rng.normal(0, 8, (60, 20))  # no tissue on the left
    aip[50:, 50:] = np.nan  # no tile there
    mask = tissue_mask(aip, 60.0, 5.0)
    assert np.isnan(mask[55, 55]) and np.isfinite(mask[:50]).all()
    assert (mask[:, 30:45] == 1).all() and (mask[:, :12] == 0).all()  # noise smoothed away
    single = tissue_mask(aip, 60.0, 0.0)
    assert 0 < single[:, 30:45].mean() < 1  # unsmoothed, the noise would cut holes
    # a 30 dB step smoothed: it crosses 60 dB a sigma-fraction inside the tissue
    assert (mask[:50, :22] == 0).all() and (mask[:50, 22:] == 1).all()


def test_thruplane_recovers_the_fibre_field_and_the_sign_of_gamma_matters():
    normal, truth = views((170, 170), seed=3)
    tilted, _ = views((170, 90), tilted=True, seed=4)
    result = thruplane(normal, tilted, init=np.eye(3), params=ThruPlaneParams(gamma_deg=GAMMA))
    assert result.registration.accepted and result.registration.quality > 0.8
    assert max_displacement(result.matrix, tilted_truth(), (170, 90)) <= 0.5
    assert list(result.products) == list(CHANNELS)
    mask = result.products["mask"] > 0.5
    assert 0.4 < mask.mean() < 0.6  # the tilted mosaic covers about half of the normal one
    err = angle_errors(result.products, truth, mask)
    assert np.median(err["azimuth"]) < 1.0 and np.percentile(err["azimuth"], 99) < 5.0
    assert np.median(err["inclination"]) < 1.0 and np.percentile(err["inclination"], 99) < 5.0
    assert np.median(err["delta_n"]) < 0.02 and np.percentile(err["delta_n"], 95) < 0.10
    # the registered tilted maps are in the normal frame: NaN where no tilted data
    assert np.isnan(result.products["tilted_birefringence"][:, 150:]).all()
    # gamma with the wrong sign: the same data, every inclination mirrored
    wrong = thruplane(normal, tilted, init=np.eye(3), params=ThruPlaneParams(gamma_deg=-GAMMA))
    bad = angle_errors(wrong.products, truth, mask)
    assert np.median(bad["inclination"]) > 10.0


def test_orientation_conventions_are_converted_to_the_toolboxs():
    ori = np.array([-80.0, -10.0, 0.0, 45.0, 89.0], np.float32)
    same = {"orientation_convention": {"orientation_sign": -1, "orientation_offset_deg": 100.0}}
    assert np.array_equal(toolbox_orientation(ori, same), ori)
    assert np.array_equal(toolbox_orientation(ori, {}), ori)  # no record: the toolbox's
    # tilepipe's preset (sign +1, offset 0) of the same phase difference d: ori = d / 2
    tp = {"orientation_convention": {"orientation_sign": 1, "orientation_offset_deg": 0.0}}
    got = toolbox_orientation(ori, tp)
    expected = (-ori + 100.0 + 90.0) % 180.0 - 90.0  # the toolbox's -d/2 + 100
    assert np.allclose(got, expected)


# ----------------------------------------------------------------------------- the stage
def running(config, **options):
    return running_stage(make_stage(Register, config, options), config, timeout=60)


def write_mosaic(config, acq, k, m, maps, origin_px) -> SliceStitched:
    rel = mosaic_path(acq, k, m)
    write_omezarr(
        config.roots.resolve("output", rel),
        maps,
        pixel_size_um=(PX_UM, PX_UM),
        origin_um=(origin_px[0] * PX_UM, origin_px[1] * PX_UM),
        attributes={
            "acq": acq,
            "slice": k,
            "mosaic": m,
            "illumination": "tilted" if m else "normal",
            "tilt_deg": GAMMA if m else 0.0,
        },
        fsync=False,
    )
    return SliceStitched(acq=acq, slice=k, mosaic=m, path=rel, inputs=f"in{k}{m}", producer="t")


async def kinds(js, kind: str) -> list:
    return [decode_event(m.data) for m in await stream_messages(js, f"tp.{kind}.>")]


def _count(js, kind: str, n: int):
    async def check():
        return len(await kinds(js, kind)) >= n

    return check


async def test_stage_fits_the_axis_when_both_mosaics_are_stitched(config, js):
    """Two slices, each a normal 150x160 and a tilted 150x90 mosaic (its stage origin offset
    by 2 px), stitched in the order tilted 0, normal 1, normal 0, tilted 1: the axis of each
    slice comes when its second mosaic does, within tolerance; a redelivery recomputes
    nothing; the axis products are stacked in slice 0's frame; a replay recomputes."""
    acq = "tp"
    origins = {(0, 0): (0, 0), (0, 1): (2, 0), (1, 0): (1, -2), (1, 1): (3, -2)}
    shapes = {0: (150, 160), 1: (150, 90)}
    truths, stitched = {}, {}
    void = (700.0, 400.0, 180.0)  # a hole in the tissue of slice 0's tilted view
    for (k, m), origin in origins.items():
        maps, truths[k, m] = views(shapes[m], origin, bool(m), section=k, seed=5, void=void)
        stitched[k, m] = write_mosaic(config, acq, k, m, maps, origin)
    async with running(config):
        await publish_event(js, stitched[0, 1])
        await publish_event(js, stitched[1, 0])
        await asyncio.sleep(1.5)
        assert await kinds(js, "slice_axis") == []  # slice 0 waits for its normal mosaic
        assert await kinds(js, "slice_registered") == []  # slice 1 waits for slice 0
        await publish_event(js, stitched[0, 0])  # registers slices 0 and 1, axis of slice 0
        await wait_for(_count(js, "slice_axis", 1), timeout=60)
        await wait_for(_count(js, "slice_registered", 2), timeout=60)
        await publish_event(js, stitched[1, 1])
        await wait_for(_count(js, "slice_axis", 2), timeout=60)
        first = {e.slice: e for e in await kinds(js, "slice_axis")}
        store0 = config.roots.output / axis_path(acq, 0)
        stamp = (store0 / "zarr.json").stat().st_mtime_ns
        # a redelivery: same basis, store present -> the same event (a duplicate), no work
        await publish_event(js, stitched[0, 1], msg_id="again-1")
        await asyncio.sleep(2.0)
        assert (store0 / "zarr.json").stat().st_mtime_ns == stamp
        assert len(await kinds(js, "slice_axis")) == 2
        # a replay recomputes (same inputs: same result and event, store rewritten in place)
        await publish_event(js, stitched[0, 1], replay="r1")
        await wait_for(lambda: (store0 / "zarr.json").stat().st_mtime_ns != stamp, timeout=60)

    for k in (0, 1):
        e = first[k]
        assert e.accepted and e.quality > 0.7 and e.tilted_mosaic == 1 and e.gamma_deg == GAMMA
        # tilted mosaic px -> normal mosaic px: stage px shifted by each mosaic's origin
        on, ot = origins[k, 0], origins[k, 1]
        truth = translation_matrix(-on[0], -on[1]) @ tilted_truth() @ translation_matrix(*ot)
        assert max_displacement(e.transform, truth, shapes[1]) <= 0.5, k
        assert 0.3 < e.fitted_fraction < 0.7 and e.residual_median < 0.02
        store = config.roots.output / e.path
        assert read_multiscale(store)["channel_names"] == list(CHANNELS)
        attrs = zarr.open_group(str(store), mode="r").attrs["tilepipe"]
        assert attrs["units"]["delta_n"].startswith("delta-n") and attrs["gamma_deg"] == GAMMA
        products = {c: np.asarray(open_level(store, 0)[i]) for i, c in enumerate(CHANNELS)}
        mask = products["mask"] > 0.5
        err = angle_errors(products, truths[k, 0], mask)
        assert np.percentile(err["azimuth"], 95) < 5.0, k
        assert np.percentile(err["inclination"], 95) < 5.0, k
        assert np.median(err["delta_n"]) < 0.05, k
        # NIfTI copies and previews of the axis products, listed in the event
        nii = nibabel.load(config.roots.output / e.exports["nifti.delta_n"])
        assert np.array_equal(nii.get_fdata()[:, :, 0], products["delta_n"].T, equal_nan=True)
        assert (config.roots.output / e.exports["preview.inplane"]).is_file()
    # the void (slice 0): out of the mask, so no axis there
    yy, xx = np.mgrid[0:150, 0:160]
    hole = ((yy * PX_UM - 700.0) ** 2 + (xx * PX_UM - 400.0) ** 2) < 150.0**2
    store = config.roots.output / axis_path(acq, 0)
    assert np.isnan(np.asarray(open_level(store, 0)[0])[hole]).all()

    volume = Volume(config.roots.output / axis_volume_path(acq))
    assert volume.depth == 2 and sorted(volume.planes()) == [0, 1]
    assert list(volume.canvas.channels)[:3] == ["delta_n", "inclination", "azimuth"]
    plane = volume.read_plane(1)
    assert np.isfinite(plane[0]).sum() > 0.3 * 150 * 90
    unit = np.sqrt(plane[3] ** 2 + plane[4] ** 2 + plane[5] ** 2)
    assert np.allclose(unit[np.isfinite(unit)], 1.0, atol=1e-4)
    kv = await js.key_value("tp-lattice")
    done = json.loads((await kv.get(f"{acq}.register.axis.1.done")).value)
    assert done["transform"] == first[1].transform

    # `tilepipe status`: the slice-level step, as a row and per slice
    from rich.console import Console

    from services.state.status import snapshot
    from services.state.status_view import lattice_text

    status = await snapshot(js, "TILEPIPE", acq, ["register"])
    assert status.stages["axis"].done == 2 and status.stages["register"].done == 2
    console = Console(width=100, record=True)
    console.print(lattice_text(status, 2, [(1, 1, "normal"), (1, 1, "tilted")]))
    assert console.export_text().count("registered done axis done") == 2


# ----------------------------------------------------------------------------- end to end
async def test_simulated_two_illumination_acquisition_recovers_the_axis(
    config, js, tmp_path, moto, aws_env
):
    """Raw spectra of both illuminations of one slice (the tilted tiles see the fibre field
    through the tilted beam and an affine view of the sample) through convert, process,
    stitch, register and upload: masks leave the void out, the tilted -> normal transform is
    within 0.5 px of the truth, azimuth and inclination within 5 deg and delta-n within 10 %
    where delta-n is above the noise (medians; the 90th percentiles are bounded too). The NIfTI
    copies and previews of both mosaics and of the axis open with nibabel and in headless
    Chromium (the index); the 3-D volume mosaics (dBI, R3D, O3D) are written; everything, with
    the raw tiles' archives, is on the S3 test server under the DANDI layout and the lab's
    names, checksums matching; a webhook receiver gets exactly the acquisition started and the
    slice done."""
    from services.local.simulate import Simulator, simulate, small_manifest, write_manifest
    from services.stages.convert import Convert
    from services.stages.notify import Notify
    from services.stages.process import Process
    from services.stages.stitch import Stitch
    from services.stages.upload import Upload
    from tests.conftest import pipeline
    from tests.s3server import BUCKET, s3_options, s3_tree

    manifest = small_manifest(
        "e2e", slices=1, rows=3, cols=3, settle_s=0.2, mosaics=2, tilted_cols=5
    )
    path = write_manifest(manifest, config.roots.raw / "e2e")
    # reflectors every 4 um through the en-face window, one birefringent layer, a void
    params = PhantomParams(
        scatterers=70,
        scatterer_spacing_um=4.0,
        layer_um=400.0,
        layer_relief_um=20.0,
        birefringence=(0.002, 0.0007),
        void_um=(1150.0, 550.0, 220.0),
        tilted_affine=TILTED_VIEW,
    )
    receiver = Receiver()
    hook = {"url_file": str(url_file(tmp_path, receiver.url)), "backoff_s": [0.2]}
    s3 = moto.client()
    s3.create_bucket(Bucket=BUCKET)
    options = {
        Notify: hook,
        Stitch: {"fuse_volume": True},
        Upload: s3_options(moto.url, layout="dandi", archive_raw=True),
    }
    try:
        stages = (Convert, Process, Stitch, Register, Notify, Upload)
        async with pipeline(config, js, stages, options, enabled=True):
            truth = await asyncio.to_thread(simulate, path, manifest, 0.0, params=params)
            await wait_for(_count(js, "slice_axis", 1), timeout=400)
            await wait_for(lambda: len(receiver.posts) >= 2, timeout=20)

            async def uploaded() -> bool:
                info = await js.consumer_info("TILEPIPE", "upload")
                return info.num_pending == 0 and info.num_ack_pending == 0

            await wait_for(uploaded, timeout=240)
            await asyncio.sleep(2.0)  # and nothing more
    finally:
        receiver.close()
    assert await kinds(js, "stage_failed") == []
    assert receiver.texts() == ["tilepipe: acquisition e2e started", "tilepipe: e2e slice 0 done"]
    assert "slice0000-axis/inplane.png" in json.dumps(receiver.posts[1])
    axis = (await kinds(js, "slice_axis"))[0]
    stitched = {e.mosaic: e for e in await kinds(js, "slice_stitched")}
    sim = Simulator(manifest, params)

    def mosaic_to_stage(m: int) -> np.ndarray:
        """Mosaic pixel -> true stage pixel (the stitch frame less its global offset)."""
        found = {(p.row, p.col): (p.y, p.x) for p in stitched[m].positions}
        true = {(t.row, t.col): (t.y_px, t.x_px) for t in truth.tiles if t.mosaic == m}
        g = np.mean([np.subtract(found[rc], true[rc]) for rc in found], axis=0)
        store = config.roots.output / stitched[m].path
        origin = read_multiscale(store)["multiscales"][0]["datasets"][0]
        oy, ox = origin["coordinateTransformations"][1]["translation"][1:]
        return translation_matrix(oy / PX_UM - g[0], ox / PX_UM - g[1])

    # the transform: tilted mosaic px -> tilted stage px -> normal stage px -> normal mosaic px
    expected = np.linalg.inv(mosaic_to_stage(0)) @ sim.tilted_matrix(1) @ mosaic_to_stage(1)
    tilted_store = config.roots.output / stitched[1].path
    tilted_shape = open_level(tilted_store, 0).shape[1:]
    assert axis.accepted, axis.reason
    transform_error = max_displacement(axis.transform, expected, tilted_shape)
    assert transform_error <= 0.5

    # masks: stored beside each mosaic, the void left out
    store = config.roots.output / axis.path
    products = {c: np.asarray(open_level(store, 0)[i]) for i, c in enumerate(CHANNELS)}
    ny, nx = products["delta_n"].shape
    stage = mosaic_to_stage(0) @ np.stack(
        [*(a.ravel() for a in np.mgrid[0:ny, 0:nx].astype(float)), np.ones(ny * nx)]
    )
    ys, xs = (stage[0] * PX_UM).reshape(ny, nx), (stage[1] * PX_UM).reshape(ny, nx)
    phantom = sim.phantom
    cy, cx, radius = params.void_um
    r = np.hypot(ys - cy, xs - cx)
    hole, core, tissue = r < radius, r < radius - 80.0, r > radius + 80.0
    normal_store = config.roots.output / stitched[0].path
    names = read_multiscale(normal_store)["channel_names"]
    normal_mask = np.asarray(open_level(normal_store, 0)[names.index("mask")])
    assert names[-1] == "mask" and (normal_mask[core] == 0).all()
    assert (normal_mask[tissue & np.isfinite(normal_mask)] == 1).mean() > 0.99
    fitted = products["mask"] > 0.5
    assert not fitted[core].any() and fitted[hole].mean() < 0.5 and fitted.mean() > 0.4

    # the axis against the phantom's fibre field (delta-n as the processing measures it)
    dn = phantom.birefringence(xs, ys, 0)[0] * sim.delta_n_per_slope()
    truth_maps = {
        "azimuth": phantom.azimuth_deg(xs, ys, 0),
        "inclination": phantom.inclination_deg(xs, ys, 0),
        "delta_n": dn,
    }
    # above the noise: both beams' apparent delta-n well above the per-pixel noise, and away
    # from the mask's edge (the smoothing sees fewer pixels there)
    from scipy import ndimage

    inner = ndimage.binary_erosion(fitted, iterations=3)
    err = angle_errors(products, truth_maps, inner)
    figures = {k: (np.median(v), np.percentile(v, 90)) for k, v in err.items()}
    print("transform error px", transform_error, "axis errors (median, p90):", figures)
    assert figures["azimuth"][0] <= 5.0 and figures["azimuth"][1] <= 10.0, figures
    assert figures["inclination"][0] <= 5.0 and figures["inclination"][1] <= 10.0, figures
    assert figures["delta_n"][0] <= 0.10 and figures["delta_n"][1] <= 0.2, figures

    # NIfTI copies (X x Y x 1: the stores' planes transposed) and previews, in the index
    out = config.roots.output
    for event, store_products in ((stitched[0], None), (stitched[1], None), (axis, products)):
        assert len([k for k in event.exports if k.startswith("nifti.")]) == 6
        key, channel = ("nifti.delta_n", "delta_n") if store_products else ("nifti.aip", "aip")
        if store_products is None:
            names = read_multiscale(out / event.path)["channel_names"]
            plane = np.asarray(open_level(out / event.path, 0)[names.index(channel)])
        else:
            plane = store_products[channel]
        nii = nibabel.load(out / event.exports[key])
        assert np.array_equal(nii.get_fdata()[:, :, 0], plane.T, equal_nan=True)
        assert np.allclose(nii.header.get_zooms(), (PX_UM / 1000, PX_UM / 1000, 0.2))
    if chromium() is not None:
        assert images_loaded(out / "e2e/index.html") == "images=17 broken=0"

    # the 3-D volume mosaics of both illuminations: dBI, R3D, O3D, cropped at the focus plane
    for event in stitched.values():
        assert sorted(event.volumes) == ["O3D", "R3D", "dBI"]
        for product, rel in event.volumes.items():
            image = zarr.open_array(str(out / rel / "0"), mode="r")
            assert image.ndim == 3 and image.shape[1:] == open_level(out / event.path, 0).shape[1:]
            assert np.isfinite(np.asarray(image[:, ::8, ::8])).any(), product
    # published: DANDI layout, the lab's names, every file's checksum that of the stored bytes
    published = load_manifest(path)
    stored = s3_tree(s3, "run1")
    sent = await kinds(js, "artifact_uploaded")
    keys = {e.key.removeprefix(f"s3://{BUCKET}/run1/") for e in sent}
    assert len(keys) == len(sent)  # nothing sent twice
    raw = f"rawdata/sub-{published.subject}/micr/"
    derived = f"derivatives/tilepipe/sub-{published.subject}/micr/"
    archives = [e for e in sent if e.product == "rawarchive"]
    assert len(archives) == published.tiles and all(e.raw.verified for e in archives)
    for e in archives:
        assert e.key.endswith(raw + published.published_name("raw_archive", tile=e.tile))
    name = published.published_name
    expected = {
        derived + name("slice_axis", slice_index=0),
        *(
            derived + name("mosaic_volume", slice_index=0, mosaic=m, modality=v)
            for m in (0, 1)
            for v in ("dBI", "R3D", "O3D")
        ),
        *(
            derived + name("mosaic_enface", slice_index=0, mosaic=m, modality=v)
            for m in (0, 1)
            for v in ("aip", "mip", "ret", "ori", "biref")
        ),
        *(derived + name("mosaic_mask", slice_index=0, mosaic=m) for m in (0, 1)),
    }
    assert expected <= keys, sorted(expected - keys)
    for e in sent:
        key = e.key.removeprefix(f"s3://{BUCKET}/run1/")
        assert key.startswith((raw, derived)), key
        if key.endswith((".nii.gz", ".png")):  # a file: its bytes are what the event says
            body = s3.get_object(Bucket=BUCKET, Key=f"run1/{key}")["Body"].read()
            assert e.checksum == "sha256:" + hashlib.sha256(body).hexdigest(), key
            assert e.bytes == len(body) and key in stored
        else:  # a store: complete on the server (its marker is written last)
            assert f"{key}/.tilepipe-complete.json" in stored, key
    body = s3.get_object(Bucket=BUCKET, Key=f"run1/{derived}{name('slice_axis', slice_index=0)}")
    (tmp_path / "axis.nii.gz").write_bytes(body["Body"].read())
    assert nibabel.load(tmp_path / "axis.nii.gz").shape[-1] == 3  # the axis vector field

    # the same mosaics solved with the wrong sign of gamma: the inclinations are mirrored
    from services.stages.register import Mosaic
    from services.stages.thruplane import en_face_maps

    normal, tilted = (Mosaic.open(config.roots.output / stitched[m].path) for m in (0, 1))
    wrong = thruplane(
        en_face_maps(normal),
        en_face_maps(tilted),
        init=np.asarray(axis.transform),
        params=ThruPlaneParams(gamma_deg=+15.0),
    )
    bad = angle_errors(wrong.products, truth_maps, inner & (wrong.products["mask"] > 0.5))
    assert np.median(bad["inclination"]) > 3 * figures["inclination"][0] + 5.0
