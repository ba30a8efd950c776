"""Slice-to-slice registration (issue 6): numerics, the growing volume, the stage on NATS."""

from __future__ import annotations

import asyncio
import contextlib
import math
from pathlib import Path

import numpy as np
import pytest
import zarr
from prometheus_client import REGISTRY

from kernels.register import (
    RegisterParams,
    decompose,
    register_slices,
    similarity_matrix,
    translation_matrix,
    warp_image,
    warp_stack,
)
from messages import decode_event
from messages.events import SliceStitched
from services.core.config import StageSettings
from services.io.layout import mosaic_path, volume_path
from services.io.omezarr import write_omezarr
from services.io.volume import Canvas, Volume
from services.local.simulate import Phantom, PhantomParams
from services.runtime.bus import publish_event
from services.runtime.runner import StageRunner
from services.stages.register import Register
from tests.conftest import stream_messages, wait_for

PX_UM = 10.0
PHANTOM = Phantom(PhantomParams(), 4000.0)


# ----------------------------------------------------------------------------- helpers
def texture(shape: tuple[int, int], seed: int = 1, n: int = 120):
    """A band-limited texture defined everywhere: (fixed image, function of (y, x))."""
    rng = np.random.default_rng(seed)
    fy, fx = rng.normal(0, 1, (2, n)) / 8
    ph = rng.uniform(0, 2 * np.pi, n)
    amp = rng.uniform(0.5, 1, n)

    def f(y: np.ndarray, x: np.ndarray) -> np.ndarray:
        out = np.zeros(np.broadcast_shapes(y.shape, x.shape))
        for k in range(n):
            out += amp[k] * np.cos(2 * np.pi * (fy[k] * y + fx[k] * x) + ph[k])
        return out

    return f


def pair(shape, matrix, seed=1, noise=0.1):
    """fixed[p] = f(p), moving[p] = f(M p): moving -> fixed is `matrix`."""
    f = texture(shape, seed)
    rng = np.random.default_rng(seed + 100)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(float)
    q = matrix @ np.stack([yy.ravel(), xx.ravel(), np.ones(yy.size)])
    fixed = f(yy, xx) + rng.normal(0, noise, shape)
    moving = f(q[0].reshape(shape), q[1].reshape(shape)) + rng.normal(0, noise, shape)
    return fixed.astype(np.float32), moving.astype(np.float32)


def max_displacement(a: np.ndarray, b: np.ndarray, shape) -> float:
    """Largest distance between where two matrices send the pixels of an image."""
    yy, xx = np.mgrid[0 : shape[0] : 8, 0 : shape[1] : 8]
    p = np.stack([yy.ravel(), xx.ravel(), np.ones(yy.size)])
    return float(np.hypot(*((a - b) @ p)[:2]).max())


def sample_transform(k: int, origin_um=(0.0, 0.0)) -> np.ndarray:
    """Simulator truth as a matrix: slice k's stage pixel -> slice 0's stage pixel.

    `Simulator.sample_coords`: sample (x, y) = R(rot) (x, y) + (dx, dy) for stage (x, y) in
    um; slice 0 is the identity, so a point at stage p in slice k is at stage R p + d in
    slice 0 (origin_um: the stage origin the rotation is about, in um).
    """
    dy, dx, rot = PHANTOM.slice_transform(k)
    oy, ox = origin_um[0] / PX_UM, origin_um[1] / PX_UM
    return similarity_matrix(rot, (dy / PX_UM, dx / PX_UM), 1.0, (-oy, -ox))


