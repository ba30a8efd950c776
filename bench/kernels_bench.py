"""Throughput of the kernel chain (spectral -> complex -> PS products -> en-face).

Compares, in one run and on the same synthetic tile, this implementation (``kernels``) with a
straightforward NumPy version of the same chain written below (per-row ``np.interp``
resampling, ``np.fft.fft`` in float64, ``np.arctan``/``np.angle`` products). On a machine with
CuPy and a GPU it also reports the GPU figure and the fraction of the pinned host->device copy
bound (bandwidth / bytes per dual-channel A-line) it reaches.

    python bench/kernels_bench.py --bscans 64 --alines 350 --samples 2048
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy.ndimage import median_filter, uniform_filter1d

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import (
    ProcessingParams,
    SpectrometerCalibration,
    gpu_available,
    process_tile,
)
from kernels.resampling import fractional_pixels


# --------------------------------------------------------------------------- reference chain
def straightforward_tile(raw: np.ndarray, cal: SpectrometerCalibration, p: ProcessingParams):
    """The same chain written plainly: loops over B-lines, channels and A-lines."""
    n_b, _, n_a, n_s = raw.shape
    first, stop = cal.fft_bins
    pix = np.arange(n_s, dtype=np.float64)
    targets = [fractional_pixels(cal, ch) for ch in (0, 1)]
    window = np.hanning(n_s + 1)[:-1] if cal.window == "hann" else np.ones(n_s)
    correction = window * np.exp(-1j * cal.dispersion_phase_rad())
    jones = np.empty((n_b, 2, n_a, stop - first), dtype=np.complex128)
    for b in range(n_b):
        for ch in range(2):
            frame = raw[b, ch].astype(np.float64)
            frame -= frame.mean(axis=0)
            resampled = np.empty_like(frame)
            for a in range(n_a):
                resampled[a] = np.interp(targets[ch], pix, frame[a])
            spectrum = np.fft.fft(resampled * correction, axis=-1)
            jones[b, ch] = spectrum[:, first:stop]
    j1, j2 = jones[:, 0], jones[:, 1]
    db = 10 * np.log10(np.abs(j1) ** 2 + np.abs(j2) ** 2)
    ret = np.degrees(np.arctan(np.abs(j1) / np.abs(j2)))
    phi = cal.orientation_sign * (np.angle(j1) - np.angle(j2))
    phi += 2 * np.radians(cal.orientation_offset_deg)
    phi = (phi + np.pi) % (2 * np.pi) - np.pi
    ori = np.degrees(phi) / 2

    # surface: threshold crossing on a smoothed profile, then a lateral median
    w = p.surface_smoothing
    smooth = uniform_filter1d(db, w, axis=-1)
    floor = uniform_filter1d(db, 31, axis=-1).min(axis=-1)
    peak = smooth.max(axis=-1)
    level = floor + np.maximum(p.surface_threshold_db, 0.5 * (peak - floor))
    surface = median_filter(np.argmax(smooth > level[..., None], axis=-1), 3, mode="nearest")

    # en-face over [surface + offset, surface + offset + thickness)
    z = surface[..., None] + p.enface_offset + np.arange(p.enface_thickness)
    valid = z < db.shape[-1]
    z = np.minimum(z, db.shape[-1] - 1)
    win = {k: np.take_along_axis(v, z, -1) for k, v in (("db", db), ("r", ret), ("o", ori))}
    aip = np.nanmean(np.where(valid, win["db"], np.nan), -1)
    mip = np.nanmax(np.where(valid, win["db"], np.nan), -1)
    ret_map = np.nanmean(np.where(valid, win["r"], np.nan), -1)
    doubled = np.exp(2j * np.radians(win["o"])) * valid
    ori_map = np.degrees(np.angle(doubled.sum(-1))) / 2
    t = np.arange(p.enface_thickness)
    biref = np.polyfit(t, win["r"].reshape(-1, t.size).T, 1)[0]
    return db, ret, ori, aip, mip, ret_map, ori_map, biref.reshape(aip.shape), surface


# --------------------------------------------------------------------------- helpers
def synthetic_tile(n_b: int, n_a: int, n_s: int, seed: int = 0) -> np.ndarray:
    """Random spectra around a realistic DC level (timing only; content does not matter)."""
    rng = np.random.default_rng(seed)
    dc = 15000 + 5000 * np.hanning(n_s)
    noise = rng.integers(-800, 800, size=(n_b, 2, n_a, n_s), dtype=np.int32)
    return (dc + noise).astype(np.uint16)


def best_time(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(best wall time, process CPU time of that run) over ``repeats`` runs."""
    best = (math.inf, math.inf)
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        best = min(best, (wall, cpu))
    return best


