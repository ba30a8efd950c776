"""The acquisition simulator and raw formats."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from services.core.errors import RawFormatError
from services.core.manifest import Manifest, RawLayout, load_manifest
from services.io.rawio import encode_tile, header_notes, pack12, read_tile, unpack12
from services.local.simulate import (
    PhantomParams,
    Simulator,
    Truth,
    simulate,
    small_manifest,
    write_manifest,
)

REPO = Path(__file__).resolve().parents[1]
PARAMS = PhantomParams(scatterers=4)


@pytest.mark.unit
@pytest.mark.parametrize("raw_format", ["nifti-spectral", "raw12", "tiff", "nifti-complex"])
def test_simulated_acquisition_in_every_format(tmp_path, raw_format):
    manifest = small_manifest(
        "fmt", slices=2, rows=1, cols=2, alines=16, bscans=12, samples=256, raw_format=raw_format
    )
    data = manifest.model_dump()
    data["calibration"]["autocorr_bins"] = 4
    data["raw"]["depth"] = None  # complex tiles: every bin from the cut
    path = write_manifest(Manifest.model_validate(data), tmp_path / "fmt")
    loaded = load_manifest(path)
    started = time.monotonic()
    truth = simulate(path, loaded, rate=4.0, params=PARAMS)
    elapsed = time.monotonic() - started
    assert elapsed >= 0.7  # 4 tiles at 4 tiles/s: the last starts 0.75 s after the first
    files = sorted(p.name for p in (tmp_path / "fmt").rglob("mosaic_*"))
    ext = {"nifti-spectral": ".nii", "raw12": ".raw", "tiff": ".tif", "nifti-complex": ".nii"}
    tail = "processed" if raw_format == "nifti-complex" else "spectral_{:04d}"
    # as the microscope names them: mosaics from 1 through the acquisition (one per slice
    # here), images from 1 in the column snake, a running file counter
    assert files == [
        f"mosaic_{m:03d}_image_{i:04d}_{tail.format(n)}{ext[raw_format]}"
        for n, (m, i) in enumerate([(1, 1), (1, 2), (2, 1), (2, 2)], start=1)
    ]
    assert (tmp_path / "fmt" / "calibration" / "wave-pixel.mat").is_file()
    assert (tmp_path / "fmt" / "calibration" / "dispersion.dat").stat().st_size == 256 * 8
    cal = loaded.spectrometer()
    assert cal.wavelengths_nm(1)[0] > cal.wavelengths_nm(1)[-1]  # channel 2 stored backwards
    for f in files:
        data = read_tile(tmp_path / "fmt" / f, loaded.raw)
        if raw_format == "nifti-complex":
            assert data.shape == (12, 2, 16, 128 - 4) and data.dtype == np.complex64
            continue
        assert data.shape == (12, 2, 16, 256) and data.dtype == np.uint16
        assert 300 < data.mean() < 60000 and data.max() < (4096 if raw_format == "raw12" else 65536)
    saved = Truth.load(tmp_path / "fmt" / "ground_truth.json")
    assert saved.tiles == truth.tiles and len(saved.slices) == 2
    for t in saved.tiles:
        assert abs(t.y_px - t.nominal_y_px) <= 3 and abs(t.x_px - t.nominal_x_px) <= 3
    assert saved.slices[0]["dx_um"] == 0 and saved.slices[1]["rotation_deg"] != 0


@pytest.mark.unit
def test_truth_is_deterministic_and_tiles_overlap_consistently():
    manifest = small_manifest("det", slices=1, rows=1, cols=2, alines=32, bscans=8)
    a, b = Simulator(manifest, PARAMS), Simulator(manifest, PARAMS)
    assert a.truth.tiles == b.truth.tiles
    left, right = a.truth.tiles[0], a.truth.tiles[1]
    fl, fr = a.tile_fields(left), a.tile_fields(right)
    # the same sample point seen by two tiles has the same ground truth
    shift = round(right.x_px - left.x_px)
    dy = right.y_px - left.y_px
    assert abs(dy) < 6
    xl = a.sample_coords(left)[0][0, shift]
    xr = a.sample_coords(right)[0][0, 0]
    assert abs(xl - xr) < 10.0  # within one pixel (10 um)
    assert np.isfinite(fl["reflectivity"]).all() and (fr["reflectivity"] > 0).all()


@pytest.mark.unit
def test_raw12_packing_round_trip_and_errors(tmp_path):
    values = np.array([0, 1, 4095, 2048, 7], np.uint16)
    assert (unpack12(pack12(values), 5) == values).all()
    with pytest.raises(ValueError):
        pack12(np.array([4096], np.uint16))
    layout = RawLayout(format="nifti-spectral", samples=16, alines=2, bscans=2)
    good = encode_tile(np.zeros((2, 2, 2, 16), np.uint16), layout)
    path = tmp_path / "t.nii"
    path.write_bytes(good[:-2])
    with pytest.raises(RawFormatError, match="truncated"):
        read_tile(path, layout)
    path.write_bytes(b"\x00\x00\x00\x00" + good[4:])  # sizeof_hdr 0: no NIfTI-1 header
    with pytest.raises(RawFormatError, match=r"not a NIfTI-1 header.*expected 348"):
        read_tile(path, layout)
    eight_bit = bytearray(good)
    eight_bit[72:74] = (8).to_bytes(2, "little")  # bitpix
    path.write_bytes(bytes(eight_bit))
    with pytest.raises(RawFormatError, match=r"8-bit values.*expected 16-bit"):
        read_tile(path, layout)
    # like the lab's readers: dims, magic and vox_offset that disagree are read anyway, as
    # long as the size is 352 + the manifest's payload; they are reported as notes
    odd = bytearray(good.replace(b"n+1", b"xxx"))
    odd[40:56] = bytes(16)  # dims all zero
    path.write_bytes(bytes(odd))
    assert (read_tile(path, layout) == 0).all()
    notes = header_notes(bytes(odd[:352]), layout, "t.nii")
    assert any("dims" in n for n in notes) and any("magic" in n for n in notes)
    wrong = RawLayout(format="nifti-spectral", samples=16, alines=4, bscans=2)
    with pytest.raises(RawFormatError, match=r"truncated: 608 bytes, expected 864 \(352-byte"):
        read_tile(path, wrong)


def test_simulate_cli_new_manifest(tmp_path):
    target = tmp_path / "raw" / "cli1" / "manifest.toml"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.ops.cli",
            "simulate",
            str(target),
            "--new",
            "--rate",
            "0",
            "--slices",
            "1",
            "--scatterers",
            "2",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    manifest = load_manifest(target)
    assert manifest.id == "cli1"
    per_slice = manifest.tiles_per_slice
    assert len(list((target.parent).rglob("mosaic_*_spectral_*.nii"))) == per_slice
    assert f"{per_slice}/{per_slice} tiles" in proc.stdout
    truth = json.loads((target.parent / "ground_truth.json").read_text())
    assert truth["acq"] == "cli1"