def phantom_enface(k: int, shape, origin_px=(0, 0), seed=0) -> dict[str, np.ndarray]:
    """En-face products of slice k over a mosaic grid (stage pixels origin_px + (i, j))."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(float)
    y = (origin_px[0] + yy) * PX_UM
    x = (origin_px[1] + xx) * PX_UM
    dy, dx, rot = PHANTOM.slice_transform(k)
    t = math.radians(rot)
    xs = math.cos(t) * x - math.sin(t) * y + dx
    ys = math.sin(t) * x + math.cos(t) * y + dy
    rng = np.random.default_rng(seed + k)
    refl = PHANTOM.reflectivity(xs, ys, k)
    aip = 10 * np.log10(refl) - 0.05 * PHANTOM.surface_um(xs, ys) + rng.normal(0, 0.1, shape)
    upper, _ = PHANTOM.birefringence(xs, ys)
    out = {
        "aip": aip,
        "mip": aip + 12.0,
        "retardance": 40 + 10 * np.tanh(np.log(refl)),
        "orientation": PHANTOM.orientation_deg(xs, ys, k),
        "birefringence": upper * 1e3,
    }
    return {name: v.astype(np.float32) for name, v in out.items()}


# ----------------------------------------------------------------------------- conventions
def test_matrix_conventions_and_warp_direction():
    m = similarity_matrix(3.0, (2.0, -1.0), 1.02, (10.0, 20.0))
    rot, shift, scale = decompose(m)
    assert rot == pytest.approx(3.0) and scale == pytest.approx(1.02)
    assert np.allclose(similarity_matrix(rot, shift, scale), m)
    # the simulator's rotation: x' = x cos t - y sin t, y' = x sin t + y cos t
    t = math.radians(30.0)
    y, x = 2.0, 5.0
    assert np.allclose(
        similarity_matrix(30.0) @ [y, x, 1.0],
        [x * math.sin(t) + y * math.cos(t), x * math.cos(t) - y * math.sin(t), 1.0],
    )
    # warp_image(src, M): out[M p] = src[p]
    img = np.zeros((20, 20), np.float32)
    img[5, 7] = 1.0
    out = warp_image(img, translation_matrix(3, -2), (20, 20))
    assert np.unravel_index(np.nanargmax(out), out.shape) == (8, 5)


def test_warp_is_nan_aware_and_circular_for_axial_channels():
    src = np.stack([np.full((30, 30), 5.0), np.full((30, 30), 89.0)]).astype(np.float32)
    src[1, :, 15:] = -89.0  # the same axis: must blend to +-90, never to 0
    src[0, 10:20, 10:20] = np.nan
    out = warp_stack(src, translation_matrix(0.5, 0.5), (30, 30), axial=[False, True])
    finite = np.isfinite(out[0])
    assert np.allclose(out[0][finite], 5.0)  # no NaN leak into the values
    assert np.isnan(out[0][15, 15]) and finite[3, 3]
    assert np.all(np.abs(out[1][2:-2, 2:-2]) > 88.0)


# ----------------------------------------------------------------------------- numerics
@pytest.mark.parametrize(
    ("rotation", "shift", "scale", "model", "max_rot"),
    [
        (8.0, (20.3, -11.7), 1.0, "rigid", 10.0),
        (-25.0, (-5.0, 7.0), 1.0, "rigid", 30.0),
        (3.0, (3.0, -4.0), 1.03, "similarity", 10.0),
        (170.0, (3.0, -4.0), 1.0, "rigid", 180.0),
    ],
)
def test_recovers_large_known_transforms(rotation, shift, scale, model, max_rot):
    shape = (240, 260)
    truth = similarity_matrix(rotation, shift, scale, ((shape[0] - 1) / 2, (shape[1] - 1) / 2))
    fixed, moving = pair(shape, truth)
    params = RegisterParams(model=model, max_rotation_deg=max_rot)
    reg = register_slices(fixed, moving, params=params)
    assert reg.accepted, reg.reason
    assert max_displacement(reg.matrix, truth, shape) < 0.05
    assert reg.rotation_deg == pytest.approx(rotation, abs=0.01)
    assert reg.quality > 0.95


def test_holes_different_shapes_and_initial_guess():
    truth = similarity_matrix(-1.3, (12.4, -7.2), 1.0, (100.0, 120.0))
    f = texture((0, 0))
    yy, xx = np.mgrid[0:260, 0:230].astype(float)
    q = truth @ np.stack([yy.ravel(), xx.ravel(), np.ones(yy.size)])
    moving = f(q[0].reshape(yy.shape), q[1].reshape(yy.shape)).astype(np.float32)
    moving[:40, :60] = np.nan  # a missing tile
    fixed = f(*np.mgrid[0:250, 0:250].astype(float)).astype(np.float32)
    fixed[200:, 200:] = np.nan
    reg = register_slices(fixed, moving, init=translation_matrix(10, -5))
    assert reg.accepted and max_displacement(reg.matrix, truth, (250, 250)) < 0.05
    again = register_slices(fixed, moving, init=translation_matrix(10, -5))
    assert np.array_equal(reg.matrix, again.matrix)  # deterministic: replays agree


def test_unrelated_or_flat_images_are_not_accepted():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(2, 200, 200)).astype(np.float32)
    reg = register_slices(a, b)
    assert not reg.accepted and "quality" in reg.reason and reg.quality < 0.2
    flat = register_slices(np.ones((100, 100), np.float32), a[:100, :100])
    assert not flat.accepted and np.array_equal(flat.matrix, np.eye(3))


def test_simulator_slices_within_tolerance_and_sign():
    """Consecutive simulated sections (known shifts up to 3 px, rotations up to 1.5 deg):
    translation <= 0.5 px, rotation <= 0.2 deg, and the signs of the simulator's transform."""
    shape = (260, 260)
    images = [phantom_enface(k, shape)["aip"] for k in range(6)]
    tested_sign = False
    for k in range(1, 6):
        truth = np.linalg.inv(sample_transform(k - 1)) @ sample_transform(k)
        rot, (dy, dx), _ = decompose(truth)
        reg = register_slices(images[k - 1], images[k])
        assert reg.accepted, reg.reason
        err = max_displacement(reg.matrix, truth, shape)
        assert err <= 0.5, (k, err)
        assert abs(reg.rotation_deg - rot) <= 0.2, (k, reg.rotation_deg, rot)
        # the opposite sign convention (sample -> stage) would be off by far more
        wrong = np.linalg.inv(truth)
        if abs(rot) > 0.3 and math.hypot(dy, dx) > 1.0:
            tested_sign = True
            assert max_displacement(reg.matrix, wrong, shape) > 1.0
            assert abs(reg.rotation_deg + rot) > 0.4
    assert tested_sign


