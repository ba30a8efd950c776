"""The instrument's names, grids and calibration files, without a server."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.io

from messages.events import TileCoord
from services.core.calibration_files import (
    read_dispersion,
    read_wave_pixel_mat,
    read_wavelength_table,
    wave_pixel_polynomials,
)
from services.core.errors import CalibrationFileError, ManifestError
from services.core.manifest import (
    FIJI_ORDERS,
    Calibration,
    Lattice,
    Manifest,
    MosaicSpec,
    Numbering,
    Processing,
    grid_index,
    grid_position,
    load_manifest,
)
from services.runtime.options import parse_options
from services.stages.process import ProcessOptions

pytestmark = pytest.mark.unit

SPECTRAL = "mosaic_{mosaic:03d}_image_{index:04d}_spectral_{counter:04d}.nii"


def instrument(**over) -> Manifest:
    fields = {
        "id": "inst",
        "lattice": Lattice(
            slices=3, mosaics=2, rows=3, cols=2, scan_order="snake-by-columns-up-right"
        ),
        "mosaic": [
            MosaicSpec(illumination="normal"),
            MosaicSpec(illumination="tilted", tilt_deg=-15, cols=3, alines=200),
        ],
        "numbering": Numbering(base=1, mosaic="global"),
        "pattern": SPECTRAL,
        **over,
    }
    return Manifest(**fields)


@pytest.mark.parametrize("order", [*FIJI_ORDERS, "raster", "serpentine"])
def test_every_fiji_order_visits_each_tile_once_and_inverts(order):
    rows, cols = 3, 4
    seen = [grid_position(order, k, rows, cols) for k in range(rows * cols)]
    assert sorted(seen) == sorted(itertools.product(range(rows), range(cols)))
    assert [grid_index(order, r, c, rows, cols) for r, c in seen] == list(range(rows * cols))
    steps = [abs(r1 - r0) + abs(c1 - c0) for (r0, c0), (r1, c1) in itertools.pairwise(seen)]
    if order.startswith("snake") or order == "serpentine":
        assert set(steps) == {1}  # a snake always moves to a neighbour


def test_known_orders():
    # Fiji "snake by columns, Up & Right": column 0 bottom -> top, column 1 top -> bottom
    assert [grid_position("snake-by-columns-up-right", k, 3, 2) for k in range(6)] == [
        (2, 0),
        (1, 0),
        (0, 0),
        (0, 1),
        (1, 1),
        (2, 1),
    ]
    assert [grid_position("column-by-column-down-left", k, 2, 2) for k in range(4)] == [
        (0, 1),
        (1, 1),
        (0, 0),
        (1, 0),
    ]
    assert [grid_position("row-by-row-left-up", k, 2, 2) for k in range(4)] == [
        (1, 1),
        (1, 0),
        (0, 1),
        (0, 0),
    ]
    assert [grid_position("raster", k, 2, 2) for k in range(4)] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    with pytest.raises(ValueError, match="unknown scan order"):
        grid_position("spiral", 0, 2, 2)


def test_instrument_names_round_trip_with_both_illuminations():
    m = instrument()
    assert m.tiles == 3 * (6 + 9)
    names = [m.path_of(t) for t in m.coords()]
    assert len(set(names)) == len(names)
    assert names[0] == "mosaic_001_image_0001_spectral_0001.nii"
    assert names[6] == "mosaic_002_image_0001_spectral_0007.nii"  # slice 1 tilted
    assert names[15] == "mosaic_003_image_0001_spectral_0016.nii"  # slice 2 normal
    for tile, name in zip(m.coords(), names, strict=True):
        assert m.parse(name) == tile
    # the microscope's counter is ignored, its padding too (older files: 3-digit images)
    assert m.parse("mosaic_002_image_009_spectral_0764.nii") == TileCoord(
        slice=0, mosaic=1, row=0, col=2, index=8
    )
    assert m.geometry(1).raw.alines == 200 and m.geometry(0).raw.alines == 350
    assert m.geometry(1).step_px == (280.0, 160.0)


def test_slice_offset_and_refusals():
    m = instrument(numbering=Numbering(base=1, mosaic="global", slice_offset=39))
    tile = m.parse("mosaic_079_image_0001_spectral_0001.nii")  # instrument slice 40, normal
    assert (tile.slice, tile.mosaic) == (0, 0)
    assert m.path_of(tile).startswith("mosaic_079_image_0001")
    with pytest.raises(ValueError, match=r"slice 39 / mosaic 2 .* slices 40..42"):
        m.parse("mosaic_078_image_0001_spectral_0001.nii")
    assert m.parse("mosaic_079_image_0001_spectral_0001.nii\n") is None
    assert m.parse("mosaic_079_image_\u0660\u0660\u0660\u0661_spectral_0001.nii") is None
    assert m.parse("mosaic_079_image_0001_spectral_0001.nii.part") is None
    with pytest.raises(ValueError, match=r"outside 0..5"):
        m.parse("mosaic_079_image_0007_spectral_0001.nii")


def test_interleaved_file_numbers_cycle_through_the_mosaics():
    m = instrument(
        lattice=Lattice(
            slices=2, mosaics=3, rows=2, cols=1, scan_order="snake-by-columns-up-right"
        ),
        mosaic=[MosaicSpec(illumination=n) for n in ("normal", "tiltPos", "tiltNeg")],
        pattern="processed_{file:04d}.nii",
    )
    parsed = [m.parse(f"processed_{f:04d}.nii") for f in range(1, 13)]
    assert [(t.slice, t.mosaic, t.index) for t in parsed[:6]] == [
        (0, 0, 0),
        (0, 1, 0),
        (0, 2, 0),
        (0, 0, 1),
        (0, 1, 1),
        (0, 2, 1),
    ]
    assert (parsed[6].slice, parsed[6].mosaic) == (1, 0)
    assert [m.path_of(t) for t in parsed] == [f"processed_{f:04d}.nii" for f in range(1, 13)]
    with pytest.raises(ValueError):
        instrument(
            lattice=Lattice(slices=1, mosaics=2, rows=2, cols=1),
            mosaic=[MosaicSpec(cols=1), MosaicSpec(cols=2)],
            pattern="processed_{file:04d}.nii",
        )  # interleaving needs equal mosaics


def test_alternative_names_and_locate(tmp_path):
    m = instrument(
        pattern="mosaic_{mosaic:03d}_image_{index:04d}_processed.nii",
        alt_patterns=["mosaic_{mosaic:03d}_image_{index:04d}_processed_cropped.nii"],
    )
    tile = m.parse("mosaic_003_image_0002_processed_cropped.nii")
    assert tile == m.parse("mosaic_003_image_0002_processed.nii")
    (tmp_path / "mosaic_003_image_0002_processed_cropped.nii").write_bytes(b"x")
    assert m.locate(tmp_path, tile).name == "mosaic_003_image_0002_processed_cropped.nii"
    spectral = instrument()
    (tmp_path / "mosaic_001_image_0003_spectral_0777.nii").write_bytes(b"x")
    found = spectral.locate(tmp_path, spectral.parse("mosaic_001_image_0003_spectral_0003.nii"))
    assert found.name == "mosaic_001_image_0003_spectral_0777.nii"  # whatever the counter
    with pytest.raises(ValueError, match=r"same fields|uses fields"):
        instrument(alt_patterns=["mosaic_{mosaic:03d}_{index}.nii"])


def test_pattern_must_tell_slices_and_mosaics_apart():
    with pytest.raises(ValueError, match="tell slices apart"):
        instrument(numbering=Numbering(base=1, mosaic="per-slice"))
    with pytest.raises(ValueError, match="at most 1000000"):
        instrument(lattice=Lattice(slices=100_000, mosaics=2, rows=10, cols=10))


# ---------------------------------------------------------------------------- calibration
def _mat(path, mu, wave, **extra):
    scipy.io.savemat(path, {"mu": mu, "wave_prime": np.asarray(wave)[:, None], **extra})
    return path


def test_wave_pixel_mat_as_the_toolbox_fits_it(tmp_path):
    n = 2048
    wave = np.linspace(1200.0, 1400.0, 9)
    # channel 1: lambda = 1190 + 0.1 * p1 (1-based); channel 2 after its flip: 1191 + 0.1 * f
    mu = np.stack([(wave - 1190.0) / 0.1, (wave - 1191.0) / 0.1], axis=1)
    path = _mat(tmp_path / "wave-pixel.mat", mu, wave)
    got_mu, got_wave = read_wave_pixel_mat(path)
    assert np.allclose(got_mu, mu) and np.allclose(got_wave, wave)
    p1, p2 = wave_pixel_polynomials(got_mu, got_wave, n, channel2_reversed=True)
    p = np.arange(n)
    assert np.allclose(np.polyval(p1[::-1], p), 1190.0 + 0.1 * (p + 1))
    # stored pixel p is flipped pixel f = n - p (1-based)
    assert np.allclose(np.polyval(p2[::-1], p), 1191.0 + 0.1 * (n - p))
    p1, p2 = wave_pixel_polynomials(got_mu, got_wave, n, channel2_reversed=False)
    assert np.allclose(np.polyval(p2[::-1], p), 1191.0 + 0.1 * (p + 1))


def test_bad_calibration_files_are_refused_by_name(tmp_path):
    with pytest.raises(CalibrationFileError, match="not found"):
        read_wave_pixel_mat(tmp_path / "missing.mat")
    scipy.io.savemat(tmp_path / "nomu.mat", {"wave_prime": np.ones(3)})
    with pytest.raises(CalibrationFileError, match="no variable 'mu'"):
        read_wave_pixel_mat(tmp_path / "nomu.mat")
    _mat(tmp_path / "short.mat", np.ones((3, 2)), np.ones(4))
    with pytest.raises(CalibrationFileError, match="4 wavelengths in wave_prime for 3 rows"):
        read_wave_pixel_mat(tmp_path / "short.mat")
    (tmp_path / "text.mat").write_text("not a mat file")
    with pytest.raises(CalibrationFileError, match="not a readable MATLAB file"):
        read_wave_pixel_mat(tmp_path / "text.mat")
    np.arange(100, dtype="<f8").tofile(tmp_path / "short.dat")
    with pytest.raises(CalibrationFileError, match="100 dispersion phases for 2048 samples"):
        read_dispersion(tmp_path / "short.dat", 2048)
    (tmp_path / "odd.dat").write_bytes(b"\x00" * 13)
    with pytest.raises(CalibrationFileError, match="not a whole number of float64"):
        read_dispersion(tmp_path / "odd.dat", 2048)
    np.full(2048, np.nan).astype("<f8").tofile(tmp_path / "nan.dat")
    with pytest.raises(CalibrationFileError, match="NaN"):
        read_dispersion(tmp_path / "nan.dat", 2048)
    (tmp_path / "table.txt").write_text("1300\n1301 # comment\n")
    with pytest.raises(CalibrationFileError, match="2 rows for 4 camera pixels"):
        read_wavelength_table(tmp_path / "table.txt", 4)
    (tmp_path / "words.txt").write_text("a b\n")
    with pytest.raises(CalibrationFileError, match="line 1 is not numeric"):
        read_wavelength_table(tmp_path / "words.txt", 1)
    values = np.linspace(-1, 1, 2048)
    values.astype("<f8").tofile(tmp_path / "ok.dat")
    assert np.array_equal(read_dispersion(tmp_path / "ok.dat", 2048), values)


def test_manifest_calibration_errors_name_the_file(tmp_path):
    m = instrument(
        calibration=Calibration(wave_pixel_mat="cal/wave-pixel.mat"),
        processing=Processing(preset="toolbox"),
        source=tmp_path / "manifest.toml",
    )
    with pytest.raises(ManifestError, match=r"cal/wave-pixel.mat: calibration file not found"):
        m.spectrometer()


def test_presets_and_explicit_fields():
    toolbox = instrument(processing=Processing(preset="toolbox", orientation_offset_deg=90.0))
    conv = toolbox.conventions()
    assert conv["orientation_offset_deg"] == 90.0 and conv["orientation_sign"] == -1
    assert conv["interpolation"] == "linear" and conv["window"] == "none"
    assert conv["channel2_reversed"] is True and conv["enface_window"] == "inclusive"
    params = toolbox.processing_params(batch_bscans=4)
    assert params.surface_method == "gradient" and params.batch_bscans == 4
    own = instrument().conventions()
    assert own["interpolation"] == "cubic" and own["channel2_reversed"] is False


def test_process_options_keep_the_science_in_the_manifest():
    def runtime(options: dict) -> dict:
        return parse_options(ProcessOptions, options, "process").runtime()

    assert runtime({"device": "cpu", "batch_bscans": 8}) == {"batch_bscans": 8}
    with pytest.raises(ValueError, match=r"\['enface_thickness'\] are processing conventions"):
        runtime({"enface_thickness": 50})
    with pytest.raises(ValueError, match=r"stages\.process\.options: unknown key 'thickness'"):
        runtime({"thickness": 50})
    # the products' codec is a stage option, not a kernel parameter; a wrong one is named
    assert runtime({"compression": "zstd", "cpu_threads": 2}) == {"cpu_threads": 2}
    with pytest.raises(
        ValueError, match=r"options.compression: Input should be 'lz4', 'zstd' or 'none'"
    ):
        runtime({"compression": "gzip"})


def test_manifest_file_limits(tmp_path):
    import os

    os.mkfifo(tmp_path / "fifo.toml")
    with pytest.raises(ManifestError, match="not a regular file"):
        load_manifest(tmp_path / "fifo.toml")  # never blocks
    (tmp_path / "deep.toml").write_text("a = " + "[" * 3000 + "]" * 3000)
    with pytest.raises(ManifestError, match=r"not valid TOML|nested too deeply"):
        load_manifest(tmp_path / "deep.toml")
    (tmp_path / "big.toml").write_text("# " + "x" * (2 << 20))
    with pytest.raises(ManifestError, match="a manifest is at most"):
        load_manifest(tmp_path / "big.toml")


def test_import_opticstream_refuses_what_it_cannot_honour_by_field_name():
    from services.core.errors import ImportRefused
    from services.ops.opticstream_import import build_manifest

    def config(**over):
        acq = {"grid_size_x_normal": 3, "grid_size_x_tilted": 4, "grid_size_y": 2}
        base = {"project_name": "sub-01 ses 2", "acquisition": acq, "zarr_config": {}}
        for key, value in over.items():
            target = base
            *parents, last = key.split(".")
            for p in parents:
                target = target.setdefault(p, {})
            target[last] = value
        return base

    kw = {"wave_pixel_mat": "c.mat", "dispersion_file": None, "slices": 2, "first_slice": 5}
    report = build_manifest(config(), **kw)
    m = report.manifest
    assert m.id == "sub-01-ses-2" and m.numbering.slice_offset == 4
    assert [g.cols for g in map(m.geometry, range(2))] == [3, 4]
    assert m.processing.orientation_sign == -1 and m.processing.flip_z is False
    assert any("zarr_config" in n for n in report.notes)
    assert any("no dispersion file" in n for n in report.notes)
    flipped = build_manifest(
        config(**{"processing.flip_phase": True, "processing.flip_z": False}), **kw
    )
    assert flipped.manifest.processing.orientation_sign == 1
    assert flipped.manifest.processing.flip_z is True
    for key, value, field in (
        ("processing.ori_method", "histogram", "processing.ori_method"),
        ("processing.biref_method", "unwrap_new", "processing.biref_method"),
        ("processing.surface_spec", "argmax", "processing.surface_spec"),
        ("acquisition.tile_saving_type", "hdf5", "acquisition.tile_saving_type"),
        ("acquisition.scan_resolution_3d", [0.01, 0.02, 0.0025], "scan_resolution_3d"),
        ("acquisition.grid_size_y", 0, "acquisition.grid_size_y"),
        ("acquisition.frame_rate", 10, "acquisition.frame_rate"),
        ("mosaics_per_slice", 4, "mosaics_per_slice"),
    ):
        with pytest.raises(ImportRefused, match=field.replace(".", r"\.")):
            build_manifest(config(**{key: value}), **kw)
    macaque = build_manifest(config(mosaics_per_slice=3), **kw).manifest
    assert [g.illumination for g in map(macaque.geometry, range(3))] == [
        "normal",
        "tiltPos",
        "tiltNeg",
    ]
    assert macaque.pattern == "processed_{file:04d}.nii"
