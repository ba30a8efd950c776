"""The kernels' CuPy path on the CPU, through tests/fakecupy.py (no GPU needed).

The fake refuses what CuPy refuses (implicit conversion to NumPy, SciPy on device arrays, host
arrays mixed into device operations), so a host round trip inside the device path fails here;
it counts every host<->device copy, so the tests pin the design's transfers: per block, the
input goes up once (staged through a pinned buffer on the copy stream) and the volumes come
down once (into pinned buffers, on the compute stream) with the block's surface and en-face
maps; per tile, the resampling table and a host background go up once. Nothing else crosses.
Its maths is NumPy's, so the device path must give the NumPy path's results bit for bit.
"""

from __future__ import annotations

from collections import Counter
from functools import cache

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
    to_host,
)
from kernels.backend import array_module, device_key, device_name, is_numpy, resolve_xp
from kernels.streaming import MAPS, VOLUMES, bytes_per_bscan, stream_tile
from tests import fakecupy

pytestmark = pytest.mark.unit

CAL = SpectrometerCalibration.from_band(
    512, dispersion_coeffs=(150.0, 300.0), orientation_offset_deg=12.0
)
TOOLBOX = CAL.replace(
    interpolation="linear",
    window="none",
    background_after="median",
    orientation_wrap="once",
    orientation_sign=-1,
    orientation_offset_deg=100,
)
CONVENTIONS = {
    "tilepipe": (CAL, ProcessingParams(enface_offset=5, enface_thickness=60)),
    "toolbox": (
        TOOLBOX,
        ProcessingParams(surface_method="gradient", enface_window="inclusive"),
    ),
    "toolbox-tile-background": (
        TOOLBOX.replace(background_scope="tile", background="median"),
        ProcessingParams(surface_method="gradient", enface_window="inclusive"),
    ),
}
PRODUCTS = (*VOLUMES, "surface", "aip", "mip", "enface_retardance", "enface_orientation")
PRODUCTS += ("birefringence",)


@cache
def _tile(n_b=6, n_a=24, thickness=120, seed=0):
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
    raw = simulate_spectra(depth_um_of(bins, CAL), amps, CAL)
    raw.flags.writeable = False
    return raw


@cache
def _jones():
    """Full-depth complex tile with short A-lines (zeros: at most 0.01 dB) for the gradient
    surface's valid length: a zero tail, a line of zeros, one with a few zeros inside."""
    jones = spectra_to_complex(_tile(), CAL.replace(depth_range=None))
    jones[1, :, 3, 100:] = 0
    jones[2, :, 5, :] = 0
    jones[4, :, 7, [10, 50, 90]] = 0
    jones.flags.writeable = False
    return jones


def _assert_same(got, want):
    for name in PRODUCTS:
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), name)


def _blocks(n_b, step):
    return [min(n_b, b0 + step) - b0 for b0 in range(0, n_b, step)]


def _check_streamed(ledger, sizes, n_a, n_z, input_tail=None, volumes=True):
    """Transfers of a streamed tile after the per-tile ones: per block of n B-lines, the input
    ``(n, 2, A, *input_tail)`` once (a host input), the volumes ``(n, A, Z)`` once each (with a
    sink), the surface, its unfiltered candidates and the maps ``(n, A)`` once each; uploads
    on the copy stream, downloads on the compute stream, the large copies through pinned
    buffers; nothing else."""
    want = Counter()
    for n in sizes:
        if input_tail is not None:
            want["upload", "set", (n, 2, n_a, *input_tail), True] += 1
        if volumes:
            want["download", "get", (n, n_a, n_z), True] += len(VOLUMES)
        want["download", "get", (n, n_a), False] += 2 + len(MAPS)
    got = Counter((t.direction, t.how, t.shape, t.pinned) for t in ledger.transfers)
    assert got == want
    up = {t.stream for t in ledger.uploads()}
    down = {t.stream for t in ledger.downloads()}
    assert len(down) == 1 and fakecupy.cuda.Stream.null not in down
    if input_tail is not None:
        assert len(up) == 1 and fakecupy.cuda.Stream.null not in up and up != down


def _per_tile(ledger, cal, want_background):
    """Take the per-tile uploads off the ledger: the resampling table (indices, weights, post
    factor) at a spectral tile's first use of ``cal``, and a host background."""
    once = ledger.uploads("asarray")
    background = [t for t in once if t.shape in ((2, 1, cal.n_samples), (2, cal.n_samples))]
    table = sorted(t.shape for t in once if t not in background)
    taps = 2 if cal.interpolation == "linear" else 4
    assert table == [(2, taps, cal.n_samples)] * 2 + [(cal.n_samples,)], once
    assert len(background) == want_background, once
    for t in once:
        ledger.transfers.remove(t)