def pinned_h2d_bandwidth(nbytes: int = 256 << 20) -> float:
    """Host(pinned)->device copy bandwidth in bytes/s."""
    import cupy
    import cupyx

    host = cupyx.empty_pinned((nbytes,), np.uint8)
    host[:] = 1
    dev = cupy.empty((nbytes,), cupy.uint8)
    dev.set(host)
    cupy.cuda.Device().synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        dev.set(host)
    cupy.cuda.Device().synchronize()
    return 5 * nbytes / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bscans", type=int, default=64)
    ap.add_argument("--alines", type=int, default=350)
    ap.add_argument("--samples", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--base-repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--skip-baseline", action="store_true")
    args = ap.parse_args()

    raw = synthetic_tile(args.bscans, args.alines, args.samples)
    n_alines = args.bscans * args.alines
    params = ProcessingParams(enface_offset=5, enface_thickness=70)
    rows: list[tuple[str, tuple[float, float]]] = []
    cal_lin = SpectrometerCalibration.from_band(
        args.samples, interpolation="linear", dispersion_coeffs=(120.0, 60.0)
    )
    cal_cub = cal_lin.replace(interpolation="cubic")

    base = None
    agreement = ""
    if not args.skip_baseline:
        ref = straightforward_tile(raw[:2], cal_lin, params)
        got = process_tile(raw[:2], cal_lin, params)
        d_db = np.abs(ref[0] - got.db).max()
        d_ret = np.abs(ref[1] - got.retardance).max()
        agreement = f"same chain check (2 B-lines): max |d dB| {d_db:.1e}, |d ret| {d_ret:.1e} deg"
        timing = best_time(lambda: straightforward_tile(raw, cal_lin, params), args.base_repeats)
        rows.append(("straightforward NumPy (interp loop, fft f64), 1 thread", timing))
        base = timing[0]
    for cal, label in ((cal_lin, "linear"), (cal_cub, "cubic")):
        for threads in sorted({1, args.threads}):
            p = ProcessingParams(enface_offset=5, enface_thickness=70, cpu_threads=threads)
            process_tile(raw[:2], cal, p)  # warm-up: tables, FFT plans
            timing = best_time(lambda cal=cal, p=p: process_tile(raw, cal, p), args.repeats)
            rows.append((f"kernels CPU {label}, {threads} thread(s)", timing))
    gpu_note = "no CuPy/GPU present: GPU rows skipped"
    if gpu_available():
        import cupy

        from kernels import get_xp

        xp = get_xp("gpu")
        p = ProcessingParams(enface_offset=5, enface_thickness=70)
        process_tile(raw[:2], cal_cub, p, xp=xp)
        cupy.cuda.Device().synchronize()
        timing = best_time(lambda: process_tile(raw, cal_cub, p, xp=xp), args.repeats)
        rows.append(("kernels GPU cubic (host tile in, host products out)", timing))
        dt = timing[0]
        bw = pinned_h2d_bandwidth()
        bound = bw / (2 * 2 * args.samples)  # uint16, two channels
        gpu_note = (
            f"pinned H2D {bw / 1e9:.1f} GB/s -> copy bound {bound:,.0f} A-lines/s; "
            f"GPU reaches {n_alines / dt / bound:.0%} of it"
        )

    print(f"tile: {args.bscans} B-lines x {args.alines} A-lines x {args.samples} samples x 2 ch")
    head = ("implementation", "wall [s]", "cpu [s]", "A-lines/s", "vs base")
    print(f"{head[0]:58s} {head[1]:>9s} {head[2]:>8s} {head[3]:>11s} {head[4]:>8s}")
    for name, (dt, cpu) in rows:
        ratio = f"{base / dt:7.1f}x" if base else "      -"
        print(f"{name:58s} {dt:9.3f} {cpu:8.2f} {n_alines / dt:11,.0f} {ratio}")
    print(agreement)
    print(gpu_note)


if __name__ == "__main__":
    main()
