"""Self-checks of the oracles: the toolbox transcription against the physics forward model,
the file formats against their specifications, and small hand-computable cases."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from tests.oracle import physics as ph
from tests.oracle import toolbox as tb

A, B = 16, 8  # A-lines (even: antithetic pairs), B-lines
DZ_BINS = 60.0  # deep reflector below the surface
A2, A3 = 1000.0, -8000.0  # dispersion mismatch (rad um^2, rad um^3)


@dataclass
class Tile:
    spec: ph.Spectrometer
    mu: np.ndarray
    wave: np.ndarray
    sample: ph.Sample
    raw: np.ndarray
    delta_deg: np.ndarray  # (A, B), deep reflector
    theta_deg: np.ndarray  # (A, B), deep reflector
    surf_idx: np.ndarray  # (A, B) expected 0-based product index of the surface
    deep_idx: np.ndarray  # (A, B)
    dispersion: np.ndarray
    files: dict[str, Path]


@pytest.fixture(scope="module")
def tile(tmp_path_factory: pytest.TempPathFactory) -> Tile:
    rng = np.random.default_rng(20240611)
    spec = ph.Spectrometer.typical()
    wave = ph.default_calibration_wavelengths(spec)
    mu = ph.calibration_points(spec, wave)
    n_pairs = B * A // 2
    theta_pairs = np.linspace(-89.0, 89.0, n_pairs)
    rng.shuffle(theta_pairs)
    delta_pairs = rng.uniform(15.0, 75.0, n_pairs)
    theta = np.repeat(theta_pairs.reshape(B, A // 2), 2, axis=1)  # (B, A), equal pairs
    delta = np.repeat(delta_pairs.reshape(B, A // 2), 2, axis=1)
    surf_bin = 100.3 + 2.0 * np.arange(B)[:, None] * np.ones((1, A))  # varies per B-line
    sample = ph.two_reflector_sample(
        A,
        B,
        ph.depth_for_bin(surf_bin, spec, mu, wave),
        DZ_BINS * ph.toolbox_bin_size_um(mu, wave),
        delta_rad=np.deg2rad(delta),
        theta_deg=theta,
        rng=rng,
    )
    raw = ph.simulate_raw(spec, sample, dispersion=(A2, A3), noise_std=2.0, rng=rng)
    disp = ph.dispersion_file_values(spec, mu, wave, A2, A3)

    d = tmp_path_factory.mktemp("oracle")
    files = {"nifti": d / "tile.nii", "mat": d / "wave-pixel.mat", "disp": d / "disp.dat"}
    ph.write_spectral_nifti(files["nifti"], raw)
    ph.write_wave_pixel_mat(files["mat"], mu, wave)
    ph.write_dispersion_file(files["disp"], disp)
    return Tile(
        spec=spec,
        mu=mu,
        wave=wave,
        sample=sample,
        raw=raw,
        delta_deg=delta.T,
        theta_deg=theta.T,
        surf_idx=ph.expected_depth_bin(sample.depth_um[..., 0], spec, mu, wave).T,
        deep_idx=ph.expected_depth_bin(sample.depth_um[..., 1], spec, mu, wave).T,
        dispersion=disp,
        files=files,
    )


@pytest.fixture(scope="module")
def products(tile: Tile) -> dict[str, np.ndarray]:
    return tb.toolbox_products(tile.files["nifti"], A, B, tile.files["mat"], tile.files["disp"])


def _peaks(intensity: np.ndarray, expected: np.ndarray, half: int = 8) -> tuple[np.ndarray, ...]:
    """Integer argmax and sub-bin (parabolic in log) peak near ``expected``, per A-line."""
    idx = np.zeros(expected.shape, dtype=int)
    sub = np.zeros(expected.shape)
    height = np.zeros(expected.shape)
    for ix in np.ndindex(expected.shape):
        lo = round(float(expected[ix])) - half
        seg = intensity[ix][lo : lo + 2 * half + 1]
        i = int(np.argmax(seg))
        frac = 0.0
        if 0 < i < seg.size - 1:
            y0, y1, y2 = np.log(seg[i - 1 : i + 2])
            frac = 0.5 * (y0 - y2) / (y0 - 2 * y1 + y2)
        idx[ix], sub[ix], height[ix] = lo + i, lo + i + frac, seg[i]
    return idx, sub, height


def _angle_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Difference of 180-periodic angles, in [-90, 90)."""
    return (np.asarray(a) - np.asarray(b) + 90.0) % 180.0 - 90.0