# ----------------------------------------------------------------------------- the fake itself
def test_backend_finds_the_fake(fake_cupy):
    cp = fake_cupy
    assert gpu_available() and get_xp("gpu") is cp and get_xp("auto") is cp
    dev = cp.asarray(np.arange(6, dtype=np.float32))
    assert array_module(dev) is cp and resolve_xp(None, np.ones(2), dev) is cp
    assert not is_numpy(cp) and device_key(cp) == ("cupy", 0)
    assert device_name(cp) == "gpu:FakeCuPy (NumPy on the CPU)"
    host = to_host(dev * 2)
    assert type(host) is np.ndarray and host.tolist() == [0, 2, 4, 6, 8, 10]
    assert [t.direction for t in cp.ledger.transfers] == ["upload", "download"]


def test_fake_refuses_what_cupy_refuses(fake_cupy):
    """CuPy's rules (cupy/_core/core.pyx): no implicit conversion, host arrays refused as
    operands, NumPy functions dispatched to CuPy's of the same name, results 0-d arrays."""
    import scipy.ndimage
    import scipy.signal

    cp = fake_cupy
    dev = cp.asarray(np.arange(12, dtype=np.float32).reshape(3, 4))
    host = np.ones((3, 4), np.float32)
    cp.ledger.reset()
    for implicit in (
        lambda: np.asarray(dev),
        lambda: np.ascontiguousarray(dev),
        lambda: np.array([dev, dev]),
        lambda: scipy.ndimage.median_filter(dev, 3),
        lambda: scipy.signal.medfilt2d(dev),
    ):
        with pytest.raises(TypeError, match="Implicit conversion to a NumPy array"):
            implicit()
    for mixed in (
        lambda: dev + host,
        lambda: host + dev,
        lambda: dev * np.float32(2) - np.array(1.0),  # 0-d host arrays too
        lambda: cp.where(dev > 0, dev, host),
        lambda: np.maximum(dev, host),
        lambda: np.copyto(host, dev),
        lambda: cp.ascontiguousarray(host),
        lambda: cp.fft.rfft(host),
    ):
        with pytest.raises(TypeError):
            mixed()
    with pytest.raises(ValueError, match=r"non-scalar numpy\.ndarray"):
        dev[0] = host[0]
    with pytest.raises(TypeError, match="no implementation found"):
        np.interp(dev, dev, dev)  # CuPy has interp, the fake not: it is stricter, never laxer
    assert not hasattr(fake_cupy, "interp")
    import cupyx

    assert not hasattr(cupyx, "scipy")
    # what works on CuPy works here, on the device
    med = np.median(dev, axis=0)  # __array_function__ -> cupy.median
    total = dev.sum()
    assert isinstance(med, cp.ndarray) and isinstance(total, cp.ndarray) and total.shape == ()
    assert isinstance(np.float32(2) * dev, cp.ndarray) and isinstance(np.sqrt(dev), cp.ndarray)
    assert not cp.ledger.transfers
    # every copy is explicit and counted
    assert float(total) == 66.0 and bool(dev[0, 1]) and int(dev[2, 3]) == 11
    out = fakecupy.cupyx.empty_pinned((3, 4), np.float32)
    dev.get(out=out)
    with pytest.raises(TypeError):
        dev.get(out=np.empty((3, 4)))
    with pytest.raises(ValueError, match="Shape mismatch"):
        dev.set(host[:2])
    dev.set(host)
    got = [(t.direction, t.how, t.pinned) for t in cp.ledger.transfers]
    assert got == [
        ("download", "float", False),
        ("download", "bool", False),
        ("download", "int", False),
        ("download", "get", True),
        ("upload", "set", False),
    ]


def test_a_host_round_trip_in_the_device_path_fails(fake_cupy, monkeypatch):
    """What the fake is for: SciPy's median filter in place of the xp one breaks the device
    path (it passes on NumPy), and a host copy of the candidates shows in the counts."""
    import scipy.ndimage

    from kernels import streaming

    raw = _tile()
    cal, params = CONVENTIONS["tilepipe"]
    monkeypatch.setattr(
        streaming,
        "median_filter_2d",
        lambda img, size, xp: scipy.ndimage.median_filter(img, size, mode="nearest"),
    )
    process_tile(raw, cal, params)  # NumPy: fine
    with pytest.raises(TypeError, match="Implicit conversion"):
        process_tile(raw, cal, params, xp=fake_cupy)


# ----------------------------------------------------------------------------- process_tile
@pytest.mark.parametrize("on_device", [False, True], ids=["host-input", "device-input"])
@pytest.mark.parametrize("block", [1, 4, None])
@pytest.mark.parametrize("conventions", list(CONVENTIONS))
def test_process_tile_on_the_fake_equals_numpy(fake_cupy, conventions, block, on_device):
    cp = fake_cupy
    cal, params = CONVENTIONS[conventions]
    params = ProcessingParams(**{**params.__dict__, "batch_bscans": block})
    raw = _tile()
    want = process_tile(raw, cal, params)
    source = cp.asarray(raw) if on_device else raw
    cp.ledger.reset()
    got = process_tile(source, cal, params, xp=cp)
    assert got.device == "gpu:FakeCuPy (NumPy on the CPU)" and want.device == "cpu"
    _assert_same(got, want)
    n_b, _, n_a, n_s = raw.shape
    host_background = cal.background_scope == "tile" and not on_device
    _per_tile(cp.ledger, cal, want_background=int(host_background))
    sizes = _blocks(n_b, block or n_b)  # the default budget holds the whole small tile
    _check_streamed(cp.ledger, sizes, n_a, cal.n_depth, None if on_device else (n_s,))


