"""NIfTI copies, PNG previews and the per-acquisition HTML index (services/io/exports.py).

Real files: OME-Zarr stores written by the stages' writer, read back with nibabel and Pillow;
the index is rendered by a real headless Chromium, which must load every image."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from kernels.thruplane import CHANNELS as AXIS_CHANNELS
from services.io.exports import export_axis, export_mosaic
from services.io.layout import axis_path, index_path, mosaic_path
from services.io.omezarr import write_omezarr
from services.io.previews import block_mean
from tests.browser import chromium, images_loaded
from tests.conftest import tilepipe

PX_UM = 10.0
THICK_UM = 200.0


def mosaic_maps(shape: tuple[int, int], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float32)
    aip = 40.0 + 30.0 * xx / nx + rng.normal(0, 1, shape).astype(np.float32)
    mask = (aip > 55.0).astype(np.float32)
    mask[:5, :5] = np.nan  # no data
    ret = np.where(yy < ny / 2, 40.0, 0.0).astype(np.float32)  # lower half: no retardance
    ori = np.where(xx < nx / 2, -90.0, -30.0).astype(np.float32)  # red | green
    return {
        "aip": aip,
        "mip": aip + 5.0,
        "retardance": ret,
        "orientation": ori,
        "birefringence": (ret * 1e-5).astype(np.float32),
        "mask": mask,
    }


def write_mosaic(output: Path, acq: str, k: int, m: int, maps, origin_um=(50.0, -30.0)) -> str:
    rel = mosaic_path(acq, k, m)
    write_omezarr(output / rel, maps, pixel_size_um=(PX_UM, PX_UM), origin_um=origin_um)
    return rel


def write_axis(output: Path, acq: str, k: int, shape: tuple[int, int]) -> str:
    rng = np.random.default_rng(k)
    maps = {c: rng.uniform(0, 1, shape).astype(np.float32) for c in AXIS_CHANNELS}
    maps["inclination"] = rng.uniform(-90, 90, shape).astype(np.float32)
    rel = axis_path(acq, k)
    write_omezarr(output / rel, maps, pixel_size_um=(PX_UM, PX_UM))
    return rel


@pytest.mark.unit
def test_mosaic_nifti_has_the_toolbox_orientation_affine_and_units(tmp_path):
    maps = mosaic_maps((60, 90))
    rel = write_mosaic(tmp_path, "acq", 3, 1, maps)
    files = export_mosaic(tmp_path, rel, 3, 1, THICK_UM)
    keys = {"aip", "mip", "ret", "ori", "biref", "mask"}
    assert {k for k in files if k.startswith("nifti.")} == {f"nifti.{k}" for k in keys}
    assert files["nifti.aip"] == "acq/mosaics/slice0003-m1/aip.nii.gz"
    for key, channel in [("aip", "aip"), ("ori", "orientation"), ("mask", "mask")]:
        img = nib.load(tmp_path / files[f"nifti.{key}"])
        assert img.shape == (90, 60, 1)  # X (A-lines, columns) x Y (B-lines, rows) x 1
        assert np.array_equal(img.get_fdata()[:, :, 0], maps[channel].T, equal_nan=True)
        assert np.allclose(img.header.get_zooms(), (0.01, 0.01, 0.2))
        assert img.header.get_xyzt_units() == ("mm", "sec")
        # voxel (i, j, 0) -> x = origin_x + i * px, y = origin_y + j * px, z = slice * thickness
        assert np.allclose(img.affine @ [4, 7, 0, 1], [-0.03 + 0.04, 0.05 + 0.07, 0.6, 1])
        assert img.header.get_sform(coded=True)[1] == 1
    descrip = nib.load(tmp_path / files["nifti.aip"]).header["descrip"].item().decode()
    assert "[dB]" in descrip
    # a redelivery keeps the files; a forced export rewrites them
    stamp = (tmp_path / files["nifti.aip"]).stat().st_mtime_ns
    assert export_mosaic(tmp_path, rel, 3, 1, THICK_UM, force=False) == files
    assert (tmp_path / files["nifti.aip"]).stat().st_mtime_ns == stamp


@pytest.mark.unit
def test_previews_window_orientation_hsv_and_are_bounded(tmp_path):
    maps = mosaic_maps((60, 90))
    rel = write_mosaic(tmp_path, "acq", 0, 0, maps)
    files = export_mosaic(tmp_path, rel, 0, 0, THICK_UM)
    ori = np.asarray(Image.open(tmp_path / files["preview.ori"]).convert("RGB")).astype(int)
    assert ori.shape == (60, 90, 3)  # the mosaic as stored: rows down, columns right
    assert tuple(ori[10, 10]) == (255, 0, 0)  # -90 deg, full retardance: red
    assert tuple(ori[10, 80]) == (0, 255, 0)  # -30 deg: green
    assert ori[50, 10].max() == 0 and ori[50, 80].max() == 0  # no retardance: black
    assert "hue" in Image.open(tmp_path / files["preview.ori"]).text["Description"]
    aip = np.asarray(Image.open(tmp_path / files["preview.aip"]).convert("L")).astype(int)
    assert aip[:, :10].mean() < 40 and aip[:, -10:].mean() > 215  # 1-99 % window
    mask = np.asarray(Image.open(tmp_path / files["preview.mask"]).convert("L"))
    assert mask[0, 0] == 0 and set(np.unique(mask[10:, 10:])) <= {128, 255}
    # a large mosaic: previews shrink to 2048 px on the long side
    big = {k: np.repeat(np.repeat(v, 10, 0), 50, 1) for k, v in mosaic_maps((50, 50)).items()}
    rel = write_mosaic(tmp_path, "big", 0, 0, big)
    files = export_mosaic(tmp_path, rel, 0, 0, THICK_UM)
    # block means by the integer factor that brings it under 2048 (2), angles doubled
    assert Image.open(tmp_path / files["preview.aip"]).size == (1250, 250)
    ori = np.array([[-89.0, 89.0], [-88.0, 88.0]], np.float32)
    assert abs(abs(float(block_mean(ori, 2, axial=True)[0, 0])) - 90.0) < 0.1
    assert float(block_mean(ori, 2)[0, 0]) == 0.0  # what a plain mean would make of it


@pytest.mark.unit
def test_axis_nifti_and_previews(tmp_path):
    rel = write_axis(tmp_path, "acq", 2, (40, 50))
    files = export_axis(tmp_path, rel, 2, THICK_UM)
    assert {k for k in files if k.startswith("nifti.")} == {
        f"nifti.{k}" for k in ("delta_n", "inclination", "azimuth", "axis", "vector", "mask")
    }
    img = nib.load(tmp_path / files["nifti.axis"])
    assert img.shape == (50, 40, 1, 1, 3) and img.header.get_intent()[0] == "vector"
    assert np.allclose(img.affine[2, 3], 0.4)
    assert np.allclose(img.header.get_zooms()[:3], (0.01, 0.01, 0.2))
    for key in ("inplane", "throughplane", "axis3d", "delta_n", "mask"):
        assert Image.open(tmp_path / files[f"preview.{key}"]).size == (50, 40)


@pytest.mark.skipif(chromium() is None, reason="Debian chromium is not installed")
def test_index_renders_in_headless_chromium_with_every_image_loaded(tmp_path):
    """Two slices (two mosaics and the axis each): the index lists the newest previews per
    slice; Chromium loads the page and every <img> has a natural size (checked by a script
    appended to a copy of the page beside it, its result read back with --dump-dom)."""
    for k in (0, 1):
        for m in (0, 1):
            export_mosaic(
                tmp_path, write_mosaic(tmp_path, "acq", k, m, mosaic_maps((30, 40))), k, m, THICK_UM
            )
        export_axis(tmp_path, write_axis(tmp_path, "acq", k, (30, 40)), k, THICK_UM)
    page = (tmp_path / index_path("acq")).read_text()
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert len(srcs) == 2 * (6 + 6 + 5)
    assert page.index('id="slice0001"') < page.index('id="slice0000"')  # newest first
    assert images_loaded(tmp_path / index_path("acq")) == f"images={len(srcs)} broken=0"
    # a preview deleted on disk breaks the check (the check can fail)
    (tmp_path / "acq/previews/slice0000-m0/aip.png").unlink()
    assert images_loaded(tmp_path / index_path("acq")) == f"images={len(srcs)} broken=1 aip"


async def test_status_names_the_index(config, js):
    """`tilepipe status ACQ` (text and --json) gives the index's path once it exists."""
    out = config.roots.output
    assert "previews: none yet" in tilepipe("status", "acq", config=config).stdout
    export_mosaic(out, write_mosaic(out, "acq", 0, 0, mosaic_maps((20, 30))), 0, 0, THICK_UM)
    index = str(out / index_path("acq"))
    text = tilepipe("status", "acq", config=config)
    assert f"previews: {index}" in text.stdout, text.stderr
    doc = json.loads(tilepipe("status", "acq", "--json", config=config).stdout)
    assert doc["previews_index"] == index