# --------------------------------------------------------------------------- physics -> toolbox


def test_products_shapes(products: dict[str, np.ndarray]) -> None:
    for key in ("dBI3D", "R3D", "O3D"):
        assert products[key].shape == (A, B, tb.N_DEPTH)
    for key in ("surf", "aip", "mip", "ret", "ori", "biref"):
        assert products[key].shape == (A, B)
    assert products["surf"].min() >= 1


def test_depth_retardance_orientation(tile: Tile, products: dict[str, np.ndarray]) -> None:
    intensity = 10 ** (products["dBI3D"] / 10)
    for expected in (tile.surf_idx, tile.deep_idx):
        idx, sub, _ = _peaks(intensity, expected)
        assert np.abs(idx - expected).max() <= 0.5
        assert np.abs(sub - expected).max() < 0.15
    idx, _, _ = _peaks(intensity, tile.deep_idx)
    ai, bi = np.indices((A, B))
    ret = products["R3D"][ai, bi, idx]
    ori = products["O3D"][ai, bi, idx]
    assert np.abs(ret - tile.delta_deg).max() < 2.0
    assert np.abs(_angle_diff(ori, tile.theta_deg)).max() < 2.0
    # the relation spans the whole range of axes, both signs
    assert tile.theta_deg.min() < -85 and tile.theta_deg.max() > 85


def test_orientation_needs_the_instrument_relation(tile: Tile) -> None:
    """flipPhase=true or another phase offset would not recover theta."""
    j1, j2 = tb.spectral_to_jones(tile.raw, tile.mu, tile.wave, tile.dispersion)
    idx, _, _ = _peaks(np.abs(j1) ** 2 + np.abs(j2) ** 2, tile.deep_idx)
    ai, bi = np.indices((A, B))
    for kwargs in ({"flip_phase": True}, {"phase_offset_deg": 0.0}):
        _, _, ori = tb.jones_to_volumes(j1, j2, **kwargs)
        err = np.abs(_angle_diff(ori[ai, bi, idx], tile.theta_deg))
        assert np.median(err) > 10.0


def test_dispersion_file_sign_and_order(tile: Tile) -> None:
    """Only the derived file (-phi on the descending toolbox grid) restores a sharp peak."""
    intensity = {}
    variants = {
        "derived": tile.dispersion,
        "none": np.zeros_like(tile.dispersion),
        "negated": -tile.dispersion,
        "reversed": tile.dispersion[::-1],
    }
    for name, disp in variants.items():
        j1, j2 = tb.spectral_to_jones(tile.raw, tile.mu, tile.wave, disp)
        intensity[name] = np.abs(j1) ** 2 + np.abs(j2) ** 2
    _, sub, h_ok = _peaks(intensity["derived"], tile.deep_idx)
    assert np.abs(sub - tile.deep_idx).max() < 0.15
    for name in ("none", "negated", "reversed"):
        _, _, h = _peaks(intensity[name], tile.deep_idx, half=20)
        assert np.median(10 * np.log10(h_ok / h)) > 3.0, name


def test_wrong_depth_flip_is_detected(tile: Tile, products: dict[str, np.ndarray]) -> None:
    j1, j2 = tb.read_complex_nifti(_complex_file(tile))
    dbi, _, _ = tb.jones_to_volumes(j1, j2, flip_z_net=True)
    np.testing.assert_allclose(dbi[..., ::-1], products["dBI3D"], atol=1e-3)
    peak = np.argmax(dbi, axis=2)
    assert np.all(np.abs(peak - tile.surf_idx) > 100)


def test_surface_map(tile: Tile, products: dict[str, np.ndarray]) -> None:
    """The gradient method lands on the rising edge just above the surface reflector."""
    offset = (products["surf"] - 1) - tile.surf_idx
    assert offset.min() >= -8 and offset.max() <= 0


