"""Kernel maths against the forward model's ground truth (NumPy backend)."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from kernels import (
    ProcessingParams,
    SpectrometerCalibration,
    dc_background,
    depth_bin_of,
    depth_um_of,
    device_name,
    enface_products,
    get_xp,
    gpu_available,
    gradient_surface_candidates,
    median_filter_2d,
    process_tile,
    ps_amplitudes,
    ps_products,
    resampling_table,
    simulate_spectra,
    slope_to_delta_n,
    spectra_to_complex,
    surface_candidates,
    to_host,
)
from kernels.fastmath import atan_ratio_of_powers, half_angle
from kernels.resampling import fractional_pixels, resample

pytestmark = pytest.mark.unit

CAL = SpectrometerCalibration.from_band(512)  # 1220-1385 nm, bowed, 232 depth bins
TAU = 2.0 * math.pi


# ----------------------------------------------------------------------------- helpers
def simulate_bins(bins, amps, cal, **kwargs):
    """simulate_spectra with reflector depths given as expected output bins."""
    return simulate_spectra(depth_um_of(np.asarray(bins, float), cal), amps, cal, **kwargs)


def random_phases(rng, shape):
    return rng.uniform(0.0, TAU, shape)


def mean_power(jones):
    """Depth profile of |J1|^2 + |J2|^2 averaged over B-lines and A-lines."""
    return (np.abs(jones.astype(np.complex128)) ** 2).sum(axis=1).mean(axis=(0, 1))


def subbin_peak(profile, near, half_width=4):
    """Peak position near ``near`` refined by a parabola through log power (Gaussian PSF)."""
    lo = max(1, round(near) - half_width)
    hi = min(len(profile) - 1, round(near) + half_width + 1)
    i = lo + int(np.argmax(profile[lo:hi]))
    a, b, c = np.log(profile[i - 1 : i + 2])
    return i + 0.5 * (a - c) / (a - 2 * b + c)


def fwhm(profile, near, half_width=40):
    """Full width at half maximum (bins) of the peak near ``near``."""
    lo = max(0, int(near) - half_width)
    seg = profile[lo : int(near) + half_width + 1]
    i = int(np.argmax(seg))
    half = seg[i] / 2
    left = i
    while left > 0 and seg[left - 1] > half:
        left -= 1
    right = i
    while right < len(seg) - 1 and seg[right + 1] > half:
        right += 1
    x_left = left - (seg[left] - half) / (seg[left] - seg[left - 1])
    x_right = right + (seg[right] - half) / (seg[right] - seg[right + 1])
    return x_right - x_left


def circular_diff_deg(a, b, period=180.0):
    return np.abs((np.asarray(a) - np.asarray(b) + period / 2) % period - period / 2)


def tissue_sample(rng, surface_bins, thickness_bins, slope_deg_per_bin=0.0, theta_deg=30.0):
    """Dense scatterers (one per bin) from the surface down, decaying, with linear retardance."""
    n = thickness_bins
    shape = (*surface_bins.shape, n)
    bins = surface_bins[..., None] + np.arange(n) + rng.uniform(-0.3, 0.3, shape)
    reflect = 400.0 * np.exp(-np.arange(n) / 150.0) * rng.rayleigh(1.0, shape)
    delta = np.radians(slope_deg_per_bin * np.arange(n))
    amps = ps_amplitudes(reflect, delta, np.radians(theta_deg), CAL, random_phases(rng, shape))
    return bins, amps


# ----------------------------------------------------------------------------- backend
def test_backend_cpu():
    xp = get_xp("cpu")
    assert xp is np
    assert device_name(xp) == "cpu"
    a = np.arange(3)
    assert to_host(a) is a
    with pytest.raises(ValueError, match="device"):
        get_xp("tpu")
    if not gpu_available():
        assert get_xp("auto") is np
        with pytest.raises(RuntimeError, match="GPU"):
            get_xp("gpu")


# ----------------------------------------------------------------------------- calibration
def test_calibration_grid_and_validation():
    k0, k1 = CAL.pixel_wavenumbers(0)[[0, -1]]
    grid = CAL.k_grid()
    assert grid[0] == pytest.approx(k0) and grid[-1] == pytest.approx(k1)
    assert not CAL.k_ascending  # wavelength grows with pixel index
    assert np.allclose(np.diff(grid), -CAL.k_step)
    assert CAL.n_depth == 256 - 24
    assert CAL.axial_pixel_um() == pytest.approx(math.pi / (512 * CAL.k_step))
    assert resampling_table(CAL) is resampling_table(CAL, np)  # cached per (cal, device)
    assert CAL.replace(depth_range=(10, 100)).n_depth == 90
    for bad in (
        {"n_samples": 511},
        {"interpolation": "nearest"},
        {"window": "blackman"},
        {"orientation_sign": 0},
        {"depth_range": (5, 5)},
        {"autocorr_bins": 300},
        {"dispersion_phase": (0.0,) * 10},
        {"wavelength_poly_nm": (1300.0, 0.1, -1e-3)},  # not monotonic over the pixels
    ):
        with pytest.raises(ValueError):
            CAL.replace(**bad)


@pytest.mark.parametrize("kind, degree", [("linear", 1), ("cubic", 3)])
def test_resampling_reproduces_polynomials(kind, degree):
    """Linear interpolation is exact for lines, 4-point cubic for cubics (away from edges)."""
    cal = CAL.replace(interpolation=kind)
    pos = fractional_pixels(cal, 0)
    x = np.arange(cal.n_samples, dtype=np.float64) ** degree
    tab = resampling_table(cal)
    y = resample(x[None, :].astype(np.float32), tab.indices[0], tab.weights[0], np)[0]
    inner = slice(2, -2)
    assert np.allclose(y[inner], pos[inner] ** degree, rtol=1e-5, atol=1e-3)
    assert not np.allclose(y[inner], pos[inner] ** (degree + 1), rtol=1e-3)


# ----------------------------------------------------------------------------- spectral
@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"interpolation": "linear"},
        {"flip_z": True},
        {"depth_range": (5, 220)},
        {
            "wavelength_poly_nm": SpectrometerCalibration.from_band(
                512, 1385, 1220
            ).wavelength_poly_nm
        },
    ],
    ids=["cubic", "linear", "flip_z", "depth_range", "k_ascending"],
)
def test_reflector_depth_within_half_bin(changes):
    cal = CAL.replace(dispersion_coeffs=(150.0, 400.0), **changes)
    rng = np.random.default_rng(1)
    truth = np.array([12.3, 57.8, 120.5, 170.2])  # output bins in this calibration's layout
    depth_um = depth_um_of(truth, cal)
    assert np.allclose(depth_bin_of(depth_um, cal), truth)
    amps = ps_amplitudes(500.0, 0.6, 0.3, cal, random_phases(rng, (1, 16, 4)))
    raw = simulate_spectra(np.broadcast_to(depth_um, (1, 16, 4)), amps, cal)
    profile = mean_power(spectra_to_complex(raw, cal))
    for t in truth:
        assert abs(subbin_peak(profile, t) - t) < 0.5


def test_dispersion_compensation_restores_psf_width():
    coeffs = (300.0, 1000.0)
    disp = CAL.replace(dispersion_coeffs=coeffs)
    rng = np.random.default_rng(2)
    depths = np.array([30.0, 110.0, 190.0])
    amps = ps_amplitudes(500.0, 0.5, 0.0, CAL, random_phases(rng, (1, 8, 3)))
    bins = np.broadcast_to(depths, (1, 8, 3))
    reference = mean_power(spectra_to_complex(simulate_bins(bins, amps, CAL), CAL))
    dispersed = simulate_bins(bins, amps, disp)  # mismatch (a2, a3) baked into the spectra
    compensated = mean_power(spectra_to_complex(dispersed, disp))
    uncompensated = mean_power(spectra_to_complex(dispersed, CAL))
    for d in depths:
        ref_w = fwhm(reference, d)
        assert 1.5 < ref_w < 6.0
        assert abs(fwhm(compensated, d) / ref_w - 1.0) < 0.10
        assert fwhm(uncompensated, d) > 1.5 * ref_w  # the test would notice no compensation


def test_cubic_resampling_beats_linear_far_from_zero_depth():
    """Deep fringes (~70% of Nyquist): cubic keeps more signal and leaks less than linear."""
    rng = np.random.default_rng(3)
    deep = 140.0
    amps = ps_amplitudes(800.0, 0.5, 0.0, CAL, random_phases(rng, (1, 8, 1)))
    raw = simulate_bins(np.full((1, 8, 1), deep), amps, CAL, noise_std=0.0)
    peak_db, leakage_db = {}, {}
    for kind in ("linear", "cubic"):
        profile = mean_power(spectra_to_complex(raw, CAL.replace(interpolation=kind)))
        assert abs(subbin_peak(profile, deep) - deep) < 0.5  # both still find the reflector
        peak = round(deep)
        outside = np.r_[profile[: peak - 8], profile[peak + 9 :]].sum()
        peak_db[kind] = 10 * np.log10(profile[peak - 1 : peak + 2].sum())
        leakage_db[kind] = 10 * np.log10(outside / profile.sum())
    assert peak_db["cubic"] > peak_db["linear"] + 1.0, peak_db
    assert leakage_db["cubic"] < leakage_db["linear"] - 3.0, leakage_db


# ----------------------------------------------------------------------------- PS products
def _reversed_ch2_poly(cal, shift_nm=0.4):
    """Channel 2 stored in reverse pixel order with a slightly shifted wavelength map."""
    poly = np.polynomial.Polynomial(cal.wavelength_poly_nm)
    rev = poly(np.polynomial.Polynomial([cal.n_samples - 1.0, -1.0])) + shift_nm
    return tuple(rev.coef)


def test_retardance_and_orientation_recovered():
    cal = CAL.replace(
        dispersion_coeffs=(150.0, 300.0),
        orientation_offset_deg=17.0,
        orientation_sign=-1,
    )
    cal = cal.replace(wavelength_poly_nm_ch2=_reversed_ch2_poly(cal))
    rng = np.random.default_rng(4)
    n_b, n_a = 2, 64
    # distinct depths over the first ~60% of the range; deeper, resampling leakage of the
    # mirror term (near-Nyquist fringes) degrades the polarisation state by a few degrees
    bins = np.stack([rng.permutation(np.arange(15, 143, 2))[:n_a] for _ in range(n_b)])
    bins = bins[..., None].astype(float)
    delta = rng.uniform(3.0, 87.0, (n_b, n_a, 1))
    theta = rng.uniform(-90.0, 90.0, (n_b, n_a, 1))
    amps = ps_amplitudes(
        500.0, np.radians(delta), np.radians(theta), cal, random_phases(rng, delta.shape)
    )
    raw = simulate_bins(bins, amps, cal)
    vols = ps_products(spectra_to_complex(raw, cal), cal)
    b, a = np.indices((n_b, n_a))
    z = bins[..., 0].astype(int)
    assert np.abs(vols.retardance[b, a, z] - delta[..., 0]).max() < 2.0
    # the axis is ill-defined as one channel vanishes (delta -> 0 or 90 deg): judge it where
    # both channels carry at least sin(10 deg) of the amplitude
    conditioned = (delta[..., 0] > 10.0) & (delta[..., 0] < 80.0)
    ori_err = circular_diff_deg(vols.orientation[b, a, z], theta[..., 0])
    assert ori_err[conditioned].max() < 2.0
    assert np.median(ori_err) < 0.5
    assert vols.orientation.min() >= -90.0 and vols.orientation.max() < 90.0
    assert vols.retardance.min() >= 0.0 and vols.retardance.max() <= 90.0


def test_ps_products_follow_toolbox_formulas():
    rng = np.random.default_rng(5)
    shape = (3, 2, 40, 50)
    jones = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
    jones[0, 1, 0, :3] = [0, -1, 1j]  # J2 zero, phase differences of +-180 deg
    jones[0, 0, 0, :3] = [1, 1, -1j]
    defined = np.ones((3, 40, 50), bool)
    defined[0, 0, 0] = False  # orientation is undefined where a channel vanishes
    cal = CAL.replace(orientation_offset_deg=-25.0, orientation_sign=-1)
    vols = ps_products(jones, cal)
    j1, j2 = jones[:, 0].astype(np.complex128), jones[:, 1].astype(np.complex128)
    db = 10 * np.log10(np.abs(j1) ** 2 + np.abs(j2) ** 2)
    ret = np.degrees(np.arctan2(np.abs(j1), np.abs(j2)))
    phi = -(np.angle(j1) - np.angle(j2)) + 2 * np.radians(-25.0)
    ori = np.degrees((phi + np.pi) % TAU - np.pi) / 2
    assert vols.db.dtype == np.float32 and vols.db.shape == (3, 40, 50)
    assert np.allclose(vols.db, db, atol=1e-4)
    assert np.allclose(vols.retardance, ret, atol=1e-4)
    assert circular_diff_deg(vols.orientation, ori)[defined].max() < 1e-3


def test_fast_arctangents_match_numpy():
    rng = np.random.default_rng(6)
    w = (rng.standard_normal(10000) + 1j * rng.standard_normal(10000)).astype(np.complex64)
    w[:5] = [0, 1, -1, 1j, -1j]
    got = half_angle(w.real, w.imag, np.abs(w), np, degrees=True)
    ref = np.degrees(np.angle(w.astype(np.complex128))) / 2
    assert got[2] == -90.0  # +-180 deg phase maps to the bottom of [-90, 90)
    assert got.min() >= -90.0 and got.max() < 90.0
    assert circular_diff_deg(got, ref).max() < 1e-4
    p1, p2 = np.abs(w[:5000]) ** 2, np.abs(w[5000:]) ** 2
    p1[0], p2[:2] = 0.0, 0.0
    ret = atan_ratio_of_powers(p1, p2, np, degrees=True)
    assert np.abs(ret - np.degrees(np.arctan2(np.sqrt(p1), np.sqrt(p2)))).max() < 1e-4


# ----------------------------------------------------------------------------- en-face
def test_enface_products_match_direct_loops():
    rng = np.random.default_rng(7)
    n_b, n_a, n_z = 3, 5, 40
    db = rng.uniform(40, 90, (n_b, n_a, n_z)).astype(np.float32)
    ret = rng.uniform(0, 90, (n_b, n_a, n_z)).astype(np.float32)
    ori = rng.uniform(-90, 90, (n_b, n_a, n_z)).astype(np.float32)
    surface = rng.integers(0, n_z, (n_b, n_a)).astype(np.int32)
    surface[0, 0] = n_z + 5  # window entirely below the volume
    offset, thick = 2, 10
    maps = enface_products(db, ret, ori, surface, offset, thick)
    for b in range(n_b):
        for a in range(n_a):
            z0 = surface[b, a] + offset
            sl = slice(z0, min(n_z, z0 + thick))
            if z0 >= n_z:
                assert np.isnan(maps.aip[b, a]) and np.isnan(maps.birefringence[b, a])
                continue
            assert maps.aip[b, a] == pytest.approx(db[b, a, sl].mean(), rel=1e-5)
            assert maps.mip[b, a] == db[b, a, sl].max()
            assert maps.retardance[b, a] == pytest.approx(ret[b, a, sl].mean(), rel=1e-5)
            doubled = np.exp(2j * np.radians(ori[b, a, sl].astype(np.float64))).sum()
            want = np.degrees(np.angle(doubled)) / 2
            assert circular_diff_deg(maps.orientation[b, a], want) < 1e-3
            r = ret[b, a, sl]
            if r.size >= 3:
                slope = np.polyfit(np.arange(r.size), r, 1)[0]
                dn = slope_to_delta_n(slope, 1.3, 2.5)  # the defaults: lambda 1.3 um, 2.5 um bins
                assert maps.birefringence[b, a] == pytest.approx(dn, rel=1e-4, abs=1e-7)
            else:
                assert np.isnan(maps.birefringence[b, a])


def test_inclusive_window_matches_the_toolbox_loop():
    """psoct-toolbox's enfaceReduce/fitLinear: z1 = max(1, surf + offset), z2 = min(nz, z1 +
    depth), z1..z2 inclusive; the fit stops at the first exact zero and is 0 below 3 samples."""
    rng = np.random.default_rng(17)
    n_b, n_a, n_z = 3, 6, 40
    db = rng.uniform(40, 90, (n_b, n_a, n_z)).astype(np.float32)
    ret = rng.uniform(1, 90, (n_b, n_a, n_z)).astype(np.float32)
    ori = rng.uniform(-90, 90, (n_b, n_a, n_z)).astype(np.float32)
    surface = rng.integers(0, n_z, (n_b, n_a)).astype(np.int32)
    surface[0, 0], surface[0, 1], surface[0, 2] = n_z + 2, n_z + 1, 0  # 1 and 2 samples; start
    ret[1, 1, surface[1, 1] + 4] = 0.0  # fit stops here
    offset, depth, lam, dz = -3, 10, 1.31, 2.4
    maps = enface_products(
        db,
        ret,
        ori,
        surface,
        offset,
        depth,
        window="inclusive",
        wavelength_um=lam,
        axial_pixel_um=dz,
    )
    for b in range(n_b):
        for a in range(n_a):
            z1 = max(0, surface[b, a] + offset)
            z2 = min(n_z - 1, z1 + depth)
            sl = slice(z1, z2 + 1)
            assert maps.aip[b, a] == pytest.approx(db[b, a, sl].mean(), rel=1e-5)
            assert maps.mip[b, a] == db[b, a, sl].max()
            assert maps.retardance[b, a] == pytest.approx(ret[b, a, sl].mean(), rel=1e-5)
            r = ret[b, a, sl].astype(np.float64)
            zeros = np.flatnonzero(r == 0)
            if zeros.size:
                r = r[: zeros[0] + 1]
            want = np.polyfit(dz * np.arange(r.size), r / 360 * lam, 1)[0] if r.size >= 3 else 0
            assert maps.birefringence[b, a] == pytest.approx(want, rel=1e-4, abs=1e-8)
    assert maps.birefringence[0, 0] == 0.0  # one sample: the toolbox writes 0, not NaN


def test_gradient_surface_matches_a_per_line_transcription():
    """psoct.surface.gradient, written out per A-line with SciPy (sigma 5 truncated at 2 sigma
    with nearest edges = imgaussfilt's 21 taps and replicate padding; conv 'valid')."""
    from scipy.ndimage import gaussian_filter1d

    rng = np.random.default_rng(11)
    n_b, n_a, n_z = 3, 7, 120
    edge = rng.integers(12, 100, (n_b, n_a))
    z = np.arange(n_z)
    db = 40 + 30 * (z >= edge[..., None]) * np.exp(-(z - edge[..., None]).clip(0) / 60.0)
    db = (db + rng.normal(0, 2.0, db.shape)).astype(np.float32)
    db[2, 6, 50:] = 0.0  # a line whose valid length is 50 samples (> 0.01 dB counted)
    got = gradient_surface_candidates(db)
    kernel = np.r_[-np.ones(5) / 5, np.ones(5) / 5]
    for b in range(n_b):
        for a in range(n_a):
            line = db[b, a].astype(np.float64)
            n = int((line > 0.01).sum())
            data = gaussian_filter1d(line[:n], 5.0, mode="nearest", truncate=2.0)
            grad = -np.convolve(data, kernel, mode="valid")
            assert got[b, a] == int(np.argmax(grad)) + 5, (b, a)
    found = np.ones_like(got, bool)
    found[2, 6] = False  # its edge lies past its valid length
    assert abs(got - edge)[found].max() <= 2


def test_circular_mean_wraps_across_plus_minus_90():
    ori = np.array([[[89.0, -89.0, 88.0, -88.0]]], np.float32)
    flat = np.zeros_like(ori)
    maps = enface_products(flat, flat, ori, np.zeros((1, 1), np.int32), 0, 4)
    assert circular_diff_deg(maps.orientation[0, 0], 90.0) < 1e-3  # not the arithmetic 0


def test_delta_n_conversion():
    # 1 deg/bin at 1.3 um and 2.5 um bins: dn = (1/360) * 1.3 / 2.5
    assert slope_to_delta_n(1.0, 1.3, 2.5) == pytest.approx(1.3 / 900.0)
    assert slope_to_delta_n(1.0, 1.3, 2.5, round_trip=True) == pytest.approx(1.3 / 1800.0)


def test_median_filter_removes_isolated_outlier():
    img = np.full((5, 6), 40, np.int32)
    img[2, 3] = 3
    out = median_filter_2d(img, 3)
    assert out.dtype == np.int32 and (out == 40).all()


# ----------------------------------------------------------------------------- pipeline
def _tissue_tile(rng, n_b, n_a, slope=0.45, theta=25.0, thickness=150):
    b, a = np.indices((n_b, n_a))
    surface = 40.0 + 6.0 * np.sin(a / 5.0) + 0.8 * b
    bins, amps = tissue_sample(rng, surface, thickness, slope, theta)
    return surface, bins, amps


def test_layer_surface_and_enface_maps():
    rng = np.random.default_rng(8)
    surface, bins, amps = _tissue_tile(rng, 4, 32)
    # outlier: a bright reflector 25 bins above the surface in one A-line
    extra_bins = np.full((4, 32, 1), 5.0)
    extra_bins[1, 10, 0] = surface[1, 10] - 25
    extra_amps = np.zeros((4, 32, 1, 2), complex)
    extra_amps[1, 10, 0] = [3000.0, 3000.0]
    raw = simulate_bins(
        np.concatenate([bins, extra_bins], -1), np.concatenate([amps, extra_amps], -2), CAL
    )
    params = ProcessingParams(enface_offset=10, enface_thickness=90)
    # measured background: with only 32 A-lines per B-line the per-B-line mean would leave
    # a -15 dB ghost of the neighbours' (shifted) surfaces above each surface
    out = process_tile(raw, CAL, params, background=dc_background(CAL))
    err = out.surface - surface
    assert np.abs(err).max() <= 3.0, err
    candidates = surface_candidates(out.db)
    assert candidates[1, 10] < surface[1, 10] - 15  # the outlier fooled the per-A-line step
    dn = slope_to_delta_n(0.45, params.wavelength_um, params.axial_pixel_um)
    assert abs(np.median(out.birefringence) / dn - 1.0) < 0.05
    assert circular_diff_deg(np.median(out.enface_orientation), 25.0) < 2.0
    window_mean = 0.45 * (params.enface_offset + (params.enface_thickness - 1) / 2)
    assert np.median(out.enface_retardance) == pytest.approx(window_mean, abs=3.0)
    assert (out.mip >= out.aip).all()
    assert out.device == "cpu"
    for vol in (out.db, out.retardance, out.orientation):
        assert vol.shape == (4, 32, CAL.n_depth) and vol.dtype == np.float32


def test_results_independent_of_batching_and_threads():
    rng = np.random.default_rng(9)
    _, bins, amps = _tissue_tile(rng, 5, 16, thickness=60)
    raw = simulate_bins(bins, amps, CAL)
    runs = [
        process_tile(raw, CAL, ProcessingParams(batch_bscans=bs, cpu_threads=th))
        for bs, th in ((1, 1), (2, 2), (5, 1), (3, 4))
    ]
    for other in runs[1:]:
        for name in (
            "db",
            "retardance",
            "orientation",
            "aip",
            "mip",
            "enface_retardance",
            "enface_orientation",
            "birefringence",
            "surface",
        ):
            np.testing.assert_array_equal(getattr(runs[0], name), getattr(other, name), name)
    tile_bg = CAL.replace(background_scope="tile")
    j1 = spectra_to_complex(raw, tile_bg, batch_bscans=1)
    j2 = spectra_to_complex(raw, tile_bg, batch_bscans=4)
    np.testing.assert_array_equal(j1, j2)


def test_estimated_background_equals_removing_the_mean_profile():
    """The chain is linear: subtracting the per-B-line mean spectrum is the same as
    subtracting the mean complex depth profile from a measured-background result."""
    rng = np.random.default_rng(10)
    _, bins, amps = _tissue_tile(rng, 2, 32, thickness=60)
    raw = simulate_bins(bins, amps, CAL)
    measured = spectra_to_complex(raw, CAL, background=dc_background(CAL)[:, None, :])
    estimated = spectra_to_complex(raw, CAL)
    expected = measured - measured.mean(axis=2, keepdims=True)
    assert np.abs(estimated - expected).max() < 1e-4 * np.abs(expected).max()
    tile = spectra_to_complex(raw, CAL.replace(background_scope="tile"))
    expected = measured - measured.mean(axis=(0, 2), keepdims=True)
    assert np.abs(tile - expected).max() < 1e-4 * np.abs(expected).max()


@pytest.mark.parametrize(
    "raw, message",
    [
        (np.zeros((2, 2, 4, 512), np.float32), "uint16"),
        (np.zeros((2, 2, 4, 512), np.int16), "uint16"),
        (np.zeros((2, 4, 512), np.uint16), "shape"),
        (np.zeros((2, 3, 4, 512), np.uint16), "shape"),
        (np.zeros((2, 2, 4, 256), np.uint16), "shape"),
        (np.zeros((0, 2, 4, 512), np.uint16), "at least one"),
        ([[1, 2]], "uint16"),
    ],
)
def test_bad_input_raises_clear_value_error(raw, message):
    with pytest.raises(ValueError, match=message):
        process_tile(raw, CAL)
    with pytest.raises(ValueError, match=message):
        spectra_to_complex(raw, CAL)


def test_bad_background_raises_clear_value_error():
    raw = np.zeros((1, 2, 4, 512), np.uint16)
    with pytest.raises(ValueError, match="background"):
        process_tile(raw, CAL, background=np.zeros((2, 100)))


def test_forward_model_is_fast_and_quantised():
    rng = np.random.default_rng(11)
    bins = rng.uniform(10, 220, (64, 64, 1))
    amps = ps_amplitudes(300.0, 0.4, 0.1, CAL, random_phases(rng, bins.shape))
    t0 = time.perf_counter()
    raw = simulate_bins(bins, amps, CAL)
    elapsed = time.perf_counter() - t0
    assert raw.dtype == np.uint16 and raw.shape == (64, 2, 64, 512)
    assert elapsed < 1.0, f"64x64x512 simulation took {elapsed:.2f} s"


def test_complex_tiles_full_and_cropped_depth():
    """Complex (Jones) tiles enter after the spectral step: full-depth tiles give the same
    volumes as their spectra; a cropped tile (the acquisition PC's focus crop) keeps its own
    depth and equals that stretch of the full products."""
    rng = np.random.default_rng(21)
    cal = CAL.replace(dispersion_coeffs=(100.0, 50.0))
    amps = ps_amplitudes(500.0, 0.5, 0.2, cal, random_phases(rng, (2, 8, 3)))
    raw = simulate_bins(np.broadcast_to([30.0, 90.0, 150.0], (2, 8, 3)), amps, cal)
    full_jones = spectra_to_complex(raw, cal.replace(flip_z=False, depth_range=None))
    from_raw = process_tile(raw, cal, ProcessingParams())
    from_jones = process_tile(full_jones, cal, ProcessingParams())
    np.testing.assert_allclose(from_jones.db, from_raw.db, rtol=1e-5, atol=1e-4)
    cropped = np.ascontiguousarray(full_jones[..., 40:200])
    part = process_tile(cropped, cal, ProcessingParams())
    assert part.db.shape == (2, 8, 160)
    np.testing.assert_allclose(part.db, from_raw.db[..., 40:200], rtol=1e-5, atol=1e-4)
    flipped = process_tile(cropped, cal.replace(flip_z=True), ProcessingParams())
    np.testing.assert_allclose(flipped.db, part.db[..., ::-1], rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="a depth range needs complex tiles of every FFT bin"):
        process_tile(cropped, cal.replace(depth_range=(0, 100)), ProcessingParams())


def test_streamed_tile_from_a_file_equals_in_memory_for_any_block(tmp_path):
    """kernels.streaming: a read-only memmap of the raw file, blocks of 1, 3 and 7 B-lines,
    volumes handed to a sink block by block: the same products as the whole tile in memory,
    and never more than two blocks waiting for their maps."""
    from kernels.streaming import _Finisher, stream_tile

    rng = np.random.default_rng(31)
    _, bins, amps = _tissue_tile(rng, 9, 16)
    raw = simulate_bins(bins, amps, CAL)
    path = tmp_path / "tile.raw"
    raw.tofile(path)
    mapped = np.memmap(path, dtype=np.uint16, mode="r", shape=raw.shape)
    params = ProcessingParams(enface_offset=5, enface_thickness=40)
    whole = process_tile(raw, CAL, params)
    held = []
    original = _Finisher.add

    def counting(self, *args):
        original(self, *args)
        held.append(len(self.pending))

    for block in (1, 3, 7):
        vols = {
            name: np.full(whole.db.shape, np.nan, np.float32)
            for name in ("db", "retardance", "orientation")
        }

        def sink(b0, b1, block_vols, vols=vols):
            for name, values in block_vols.items():
                vols[name][b0:b1] = values

        _Finisher.add = counting
        try:
            maps = stream_tile(mapped, CAL, params, sink, block_bscans=block)
        finally:
            _Finisher.add = original
        np.testing.assert_array_equal(vols["db"], whole.db)
        np.testing.assert_array_equal(vols["orientation"], whole.orientation)
        np.testing.assert_array_equal(maps.surface, whole.surface)
        for name in ("aip", "mip", "enface_retardance", "enface_orientation", "birefringence"):
            np.testing.assert_array_equal(getattr(maps, name), getattr(whole, name), name)
        assert max(held) <= 2, (block, max(held))
        held.clear()