# ----------------------------------------------------------------------------- volume
def _canvas(shape=(300, 320)) -> Canvas:
    return Canvas(
        shape=shape,
        offset_yx=(20.0, 20.0),
        pixel_size_um=(10.0, 10.0),
        origin_um=(-200.0, -200.0),
        slice_thickness_um=150.0,
        channels=("aip", "orientation"),
    )


def test_volume_grows_without_rewriting_earlier_planes(tmp_path):
    from ome_zarr_models.v05.image import Image

    path = tmp_path / "vol.ome.zarr"
    canvas = _canvas()
    vol = Volume.create(path, canvas, chunk=64, shard=128, min_size=64)
    rng = np.random.default_rng(0)
    planes = {z: rng.normal(size=(2, *canvas.shape)).astype(np.float32) for z in (0, 2)}
    planes[0][1] = 45.0
    vol.write_plane(0, planes[0], {"slice": 0})
    files = {p: p.stat().st_mtime_ns for p in path.rglob("*") if p.is_file() and "c" in p.parts}
    vol.write_plane(2, planes[2], {"slice": 2})  # out of order: grows z to 3
    assert vol.depth == 3
    assert all(p.stat().st_mtime_ns == t for p, t in files.items())  # plane 0 untouched
    assert np.array_equal(vol.read_plane(0), planes[0])
    assert np.isnan(vol.read_plane(1)).all()
    assert sorted(Volume(path).planes()) == [0, 2]
    group = zarr.open_group(str(path), mode="r")
    model = Image.from_zarr(group)
    axes = model.ome_attributes.multiscales[0].axes
    assert [(a.name, a.type) for a in axes] == [
        ("c", "channel"),
        ("z", "space"),
        ("y", "space"),
        ("x", "space"),
    ]
    level1 = group["1"]
    assert level1.shape == (2, 3, 150, 160) and level1.chunks == (1, 1, 64, 64)
    assert np.allclose(level1[1, 0], 45.0)
    ds = group.attrs["ome"]["multiscales"][0]["datasets"][1]["coordinateTransformations"]
    assert ds[0]["scale"] == [1.0, 150.0, 20.0, 20.0]
    # same canvas: reopened; another canvas: recreated empty
    assert Volume.open_or_create(path, canvas).depth == 3
    assert Volume.open_or_create(path, _canvas((310, 320))).depth == 1


