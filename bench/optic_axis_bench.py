"""3-D optic-axis fit: the vectorised solver vs the toolbox's per-pixel Nelder-Mead.

psoct-toolbox's ``thruplane_registration`` runs ``fminsearch`` on every pixel of a slice. This
script builds a synthetic registered pair of mosaics (a smooth random fibre field projected
with :func:`kernels.project`, 1% / 0.5 deg noise as in tests/test_optic_axis.py, ~15% low-dn
background), times :func:`kernels.solve_optic_axis` on the whole map, times the transcribed
per-pixel Nelder-Mead (``tests.test_optic_axis.toolbox_fit_pixel``, scipy) on a random sample
of pixels and extrapolates it to the map, and prints one table: wall and CPU seconds,
pixels/s, and how many times faster than Nelder-Mead on the same CPU. With CuPy and a CUDA
device it adds a GPU row (host -> device -> host copies included). It also reports the
agreement with Nelder-Mead on the sample and the error against the ground truth.

    python bench/optic_axis_bench.py --size 5700 --nm-pixels 300

Memory: about 80 bytes per pixel (inputs, truth and outputs in float32), 2.6 GB at 5700 px.
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import device_name, get_xp, gpu_available, project, solve_optic_axis, to_host
from tests.test_optic_axis import (
    NOISE_B_ABS,
    NOISE_B_REL,
    NOISE_O_DEG,
    toolbox_fit_pixel,
)

GAMMA = -15.0


def smooth_field(n: int, rng: np.random.Generator, modes: int = 12) -> np.ndarray:
    """Unit-variance sum of random plane waves (wavelengths 60 .. 600 px), float32."""
    k = rng.uniform(1.0 / 600.0, 1.0 / 60.0, modes)
    ang = rng.uniform(0.0, 2 * math.pi, modes)
    kx, ky = (2 * math.pi * k * np.cos(ang)), (2 * math.pi * k * np.sin(ang))
    phase = rng.uniform(0.0, 2 * math.pi, modes)
    out = np.empty((n, n), np.float32)
    cols = np.arange(n, dtype=np.float64)
    for r0 in range(0, n, 256):
        rows = np.arange(r0, min(r0 + 256, n), dtype=np.float64)[:, None]
        acc = np.zeros((rows.size, n))
        for m in range(modes):
            acc += np.cos(kx[m] * cols[None, :] + ky[m] * rows + phase[m])
        out[r0 : r0 + rows.size] = acc * math.sqrt(2.0 / modes)
    return out


def synthetic_pair(n: int, seed: int) -> tuple[list[np.ndarray], tuple[np.ndarray, ...]]:
    """Registered noisy maps (b_n, o_n, b_t, o_t), float32, and the truth: theta, alpha, dn
    and where both views are above the noise (apparent b > 10 x the noise floor)."""
    rng = np.random.default_rng(seed)
    theta = (100.0 * smooth_field(n, rng) + 90.0) % 180.0 - 90.0
    alpha = np.clip(35.0 * smooth_field(n, rng), -60.0, 60.0)
    dn = 1e-4 + 5e-4 / (1.0 + np.exp(-smooth_field(n, rng)))
    dn = np.where(smooth_field(n, rng) < -1.0, 1e-6, dn).astype(np.float32)
    maps = [np.empty((n, n), np.float32) for _ in range(4)]
    above = np.ones((n, n), bool)
    for r0 in range(0, n, 256):
        rows = slice(r0, min(r0 + 256, n))
        pairs = project(theta[rows], alpha[rows], dn[rows], GAMMA)
        for i, (b, o) in enumerate(pairs):
            above[rows] &= b > 10 * NOISE_B_ABS
            sigma_b = NOISE_B_REL * b + NOISE_B_ABS
            sigma_o = np.minimum(NOISE_O_DEG + np.degrees(NOISE_B_ABS / (2 * b + 1e-12)), 90.0)
            maps[2 * i][rows] = b + sigma_b * rng.standard_normal(b.shape)
            maps[2 * i + 1][rows] = o + sigma_o * rng.standard_normal(b.shape)
    return maps, (theta, alpha, dn, above)


def time_call(fn, sync=None) -> tuple[object, float, float]:
    """Result, wall seconds, CPU seconds (this process, all threads)."""
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    if sync is not None:
        sync()
    return out, time.perf_counter() - w0, time.process_time() - c0


def nelder_mead_sample(maps: list[np.ndarray], idx: np.ndarray) -> tuple[dict, float, float]:
    """The transcribed toolbox fit on the pixels ``idx`` (flat indices)."""
    flat = [m.reshape(-1)[idx].astype(np.float64) for m in maps]

    def run() -> dict:
        pixels = zip(*flat, strict=True)
        fits = [toolbox_fit_pixel(bn, bt, on, ot, GAMMA) for bn, on, bt, ot in pixels]
        return {k: np.array([f[k] for f in fits]) for k in fits[0]}

    out, wall, cpu = time_call(run)
    return out, wall, cpu  # type: ignore[return-value]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=2048, help="map side in pixels (lab: ~5700)")
    ap.add_argument("--nm-pixels", type=int, default=200, help="Nelder-Mead sample size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=None, help="pixels per batch (default auto)")
    args = ap.parse_args()
    n = args.size
    npx = n * n

    t0 = time.perf_counter()
    maps, (theta, alpha, dn, above) = synthetic_pair(n, args.seed)
    print(f"synthetic {n} x {n} pair ({npx / 1e6:.1f} Mpx) in {time.perf_counter() - t0:.1f} s")

    fit, wall_cpu, cpu_cpu = time_call(lambda: solve_optic_axis(*maps, GAMMA, chunk=args.chunk))
    rows = [("vectorised, NumPy (cpu)", npx, wall_cpu, cpu_cpu)]

    rng = np.random.default_rng(args.seed + 1)
    idx = rng.choice(npx, size=min(args.nm_pixels, npx), replace=False)
    ref, wall_nm, cpu_nm = nelder_mead_sample(maps, idx)
    per_px_wall, per_px_cpu = wall_nm / idx.size, cpu_nm / idx.size
    rows.insert(
        0,
        (
            f"Nelder-Mead per pixel (scipy; {idx.size} px timed, x {npx / idx.size:.0f})",
            npx,
            per_px_wall * npx,
            per_px_cpu * npx,
        ),
    )

    if gpu_available():
        xp = get_xp("gpu")
        sync = xp.cuda.Device().synchronize
        small = [xp.asarray(m[:64, :64]) for m in maps]
        solve_optic_axis(*small, GAMMA)  # compile kernels, warm the memory pool
        sync()

        def on_gpu():
            dev = solve_optic_axis(*(xp.asarray(m) for m in maps), GAMMA, chunk=args.chunk)
            return to_host(dev.theta_deg), to_host(dev.alpha_deg), to_host(dev.delta_n)

        _, wall_gpu, cpu_gpu = time_call(on_gpu, sync)
        rows.append((f"vectorised, CuPy ({device_name(xp)})", npx, wall_gpu, cpu_gpu))

    nm_wall = rows[0][2]
    print()
    print("| method | pixels | wall s | CPU s | Mpx/s (wall) | x faster than NM (wall) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, pixels, wall, cpu in rows:
        print(
            f"| {name} | {pixels:,} | {wall:,.1f} | {cpu:,.1f} | {pixels / wall / 1e6:.3g} "
            f"| {nm_wall / wall:,.0f} |"
        )
    print(f"\nNelder-Mead: {per_px_wall * 1e3:.2f} ms/px wall, {per_px_cpu * 1e3:.2f} ms/px CPU")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")

    # agreement with the toolbox's fit on the sample (its angle conventions)
    sample = [m.reshape(-1)[idx] for m in maps]
    tb = solve_optic_axis(*sample, GAMMA, angles="toolbox")
    ok = ref["converged"] & above.reshape(-1)[idx]
    d_theta = np.abs((tb.theta_deg - ref["theta_deg"] + 90.0) % 180.0 - 90.0)[ok]
    d_alpha = np.abs(tb.alpha_deg - ref["alpha_deg"])[ok]
    d_dn = np.abs(tb.delta_n / ref["biref"] - 1)[ok]
    print(
        f"vs Nelder-Mead on the {ok.sum()} sampled px above the noise where it converged "
        f"({ref['converged'].sum()} of {idx.size} converged): max |d theta| "
        f"{d_theta.max():.3f} deg, max |d alpha| {d_alpha.max():.3f} deg, "
        f"max |d dn| {100 * d_dn.max():.2f}%"
    )
    worse = tb.cost > ref["cost"] * (1 + 1e-4) + 1e-22
    stuck = ref["cost"] > tb.cost * (1 + 1e-4) + 1e-22
    print(
        f"  objective: vectorised higher on {worse.sum()} px, Nelder-Mead higher on "
        f"{stuck.sum()} px ({(stuck & ~above.reshape(-1)[idx]).sum()} of them background)"
    )

    # accuracy against the truth where both views are above the noise
    d = fit.theta_deg - theta
    e_theta = np.abs((d + 90.0) % 180.0 - 90.0)[above]
    e_alpha = np.abs(np.where(np.abs(d) > 90.0, -fit.alpha_deg, fit.alpha_deg) - alpha)[above]
    e_dn = np.abs(fit.delta_n / dn - 1)[above]
    print(f"vs truth on {above.mean():.0%} of the map (above the noise):")
    for name, e, unit in (("theta", e_theta, "deg"), ("alpha", e_alpha, "deg"), ("dn", e_dn, "")):
        scale = 100.0 if name == "dn" else 1.0
        unit = unit or "%"
        print(
            f"  {name}: median {scale * np.median(e):.2f} {unit}, "
            f"p95 {scale * np.percentile(e, 95):.2f} {unit}, max {scale * e.max():.1f} {unit}"
        )


if __name__ == "__main__":
    main()