def test_enface_maps(tile: Tile, products: dict[str, np.ndarray]) -> None:
    dbi, surf = products["dBI3D"], products["surf"]
    assert np.allclose(products["mip"], dbi.max(axis=2))  # the surface is the global max
    window = products["dBI3D"][0, 0, surf[0, 0] - 1 : surf[0, 0] + 70]
    assert window.size == 71
    assert products["aip"][0, 0] == pytest.approx(window.mean())
    assert np.all(np.isfinite(products["ori"])) and np.all(np.abs(products["ori"]) <= 90)


def test_birefringent_slab() -> None:
    """Retardance growing 1 deg per bin below the surface: positive biref of the right size."""
    rng = np.random.default_rng(7)
    spec = ph.Spectrometer.typical()
    wave = ph.default_calibration_wavelengths(spec)
    mu = ph.calibration_points(spec, wave)
    bin_um = ph.toolbox_bin_size_um(mu, wave)
    sample = ph.birefringent_slab_sample(
        A,
        B,
        ph.depth_for_bin(100.0, spec, mu, wave),
        90 * bin_um,
        delta_per_um=np.deg2rad(1.0) / bin_um,
        theta_deg=30.0,
        rng=rng,
    )
    raw = ph.simulate_raw(spec, sample, rng=rng)
    j1, j2 = tb.spectral_to_jones(raw, mu, wave, np.zeros(tb.N_SAMPLES))
    dbi, ret, ori = tb.jones_to_volumes(j1, j2)
    surf = tb.gradient_surface(dbi)
    maps = tb.enface(dbi, ret, ori, surf)
    expected = 1.0 / 360 * 1.3 / 2.5  # (deg per bin)/360 * lambda / z_size
    assert np.all(maps["biref"] > 0)
    assert np.median(maps["biref"]) == pytest.approx(expected, rel=0.15)
    ori_err = np.abs(_angle_diff(maps["ori"], 30.0))  # window starts a few noise bins early
    assert np.median(ori_err) < 1.0 and ori_err.max() < 5.0


# --------------------------------------------------------------------------- file formats


def _complex_file(tile: Tile) -> Path:
    path = tile.files["nifti"].with_name("complex.nii")
    if not path.exists():
        j1, j2 = tb.spectral_to_jones(tile.raw, tile.mu, tile.wave, tile.dispersion)
        tb.write_complex_nifti(path, j1, j2)
    return path


def test_spectral_nifti_layout(tile: Tile) -> None:
    data = tile.files["nifti"].read_bytes()
    assert struct.unpack_from("<i", data, 0)[0] == 348
    assert struct.unpack_from("<8h", data, 40)[:5] == (4, tb.N_SAMPLES, A, 2, B)
    assert struct.unpack_from("<hh", data, 70) == (512, 16)
    assert struct.unpack_from("<f", data, 108)[0] == 352.0
    assert data[344:348] == b"n+1\0"
    assert len(data) == 352 + 2 * tile.raw.size
    # column-major (S, A, 2, B): the first spectrum is B-line 0, channel 1, A-line 0
    first = np.frombuffer(data, "<u2", count=tb.N_SAMPLES, offset=352)
    np.testing.assert_array_equal(first, tile.raw[0, 0, 0])
    np.testing.assert_array_equal(tb.read_spectral(tile.files["nifti"], A, B), tile.raw)


def test_raw12_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "pair.raw"
    ph.write_raw12(path, np.array([0xABC, 0x123], dtype=np.uint16).reshape(1, 1, 1, 2))
    assert path.read_bytes() == bytes([0xBC, 0x3A, 0x12])  # per unpack12bits.m

    rng = np.random.default_rng(3)
    raw = rng.integers(0, 4096, size=(3, 2, 4, tb.N_SAMPLES), dtype=np.uint16)
    ph.write_raw12(tmp_path / "t.raw", raw)
    assert (tmp_path / "t.raw").stat().st_size == raw.size * 3 // 2
    np.testing.assert_array_equal(tb.read_spectral(tmp_path / "t.raw", 4, 3, raw12=True), raw)
    with pytest.raises(ValueError):
        ph.write_raw12(tmp_path / "bad.raw", np.full((1, 1, 1, 2), 4096, dtype=np.uint16))