# ----------------------------------------------------------------------------- the stage
@contextlib.asynccontextmanager
async def running(config, **options):
    stop = asyncio.Event()
    settings = StageSettings(**{**Register.defaults, "options": options})
    runner = StageRunner(Register(config, settings), config)
    task = asyncio.create_task(runner.run(stop))
    await wait_for(runner.ready.is_set)
    try:
        yield runner
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


async def registered(js) -> list:
    return [decode_event(m.data) for m in await stream_messages(js, "tp.slice_registered.>")]


def write_mosaic(config, acq: str, k: int, images: dict, origin_px) -> SliceStitched:
    rel = mosaic_path(acq, k, 0)
    write_omezarr(
        config.roots.resolve("output", rel),
        images,
        pixel_size_um=(PX_UM, PX_UM),
        origin_um=(origin_px[0] * PX_UM, origin_px[1] * PX_UM),
        attributes={"acq": acq, "slice": k, "mosaic": 0},
        fsync=False,
    )
    return SliceStitched(acq=acq, slice=k, mosaic=0, path=rel, inputs=f"in{k}", producer="test")


def pair_of(events: dict, k: int) -> np.ndarray:
    return np.linalg.inv(np.asarray(events[k - 1].transform)) @ np.asarray(events[k].transform)


async def test_stage_out_of_order_fallback_and_replay(config, js):
    """Slices 0, 2, 3, 1 stitched in that order, then a textureless slice 4 (fallback), then
    a replay of slice 2: transforms against the simulator, the volume, idempotency."""
    acq = "reg"
    shape = (200, 210)
    origins = {0: (0, 0), 1: (2, -1), 2: (-1, 3), 3: (1, 1), 4: (0, 2)}
    stitched = {}
    for k in range(4):
        images = phantom_enface(k, shape, origins[k])
        stitched[k] = write_mosaic(config, acq, k, images, origins[k])
    flat = {n: np.full(shape, 1.0, np.float32) for n in phantom_enface(0, (2, 2))}
    flat["aip"] = np.random.default_rng(9).normal(size=shape).astype(np.float32)  # no match
    stitched[4] = write_mosaic(config, acq, 4, flat, origins[4])
    rejected_before = _rejected_count()

    async with running(config):
        await publish_event(js, stitched[0])
        await wait_for(lambda: _count(js, 1), timeout=60)
        await publish_event(js, stitched[2])
        await publish_event(js, stitched[3])
        await asyncio.sleep(1.5)
        assert [e.slice for e in await registered(js)] == [0]  # 2 and 3 wait for 1
        await publish_event(js, stitched[1])
        await wait_for(lambda: _count(js, 4), timeout=90)
        await publish_event(js, stitched[4])
        await wait_for(lambda: _count(js, 5), timeout=60)
        first = {e.slice: e for e in await registered(js)}
        assert [e.slice for e in await registered(js)] == [0, 1, 2, 3, 4]

        vol_path = config.roots.output / volume_path(acq)
        plane2 = Volume(vol_path).read_plane(2)
        others = _chunk_times(vol_path, skip_z=2)
        # a replay of slice 2 (same inputs): same transform, same plane; 3 and 4 (unchanged)
        # are announced again, not recomputed
        await publish_event(js, stitched[2], replay="r1")
        await wait_for(lambda: _count(js, 8), timeout=60)

    events = await registered(js)
    replayed = events[5:]
    assert [e.slice for e in replayed] == [2, 3, 4]
    assert [e.transform for e in replayed] == [first[k].transform for k in (2, 3, 4)]
    assert np.array_equal(Volume(vol_path).read_plane(2), plane2, equal_nan=True)
    assert _chunk_times(vol_path, skip_z=2) == others  # no other plane was rewritten

    # slice 0 is the reference; 1..3 within 0.5 px / 0.2 deg of the simulator (pairwise)
    assert first[0].accepted and np.allclose(first[0].transform, np.eye(3))
    for k in (1, 2, 3):
        assert first[k].accepted and first[k].quality > 0.5
        # stage pixels -> mosaic pixels: p_mosaic = p_stage - origin
        truth_pair = (
            translation_matrix(-origins[k - 1][0], -origins[k - 1][1])
            @ np.linalg.inv(sample_transform(k - 1))
            @ sample_transform(k)
            @ translation_matrix(*origins[k])
        )
        got = pair_of(first, k)
        assert max_displacement(got, truth_pair, shape) <= 0.5, k
        assert abs(decompose(got)[0] - decompose(truth_pair)[0]) <= 0.2
    # slice 4 has no texture: flagged, metric, fallback "previous" = slice 3's placement
    assert not first[4].accepted
    assert _rejected_count() == rejected_before + 1
    prior = translation_matrix(origins[4][0] - origins[3][0], origins[4][1] - origins[3][1])
    assert np.allclose(pair_of(first, 4), prior)

    # the volume: 5 planes in slice 0's frame; registered planes line up with plane 0
    vol = Volume(vol_path)
    assert vol.depth == 5 and sorted(vol.planes()) == [0, 1, 2, 3, 4]
    assert vol.planes()[3]["transform"] == first[3].transform
    p0, p1 = vol.read_plane(0)[1], vol.read_plane(1)[1]  # mip
    both = np.isfinite(p0) & np.isfinite(p1)
    assert both.sum() > 0.8 * np.isfinite(p0).sum()
    assert np.corrcoef(p0[both], p1[both])[0, 1] > 0.6