@pytest.mark.parametrize("on_device", [False, True], ids=["host-input", "device-input"])
@pytest.mark.parametrize("crop", [None, (20, 180)], ids=["full-depth", "cropped"])
def test_complex_tiles_on_the_fake_equal_numpy(fake_cupy, crop, on_device):
    cp = fake_cupy
    jones = _jones() if crop is None else np.ascontiguousarray(_jones()[..., slice(*crop)])
    _, _, n_a, n_z = jones.shape
    for conventions in ("tilepipe", "toolbox"):
        cal, params = CONVENTIONS[conventions]
        params = ProcessingParams(**{**params.__dict__, "batch_bscans": 4})
        want = process_tile(jones, cal, params)
        source = cp.asarray(jones) if on_device else jones
        cp.ledger.reset()
        got = process_tile(source, cal, params, xp=cp)
        _assert_same(got, want)
        out_z = cal.n_depth if crop is None else n_z
        _check_streamed(cp.ledger, [4, 2], n_a, out_z, None if on_device else (n_z,))


def test_measured_background_goes_up_once(fake_cupy):
    from kernels import dc_background

    cp = fake_cupy
    raw = _tile()
    cal, params = CONVENTIONS["tilepipe"]
    params = ProcessingParams(**{**params.__dict__, "batch_bscans": 2})
    want = process_tile(raw, cal, params, background=dc_background(cal))
    got = process_tile(raw, cal, params, xp=cp, background=dc_background(cal))
    _assert_same(got, want)
    _per_tile(cp.ledger, cal, want_background=1)
    _check_streamed(cp.ledger, [2, 2, 2], raw.shape[2], cal.n_depth, (cal.n_samples,))


# ----------------------------------------------------------------------------- stream_tile
def test_stream_tile_from_a_memmap_on_the_fake(fake_cupy, tmp_path):
    """A read-only memmap of the raw file through the pinned double buffer, blocks of 1, 3, 7
    and one chosen from the memory budget, volumes to a sink: the NumPy products, the design's
    transfers per block, device memory set by the block and within the budget."""
    cp = fake_cupy
    raw = _tile(n_b=9, n_a=16, seed=3)
    path = tmp_path / "tile.raw"
    raw.tofile(path)
    mapped = np.memmap(path, dtype=np.uint16, mode="r", shape=raw.shape)
    cal, params = CONVENTIONS["tilepipe"]
    want = process_tile(raw, cal, params)
    n_b, _, n_a, n_s = raw.shape
    budget = 2 * 2 * bytes_per_bscan(n_a, cal)  # budget // 2 holds 2 B-lines
    peaks = {}
    stream_tile(mapped[:1], cal, params, xp=cp)  # the resampling table, once
    for block in (1, 3, 7, None):
        got = {name: np.full(want.db.shape, np.nan, np.float32) for name in VOLUMES}

        def sink(b0, b1, vols, got=got):
            assert all(type(v) is np.ndarray for v in vols.values())
            for name, values in vols.items():
                got[name][b0:b1] = values

        cp.ledger.reset()
        p = ProcessingParams(**{**params.__dict__, "gpu_memory_budget_bytes": budget})
        maps = stream_tile(mapped, cal, p, sink, xp=cp, block_bscans=block)
        peaks[block] = cp.ledger.peak_bytes - cp.ledger.live_bytes  # above the cached table
        for name in VOLUMES:
            np.testing.assert_array_equal(got[name], getattr(want, name), name)
        for name in ("surface", "aip", "mip", "enface_retardance", "enface_orientation"):
            np.testing.assert_array_equal(getattr(maps, name), getattr(want, name), name)
        np.testing.assert_array_equal(maps.birefringence, want.birefringence)
        _check_streamed(cp.ledger, _blocks(n_b, block or 2), n_a, cal.n_depth, (n_s,))
    assert peaks[1] < peaks[3] < peaks[7]  # the device holds blocks, not the tile
    assert peaks[None] <= budget
    cp.ledger.reset()
    maps = stream_tile(mapped, cal, params, xp=cp, block_bscans=4)  # no sink: no volumes
    np.testing.assert_array_equal(maps.surface, want.surface)
    _check_streamed(cp.ledger, [4, 4, 1], n_a, cal.n_depth, (n_s,), volumes=False)