def test_raw12_tile_gives_same_products(tile: Tile, products: dict[str, np.ndarray]) -> None:
    assert tile.raw.max() < 4096
    path = tile.files["nifti"].with_name("tile.raw")
    ph.write_raw12(path, tile.raw)
    out = tb.toolbox_products(path, A, B, tile.files["mat"], tile.files["disp"], raw12=True)
    for key, value in products.items():
        np.testing.assert_array_equal(out[key], value)


def test_complex_nifti_roundtrip(tile: Tile, products: dict[str, np.ndarray]) -> None:
    path = _complex_file(tile)
    data = path.read_bytes()
    assert struct.unpack_from("<8h", data, 40)[:4] == (3, 4 * A, B, tb.N_DEPTH)
    assert struct.unpack_from("<hh", data, 70) == (16, 32)
    assert struct.unpack_from("<f", data, 108)[0] == 352.0
    assert data[344:348] == b"n+1\0" and data[348:352] == bytes(4)
    j1, j2 = tb.spectral_to_jones(tile.raw, tile.mu, tile.wave, tile.dispersion)
    # the file is flipped in depth: its first slice is the in-memory last one
    stored = np.frombuffer(data, "<f4", count=4 * A * B, offset=352).reshape(B, 4 * A).T
    np.testing.assert_allclose(stored[:A], j1[..., -1].real, rtol=1e-6)
    np.testing.assert_allclose(stored[3 * A :], j2[..., -1].imag, rtol=1e-6)
    r1, r2 = tb.read_complex_nifti(path)
    scale = np.abs(j1).max()
    assert np.abs(r1 - j1).max() < 1e-6 * scale and np.abs(r2 - j2).max() < 1e-6 * scale
    dbi, ret, ori = tb.jones_to_volumes(r1, r2)  # the lab's file chain
    np.testing.assert_allclose(dbi, products["dBI3D"], atol=1e-3)
    np.testing.assert_allclose(ret, products["R3D"], atol=1e-3)
    assert np.abs(_angle_diff(ori, products["O3D"])).max() < 1e-3


def test_wave_pixel_mat_roundtrip(tmp_path: Path) -> None:
    spec = ph.Spectrometer.typical()
    wave = ph.default_calibration_wavelengths(spec)
    mu = ph.calibration_points(spec, wave)
    ph.write_wave_pixel_mat(tmp_path / "wp.mat", mu, wave)
    m = scipy.io.loadmat(str(tmp_path / "wp.mat"))
    assert m["mu"].shape == (wave.size, 2) and m["wave_prime"].shape == (wave.size, 1)
    mu2, wave2 = tb.read_wave_pixel_mat(tmp_path / "wp.mat")
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(wave2, wave)
    scipy.io.savemat(str(tmp_path / "alias.mat"), {"mu": mu, "wave_sample": wave[None, :]})
    np.testing.assert_array_equal(tb.read_wave_pixel_mat(tmp_path / "alias.mat")[1], wave)


def test_calibration_is_linear_fit_of_a_bowed_spectrometer() -> None:
    spec = ph.Spectrometer.typical()
    wave = ph.default_calibration_wavelengths(spec)
    mu = ph.calibration_points(spec, wave)
    assert np.all(np.diff(mu[:, 0]) > 0) and np.all(np.diff(mu[:, 1]) > 0)
    lam_l, lam_r = tb.toolbox_wavelengths(mu, wave)
    err_l = np.abs(lam_l - spec.lam_ch1_nm).max()
    err_r = np.abs(lam_r - spec.lam_ch2_nm[::-1]).max()  # channel 2 after the flip
    assert 0.05 < err_l < 0.3 and 0.05 < err_r < 0.3
    k = tb.toolbox_k_grid(mu, wave)
    assert np.all(np.diff(k) < 0)  # descending
    assert ph.toolbox_bin_size_um(mu, wave) == pytest.approx(np.pi / (2048 * (k[0] - k[1])))