def _rejected_count() -> float:
    sample = REGISTRY.get_sample_value("tilepipe_register_slices_total", {"outcome": "rejected"})
    return sample or 0.0


def _chunk_times(store: Path, skip_z: int) -> dict[Path, int]:
    """mtime of every chunk/shard file of the volume except those of plane `skip_z`."""
    out = {}
    for p in store.rglob("*"):
        parts = p.relative_to(store).parts  # <level>/c/<c>/<z>/<y>/<x>
        if p.is_file() and len(parts) == 6 and parts[1] == "c" and parts[3] != str(skip_z):
            out[p] = p.stat().st_mtime_ns
    assert out
    return out


def _count(js, n: int):
    async def check():
        return len(await registered(js)) >= n

    return check()


def test_unknown_option_is_refused(config):
    with pytest.raises(ValueError, match=r"stages\.register\.options: unknown key 'nope'"):
        Register(config, StageSettings(options={"nope": 1}))
    with pytest.raises(ValueError, match="fallback"):
        Register(config, StageSettings(options={"fallback": "guess"}))


def test_volume_path_is_under_the_acquisition():
    assert volume_path("acq1").startswith("acq1/") and volume_path("acq1").endswith(".ome.zarr")
    assert Path(volume_path("a")).suffixes[-2:] == [".ome", ".zarr"]


