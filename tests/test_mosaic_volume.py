"""3-D volume mosaics (dBI, R3D, O3D) fused out of core, the focus-plane crop and its record."""

from __future__ import annotations

import json
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import zarr
from ome_zarr_models.v05.image import Image

from kernels.focus_plane import FocusPlaneFit, focus_plane
from kernels.stitch import feather_weights, mosaic_frame
from services.io.focus_plane import fit_from_tiles, load, plane_of, store
from services.io.mosaic_volume import DepthCrop, MosaicMask, fuse_volume
from services.io.omezarr import write_omezarr

pytestmark = pytest.mark.unit

SHAPE = (40, 48)  # tile (B-lines, A-lines)
DEPTH = 24


def write_tile(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """A products group as the process stage writes it (volumes chunked by B-line blocks)."""
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    for name, values in arrays.items():
        chunks = (8, *values.shape[1:]) if values.ndim == 3 else values.shape
        group.create_array(name, data=values.astype(np.float32), chunks=chunks)
    return path


def grid(rows: int, cols: int, step: tuple[int, int]) -> list[tuple[int, int]]:
    return [(r * step[0], c * step[1]) for r in range(rows) for c in range(cols)]


def field(z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The known content: smooth in every direction, different everywhere."""
    return 40.0 + 0.5 * z + 0.1 * y - 0.07 * x + 3.0 * np.sin(0.2 * y) * np.cos(0.15 * x)


def tiles_of(
    tmp: Path, positions, values, surface=None, depth: int = DEPTH
) -> list[tuple[Path, tuple[float, float]]]:
    """Tiles sampling ``values(z, Y, X, k)`` at their global positions."""
    out = []
    b, a = SHAPE
    zz, yy, xx = np.meshgrid(np.arange(depth), np.arange(b), np.arange(a), indexing="ij")
    for k, (py, px) in enumerate(positions):
        vol = np.moveaxis(values(zz, yy + py, xx + px, k), 0, 2)  # [B, A, Z]
        arrays = {"db": vol, "retardance": vol / 2, "orientation": np.zeros_like(vol)}
        arrays["aip"] = np.full(SHAPE, 80.0)
        if surface is not None:
            arrays["surface_raw"] = surface(yy[0] + py, xx[0] + px)
        out.append((write_tile(tmp / f"t{k}.zarr", arrays), (float(py), float(px))))
    return out


def read(store: Path) -> np.ndarray:
    return np.asarray(zarr.open_array(str(store / "0"), mode="r")[:])


def test_interior_is_the_known_field_and_overlaps_are_feathered(tmp_path):
    positions = grid(2, 3, (30, 36))  # overlaps of 10 B-lines and 12 A-lines
    offsets = [0.0, 2.0, -1.0, 4.0, 1.0, -3.0]  # per tile: the blend becomes visible
    tiles = tiles_of(tmp_path, positions, lambda z, y, x, k: field(z, y, x) + offsets[k])
    target = tmp_path / "m-dBI.ome.zarr"
    shape = fuse_volume(tiles, target, pixel_um=10.0, axial_um=2.5, block_yx=(16, 32))
    origin, frame = mosaic_frame(np.array(positions, float), SHAPE)
    assert shape == (DEPTH, *frame) and origin == (0, 0)
    out = read(target)
    zz, yy, xx = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    truth = field(zz, yy, xx)
    w = feather_weights(SHAPE)
    num, den = np.zeros(frame), np.zeros(frame)
    for (py, px), c in zip(positions, offsets, strict=True):
        num[py : py + SHAPE[0], px : px + SHAPE[1]] += w * c
        den[py : py + SHAPE[0], px : px + SHAPE[1]] += w
    covered = den > 0
    expected = truth + np.where(covered, num / np.where(covered, den, 1), np.nan)[None]
    np.testing.assert_allclose(out[:, covered], expected[:, covered], atol=1e-4)
    # the interior of tile 0 (no overlap) is tile 0's data exactly
    np.testing.assert_allclose(out[:, 5:25, 5:30], truth[:, 5:25, 5:30], atol=1e-4)
    # an overlap pixel is strictly between its two tiles' values (feathered, not a seam)
    mid = out[3, 15, 40] - truth[3, 15, 40]
    assert 0.0 < mid < 2.0 and abs(mid - 1.0) > 0.05  # weights by distance to the edges
    assert np.isnan(out[:, ~covered]).all() and not covered.all()  # the frame's +1 margin


def test_orientation_blends_on_doubled_angles_across_90_degrees(tmp_path):
    """Two tiles seeing the same axis, one as +88 deg and one as -88 deg (= 92 deg): the blend
    is near +-90 everywhere in the overlap. The naive mean would be 0 in its middle."""
    positions = [(0, 0), (0, 36)]
    angles = [88.0, -88.0]
    tiles = []
    for k, (py, px) in enumerate(positions):
        vol = np.full((*SHAPE, DEPTH), angles[k], np.float32)
        arrays = {"orientation": vol, "aip": np.full(SHAPE, 80.0)}
        tiles.append((write_tile(tmp_path / f"o{k}.zarr", arrays), (float(py), float(px))))
    target = tmp_path / "m-O3D.ome.zarr"
    fuse_volume(tiles, target, pixel_um=10.0, axial_um=2.5, product="O3D", block_yx=(16, 32))
    out = read(target)
    overlap = out[:, :40, 36:48]  # (row 40: the frame's uncovered margin)
    assert np.isfinite(overlap).all()
    dist = np.minimum(np.abs(overlap - 90.0), np.abs(overlap + 90.0))  # axial distance to 90
    assert dist.max() <= 2.0 + 1e-4, dist.max()
    assert np.nanmin(out) >= -90.0 and np.nanmax(out) < 90.0
    np.testing.assert_allclose(out[:, 20, 10], 88.0, atol=1e-4)  # interiors untouched
    np.testing.assert_allclose(out[:, 20, 70], -88.0, atol=1e-4)
    # the middle of the overlap: equal weights, exactly the axis between them (+-90)
    middle = out[:, 20, 41:43]
    assert (np.minimum(np.abs(middle - 90), np.abs(middle + 90)) < 0.5).all()


def test_depth_crop_follows_the_focus_plane(tmp_path):
    """A tissue feature seen deeper where the focus plane is deeper lands at one depth
    after the crop: output sample k is tile sample offset + round(plane) + k."""
    plane = focus_plane([6.0, -3.0, 4.0, 1.0, 2.0], SHAPE)  # minimum 0
    shift = np.rint(plane)
    positions = grid(1, 2, (0, 36))

    def seen(z, y, x, k):  # value = depth of the sample relative to the plane
        return z - shift[y - positions[k][0], x - positions[k][1]]

    tiles = tiles_of(tmp_path, positions, seen)
    target = tmp_path / "crop-dBI.ome.zarr"
    crop = DepthCrop(offset=3, depth=12, plane=plane)
    shape = fuse_volume(tiles, target, pixel_um=10.0, axial_um=2.5, crop=crop, block_yx=(16, 32))
    out = read(target)
    assert shape[0] == 12
    valid = np.isfinite(out)
    k = np.arange(12)[:, None, None] * np.ones(out.shape)
    np.testing.assert_allclose(out[valid], (3 + k)[valid], atol=1e-4)
    # past the tile's last sample: NaN, never another tile's or a wrapped sample
    deepest = 3 + int(shift.max()) + 11
    assert deepest >= DEPTH and np.isnan(out).any()
    meta = zarr.open_group(str(target), mode="r").attrs
    assert meta["tilepipe"]["crop"] == {"offset": 3, "depth": 12, "focus_plane": True}
    # the clamp: a crop deeper than the tiles keeps what they have
    short = DepthCrop(offset=10, depth=500)
    assert fuse_volume(tiles, tmp_path / "short.ome.zarr", 10.0, 2.5, crop=short)[0] == 14


def test_mask_of_the_mosaic_is_applied(tmp_path):
    positions = grid(1, 2, (0, 36))
    tiles = tiles_of(tmp_path, positions, lambda z, y, x, k: field(z, y, x))
    _, frame = mosaic_frame(np.array(positions, float), SHAPE)
    mask = np.ones(frame, np.float32)
    mask[:, :30] = 0.0  # no tissue on the left
    mask[:5, :] = np.nan  # no data on top
    mosaic = tmp_path / "m.ome.zarr"
    write_omezarr(mosaic, {"aip": np.zeros(frame, np.float32), "mask": mask}, fsync=False)
    target = tmp_path / "masked-R3D.ome.zarr"
    fuse_volume(tiles, target, 10.0, 2.5, product="R3D", mask=MosaicMask(mosaic), block_yx=(16, 32))
    out = read(target)
    assert np.isnan(out[:, :, :30]).all() and np.isnan(out[:, :5, :]).all()
    zz, yy, xx = np.meshgrid(*(np.arange(n) for n in out.shape), indexing="ij")
    inside = (mask == 1)[None] & np.ones(out.shape, bool)
    inside[:, :, frame[1] - 1] = False  # the frame's uncovered margin column
    inside[:, frame[0] - 1, :] = False
    np.testing.assert_allclose(out[inside], field(zz, yy, xx)[inside] / 2, atol=1e-4)
    with pytest.raises(ValueError, match="frame"):  # a mask of another mosaic is refused
        fuse_volume(tiles[:1], tmp_path / "x.ome.zarr", 10.0, 2.5, mask=MosaicMask(mosaic))


def test_ngff_metadata_units_axes_and_origin(tmp_path):
    tiles = tiles_of(tmp_path, [(5, 7), (5, 43)], lambda z, y, x, k: field(z, y, x))
    target = tmp_path / "meta-dBI.ome.zarr"
    fuse_volume(tiles, target, 10.0, 2.5, crop=DepthCrop(offset=4, depth=8))
    group = zarr.open_group(str(target), mode="r")
    Image.from_zarr(group)  # a valid NGFF 0.5 image
    ms = group.attrs["ome"]["multiscales"][0]
    assert [(a["name"], a["type"], a["unit"]) for a in ms["axes"]] == [
        ("z", "space", "micrometer"),
        ("y", "space", "micrometer"),
        ("x", "space", "micrometer"),
    ]
    scale, translation = ms["datasets"][0]["coordinateTransformations"]
    assert scale["scale"] == [2.5, 10.0, 10.0]
    assert translation["translation"] == [4 * 2.5, 50.0, 70.0]  # crop start, tile origin
    assert group["0"].metadata.dimension_names == ("z", "y", "x")
    assert group.attrs["tilepipe"]["unit"].startswith("dB")


def test_peak_memory_is_one_block_not_the_mosaic(tmp_path):
    """The fuser never holds a mosaic-sized array: peak traced allocations stay far below
    the mosaic's size and do not grow with it (2x2 -> 5x5 tiles: 5.2x the voxels)."""

    def peak_of(n: int) -> tuple[int, int]:
        positions = grid(n, n, (30, 36))
        tiles = tiles_of(tmp_path / f"{n}", positions, lambda z, y, x, k: field(z, y, x), depth=64)
        _, frame = mosaic_frame(np.array(positions, float), SHAPE)
        fuse_volume(tiles[:1], tmp_path / f"warm{n}.ome.zarr", 10.0, 2.5)  # codec set-up
        tracemalloc.start()
        try:
            fuse_volume(tiles, tmp_path / f"big{n}.ome.zarr", 10.0, 2.5, block_yx=(16, 32))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        return peak, 64 * frame[0] * frame[1] * 4

    small, small_bytes = peak_of(2)
    large, large_bytes = peak_of(5)
    assert large_bytes > 5 * small_bytes
    assert large < large_bytes / 3, (large, large_bytes)
    assert large < 1.5 * small, (small, large)


def test_focus_plane_fit_recovers_the_shared_plane_from_overlaps():
    """Tiles of a tilted, bumpy tissue surface, each seeing it plus one shared quadratic
    plane: the fit finds the plane (the tissue cancels in the overlaps), outliers and
    no-tissue pixels left out."""
    truth = focus_plane([8.0, -5.0, 6.0, 2.0, 3.0], SHAPE)
    rng = np.random.default_rng(3)
    positions = grid(3, 3, (30, 36))
    fit = FocusPlaneFit(SHAPE)
    yy, xx = np.meshgrid(np.arange(SHAPE[0]), np.arange(SHAPE[1]), indexing="ij")

    def tissue(y, x):
        return 100.0 + 0.3 * y - 0.2 * x + 4 * np.sin(y / 7.0) * np.cos(x / 9.0)

    surfaces, valid = [], []
    for py, px in positions:
        s = tissue(yy + py, xx + px) + truth
        s = s + rng.normal(0, 0.3, SHAPE)
        bad = rng.random(SHAPE) < 0.02
        s[bad] += rng.choice([-60.0, 60.0], bad.sum())  # surface detection failures
        surfaces.append(s)
        v = np.ones(SHAPE, bool)
        v[:, :3] = False  # e.g. below the tissue threshold
        valid.append(v)
    for i in range(len(positions)):
        for j in range(i + 1, len(positions)):
            dy, dx = np.subtract(positions[j], positions[i])
            if abs(dy) < SHAPE[0] and abs(dx) < SHAPE[1]:
                fit.add_overlap(surfaces[i], surfaces[j], (dy, dx), valid[i], valid[j])
    assert fit.pairs == 20  # 12 edge + 8 diagonal neighbours
    found = focus_plane(fit.solve(), SHAPE)
    assert found.min() == 0.0
    assert np.abs(found - truth).max() < 0.5, np.abs(found - truth).max()


def test_focus_plane_fit_refuses_without_overlap():
    fit = FocusPlaneFit(SHAPE)
    assert fit.add_overlap(np.zeros(SHAPE), np.zeros(SHAPE), (SHAPE[0], 0)) == 0
    with pytest.raises(ValueError, match="not enough"):
        fit.solve()


def test_focus_record_is_created_once_and_reused(tmp_path):
    """From the products' unfiltered surfaces; stored atomically under the output root; a
    second finder (another slice, host or a restart) gets the first one's record back."""
    truth = focus_plane([5.0, 3.0, -4.0, 0.0, 2.0], SHAPE)
    positions = grid(2, 2, (30, 36))
    tiles = tiles_of(
        tmp_path,
        positions,
        lambda z, y, x, k: field(z, y, x),
        surface=lambda y, x: 50 + 0.1 * y + 0.05 * x + truth,
    )
    record = fit_from_tiles(tiles, threshold_db=60.0)
    assert record["surface"] == ["surface_raw"] and record["pairs"] == 6
    np.testing.assert_allclose(plane_of({**record, "v": 1}, SHAPE), truth, atol=1e-6)
    path = tmp_path / "out" / "acq" / "focus" / "focus-normal.json"
    stored, created = store(path, {**record, "found_on": {"slice": 0, "mosaic": 0}})
    assert created and stored["found_on"] == {"slice": 0, "mosaic": 0}
    other = {**record, "coefficients": [0.0] * 5, "found_on": {"slice": 1, "mosaic": 0}}
    again, created = store(path, other)
    assert not created and again == stored == load(path)
    assert json.loads(path.read_text())["axes"] == ["bline", "aline"]
    assert [p.name for p in path.parent.iterdir()] == ["focus-normal.json"]  # no temporaries
    with pytest.raises(ValueError, match="found for tiles"):
        plane_of(stored, (SHAPE[0], SHAPE[1] + 1))


def test_racing_finders_keep_one_record(tmp_path):
    path = tmp_path / "focus-tilted.json"
    results = []

    def finder(k: int) -> None:
        results.append(store(path, {"coefficients": [float(k)], "found_on": {"slice": k}}))

    threads = [threading.Thread(target=finder, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(created for _, created in results) == 1
    assert len({json.dumps(r, sort_keys=True) for r, _ in results}) == 1


def test_stitch_crops_flat_and_stores_nothing_without_a_focus_plane(tmp_path):
    """No tissue in any overlap: the plane cannot be fitted; the volumes are still fused
    (crop without the plane, the reason in their attributes) and no record is stored, so a
    later slice can find it."""
    from services.core.config import Config, Roots, StageSettings
    from services.local.simulate import small_manifest
    from services.stages.stitch import Stitch
    from services.state.lattice import MosaicState

    roots = Roots(raw=tmp_path / "raw", work=tmp_path / "work", output=tmp_path / "output")
    stage = Stitch(
        Config(roots=roots),
        StageSettings(options={"fuse_volume": True, "volume_offset": 2, "volume_depth": 10}),
    )
    manifest = small_manifest("nf", slices=1, rows=1, cols=2, alines=SHAPE[1], bscans=SHAPE[0])
    positions = grid(1, 2, (0, 36))
    tiles = tiles_of(
        roots.work / "nf", positions, lambda z, y, x, k: field(z, y, x), surface=lambda y, x: y
    )
    for path, _ in tiles:  # below any tissue threshold
        zarr.open_group(str(path), mode="r+")["aip"][:] = 10.0
    _, frame = mosaic_frame(np.array(positions, float), SHAPE)
    rel = "nf/mosaics/slice0000-m0.ome.zarr"
    mask = np.ones(frame, np.float32)
    write_omezarr(roots.output / rel, {"aip": mask, "mask": mask}, fsync=False)
    state = MosaicState(
        tiles={(0, c): {"state": "processed", "products": f"nf/t{c}.zarr"} for c in range(2)}
    )

    class Log:
        def __init__(self):
            self.warnings = []

        def warning(self, event, **kw):
            self.warnings.append((event, kw))

    log = Log()
    index = {(0, 0): 0, (0, 1): 1}
    written = stage._fuse_volume(
        manifest, state, np.array(positions, float), index, rel, "nf", 0, 0, log
    )
    assert sorted(written) == ["O3D", "R3D", "dBI"]
    assert [e for e, _ in log.warnings] == ["focus_plane_not_found"]
    assert not (roots.output / "nf/focus").exists()
    group = zarr.open_group(str(roots.output / written["dBI"]), mode="r")
    attrs = group.attrs["tilepipe"]
    assert attrs["crop"] == {"offset": 2, "depth": 10, "focus_plane": False}
    assert "not enough" in attrs["focus_plane"]["error"]
    out = np.asarray(group["0"][:])
    zz, yy, xx = np.meshgrid(*(np.arange(n) for n in out.shape), indexing="ij")
    np.testing.assert_allclose(out[:, 5, 5], field(zz + 2, yy, xx)[:, 5, 5], atol=1e-4)


def test_one_store_placed_twice_is_read_for_each_placement(tmp_path):
    """Tiles are told apart by their place in the list, not by their path."""
    [(path, _)] = tiles_of(tmp_path, [(0, 0)], lambda z, y, x, k: field(z, y, x))
    tiles = [(path, (0.0, 0.0)), (path, (20.0, 100.0))]  # rows 20.. overlap a band's rows 0..
    target = tmp_path / "twice-dBI.ome.zarr"
    fuse_volume(tiles, target, 10.0, 2.5, block_yx=(32, 64))
    out = read(target)
    zz, yy, xx = np.meshgrid(
        np.arange(DEPTH), np.arange(SHAPE[0]), np.arange(SHAPE[1]), indexing="ij"
    )
    np.testing.assert_allclose(out[:, :40, :48], field(zz, yy, xx), atol=1e-4)
    np.testing.assert_allclose(out[:, 20:60, 100:148], field(zz, yy, xx), atol=1e-4)
