"""NumPy vs CuPy parity of the kernel chain, on two backends: "fake" (tests/fakecupy.py, CuPy's
rules on the CPU, always run) and "cuda" (CuPy on a GPU: gpu-marked, skipped unless CuPy and
a CUDA device are present)."""

from __future__ import annotations

import numpy as np
import pytest

from kernels import (
    ProcessingParams,
    SpectrometerCalibration,
    depth_um_of,
    get_xp,
    gpu_available,
    process_tile,
    ps_amplitudes,
    simulate_spectra,
    spectra_to_complex,
)
from kernels.pipeline import bytes_per_bscan

REAL_GPU = gpu_available()  # before any test installs the fake


@pytest.fixture(
    params=[
        "fake",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not REAL_GPU, reason="needs CuPy and a CUDA GPU"),
            ],
        ),
    ]
)
def cp(request):
    """The device array module: the fake CuPy, or CuPy on a real GPU."""
    if request.param == "fake":
        request.getfixturevalue("fake_cupy")
    return get_xp("gpu")


CAL = SpectrometerCalibration.from_band(
    512, dispersion_coeffs=(150.0, 300.0), orientation_offset_deg=12.0
)


def _tile(n_b=6, n_a=32, thickness=120, seed=0):
    rng = np.random.default_rng(seed)
    b, a = np.indices((n_b, n_a))
    surface = 40.0 + 5.0 * np.sin(a / 4.0) + b
    shape = (n_b, n_a, thickness)
    bins = surface[..., None] + np.arange(thickness)
    amps = ps_amplitudes(
        300.0 * rng.rayleigh(1.0, shape),
        np.radians(0.5 * np.arange(thickness)),
        np.radians(20.0),
        CAL,
        rng.uniform(0, 2 * np.pi, shape),
    )
    return simulate_spectra(depth_um_of(bins, CAL), amps, CAL)


def _circ(a, b):
    return np.abs((a - b + 90.0) % 180.0 - 90.0)


def test_spectra_to_complex_parity(cp):
    raw = _tile()
    host = spectra_to_complex(raw, CAL)
    dev = spectra_to_complex(cp.asarray(raw), CAL)
    assert isinstance(dev, cp.ndarray) and dev.dtype == cp.complex64
    err = np.abs(dev.get() - host).max() / np.abs(host).max()
    assert err < 1e-5


@pytest.mark.parametrize("volumes_fit_on_device", [True, False])
def test_process_tile_parity(cp, volumes_fit_on_device):
    raw = _tile()
    n_b, _, n_a, _ = raw.shape
    vol_bytes = 3 * 4 * n_b * n_a * CAL.n_depth
    budget = (
        2 * vol_bytes + 2 * bytes_per_bscan(n_a, CAL)
        if volumes_fit_on_device
        else (
            vol_bytes  # too small to keep the volumes: they stream back to pinned host memory
        )
    )
    params = ProcessingParams(enface_offset=5, enface_thickness=60, gpu_memory_budget_bytes=budget)
    cpu = process_tile(raw, CAL, params)
    gpu = process_tile(raw, CAL, params, xp=cp)  # host tile streamed in several batches
    assert gpu.device.startswith("gpu:") and cpu.device == "cpu"
    assert np.allclose(gpu.db, cpu.db, rtol=1e-5, atol=2e-3)
    strong = cpu.db > np.median(cpu.db) + 10.0  # phase-defined voxels
    assert np.abs(gpu.retardance - cpu.retardance)[strong].max() < 0.02
    assert _circ(gpu.orientation, cpu.orientation)[strong].max() < 0.05
    assert np.mean(gpu.surface == cpu.surface) > 0.98
    same = gpu.surface == cpu.surface
    for name in ("aip", "mip", "enface_retardance", "birefringence"):
        assert np.allclose(getattr(gpu, name)[same], getattr(cpu, name)[same], atol=1e-2), name
    assert _circ(gpu.enface_orientation, cpu.enface_orientation)[same].max() < 0.05


def test_device_input_stays_on_device(cp):
    raw = _tile(n_b=3)
    out = process_tile(cp.asarray(raw), CAL, ProcessingParams(batch_bscans=2))
    ref = process_tile(raw, CAL, ProcessingParams(batch_bscans=2))
    assert isinstance(out.db, np.ndarray)
    assert np.allclose(out.db, ref.db, rtol=1e-5, atol=2e-3)