def test_sample_from_reflectors() -> None:
    r = ph.Reflector(depth_um=900.0, amplitude=50.0, delta_rad=0.3, theta_deg=10.0)
    sample = ph.Sample.from_reflectors([[[r], [r, r]], [[], [r]]])
    assert sample.depth_um.shape == (2, 2, 2) and (sample.blines, sample.alines) == (2, 2)
    assert sample.amplitude[1, 0].tolist() == [0.0, 0.0]  # padding: no reflector
    a1, a2 = ph.channel_amplitudes(sample)
    assert np.angle(a1[0, 0, 0] / a2[0, 0, 0]) == pytest.approx(np.deg2rad(2 * (10.0 - 100.0)))
    assert abs(a1[0, 0, 0] / a2[0, 0, 0]) == pytest.approx(np.tan(0.3))
    raw = ph.simulate_raw(ph.Spectrometer.typical(), ph.antithetic(sample), noise_std=0.0)
    assert raw.shape == (2, 2, 2, tb.N_SAMPLES) and raw.dtype == np.uint16


# --------------------------------------------------------------------------- toolbox details


def test_gradient_surface_on_a_step() -> None:
    """For a clean step the gradient method returns the first bright sample (1-based)."""
    nz = 300
    vol = np.full((5, 4, nz), 20.0)
    steps = np.array([[40, 41, 42, 43]] * 5)  # 1-based first bright sample
    for ix in np.ndindex(steps.shape):
        vol[ix][steps[ix] - 1 :] = 60.0
    np.testing.assert_array_equal(tb.gradient_surface(vol), steps)
    vol[:] = 0.0  # nothing above 0.01: surface 1
    np.testing.assert_array_equal(tb.gradient_surface(vol), np.ones((5, 4)))


def test_enface_windows_and_reducers() -> None:
    nz = 100
    z = np.arange(1, nz + 1, dtype=float)
    vol = np.broadcast_to(z, (2, 2, nz)).copy()
    surf = np.array([[10, 95], [1, 50]])
    ret = np.ones((2, 2, nz))
    ret[0, 0, 9:] = 1.0 + 0.5 * np.arange(nz - 9)  # R = 1 + 0.5*(z - z1) from z1 = 10
    ret[1, 1, 52] = 0.0  # exact zero: fit on z1..z1+3 only (includes the zero)
    ori = np.zeros((2, 2, nz))
    ori[1, 0, :] = np.where(np.arange(nz) % 2, 89.0, -89.0)
    maps = tb.enface(vol, ret, ori, surf, depth=70, wavelength_um=1.3, z_size_um=2.5)
    assert maps["aip"][0, 0] == pytest.approx(np.mean(np.arange(10, 81)))  # 71 samples
    assert maps["mip"][0, 0] == 80 and maps["mip"][0, 1] == 100  # clamped at nz
    assert maps["aip"][0, 1] == pytest.approx(np.mean(np.arange(95, 101)))
    assert abs(maps["ori"][1, 0]) == pytest.approx(90.0, abs=0.05)  # circular, not arithmetic
    assert maps["biref"][0, 0] == pytest.approx(0.5 / 360 * 1.3 / 2.5)
    assert maps["biref"][0, 1] == pytest.approx(0.0, abs=1e-12)  # flat R
    r = np.array([1.0, 1.0, 1.0, 0.0])
    expected = np.polyfit(2.5 * np.arange(4), r / 360 * 1.3, 1)[0]
    assert maps["biref"][1, 1] == pytest.approx(expected)


def test_nyquist_quirk_is_tiny(tile: Tile) -> None:
    """ZeroPadBuffer halves A-line 0's Nyquist bin; via the median it reaches every A-line."""
    with_q = tb.spectral_to_jones(tile.raw, tile.mu, tile.wave, tile.dispersion, True)[0]
    without = tb.spectral_to_jones(tile.raw, tile.mu, tile.wave, tile.dispersion, False)[0]
    assert not np.array_equal(with_q, without)
    assert np.abs(with_q - without).max() < 1e-3 * np.abs(without).max()