# ----------------------------------------------------------------------------- real pipeline
async def test_real_pipeline_registers_simulated_slices(config, js):
    """watcher -> convert -> process -> stitch (with the fused dB volume) -> register on a
    simulated 3-slice acquisition; transforms against the simulator's ground truth."""
    from services.local.simulate import simulate, small_manifest, write_manifest
    from services.stages.convert import Convert
    from services.stages.process import Process
    from services.stages.stitch import Stitch
    from services.watcher.service import Watcher

    manifest = small_manifest("rp", slices=3, rows=3, cols=3, alines=64, bscans=64, settle_s=0.2)
    path = write_manifest(manifest, config.roots.raw / "rp")
    options = {Stitch: {"fuse_volume": True}, Register: {"db_volume": True, "db_depth": 8}}
    stop = asyncio.Event()
    runners = [
        StageRunner(
            cls(config, StageSettings(**{**cls.defaults, "options": options.get(cls, {})})),
            config,
        )
        for cls in (Convert, Process, Stitch, Register)
    ]
    watcher = Watcher(config, js)
    tasks = [asyncio.create_task(r.run(stop)) for r in runners]
    tasks.append(asyncio.create_task(watcher.run(stop)))
    try:
        await wait_for(lambda: all(r.ready.is_set() for r in runners) and watcher.ready.is_set())
        params = PhantomParams(scatterers=8, scatterer_spacing_um=30.0)
        truth = await asyncio.to_thread(simulate, path, manifest, 0.0, params=params)
        await wait_for(lambda: _count(js, 3), timeout=240)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)

    events = {e.slice: e for e in await registered(js)}
    stitched = {
        e.slice: e
        for e in (decode_event(m.data) for m in await stream_messages(js, "tp.slice_stitched.>"))
    }
    phantom = Phantom(params, 1.0)  # slice_transform depends only on the seed and limits

    def mosaic_to_stage(k: int) -> np.ndarray:
        """Mosaic k pixel -> true stage pixel (stitch frame minus its global offset)."""
        found = {(p.row, p.col): (p.y, p.x) for p in stitched[k].positions}
        true = {(t.row, t.col): (t.y_px, t.x_px) for t in truth.tiles if t.slice == k}
        g = np.mean([np.subtract(found[rc], true[rc]) for rc in found], axis=0)
        origin = np.array(mosaic_origin(config, stitched[k].path))
        return translation_matrix(*(origin - g))

    def stage_truth(k: int) -> np.ndarray:
        dy, dx, rot = phantom.slice_transform(k)
        return similarity_matrix(rot, (dy / PX_UM, dx / PX_UM))

    for k in (1, 2):
        assert events[k].accepted, k
        truth_pair = (
            np.linalg.inv(mosaic_to_stage(k - 1))
            @ np.linalg.inv(stage_truth(k - 1))
            @ stage_truth(k)
            @ mosaic_to_stage(k)
        )
        got = pair_of(events, k)
        shape = open_shape(config, stitched[k].path)
        assert max_displacement(got, truth_pair, shape) <= 0.5, k
        assert abs(decompose(got)[0] - decompose(truth_pair)[0]) <= 0.2, k
    vol = Volume(config.roots.output / volume_path("rp"))
    assert vol.depth == 3 and vol.db_depth() == 8
    assert all(rec["db"].startswith("written") for rec in vol.planes().values())
    db = zarr.open_group(str(vol.path / "db"), mode="r")["0"]
    assert db.shape[0] == 3 * 8 and np.isfinite(db[8 + 4]).mean() > 0.1


def mosaic_origin(config, rel: str) -> tuple[float, float]:
    from services.stages.register import Mosaic

    return Mosaic.open(config.roots.resolve("output", rel)).origin_px


def open_shape(config, rel: str) -> tuple[int, int]:
    from services.stages.register import Mosaic

    return Mosaic.open(config.roots.resolve("output", rel)).shape


def test_identity_fallback_and_missing_db_volume_is_reported(config):
    """Without NATS: a slice that cannot be registered is placed by the stage prior to slice 0
    (`fallback = "identity"`); an absent dB volume is skipped and said so."""
    shape = (120, 130)
    origins = {0: (0, 0), 1: (5, -3), 2: (-2, 4)}
    images = {
        0: phantom_enface(0, shape, origins[0]),
        1: phantom_enface(1, shape, origins[1]),
        2: {n: np.full(shape, 1.0, np.float32) for n in phantom_enface(0, (2, 2))},
    }
    images[2]["aip"] = np.random.default_rng(5).normal(size=shape).astype(np.float32)
    state = {}
    for k in range(3):
        event = write_mosaic(config, "fb", k, images[k], origins[k])
        state[k] = {"stitched": {"path": event.path, "inputs": event.inputs}}
    settings = StageSettings(options={"fallback": "identity", "db_volume": True})
    stage = Register(config, settings)

    class Log:
        def __init__(self):
            self.events = []

        def info(self, event, **kw):
            self.events.append(event)

        warning = info

    log = Log()
    for k in range(3):
        state[k]["registered"] = stage._register("fb", k, state, f"b{k}", 200.0, log)
    rec = state[2]["registered"]
    assert not rec["accepted"] and rec["fallback"]
    assert np.allclose(rec["transform"], translation_matrix(-2, 4))  # stage prior to slice 0
    assert state[1]["registered"]["accepted"]
    assert all(state[k]["registered"]["db"].startswith("skipped") for k in range(3))
    assert "db_volume_skipped" in log.events and "registration_rejected" in log.events
    assert Volume(config.roots.output / volume_path("fb")).planes()[2]["fallback"]
