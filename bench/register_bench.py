"""Seconds per slice of the register stage at real mosaic sizes, and its accuracy.

Per mosaic size (``--tiles``: tiles per side; 350 px tiles with 20% overlap, so 20 tiles is
a 5,670 px square mosaic at 10 um pixels) two synthetic slices are written as OME-Zarr
mosaics (five en-face channels, the ``stitch`` layout). Slice 0's texture is band-limited
1/f noise; slice 1 shows the same sample under a known rotation and shift (default 1.2 deg,
(2.4, -2.9) px, the simulator's range) with 20 % new texture, noise and a missing corner tile.
The stage's own code path (:meth:`services.stages.register.Register._register`, no NATS) then
registers slice 1 to slice 0 and writes its plane of the volume; timed per repeat:

* ``estimate``: reading the two registration channels + :func:`kernels.register.register_slices`;
* ``resample + write``: reading the five channels, resampling them into slice 0's frame
  (bilinear, NaN-aware, orientation circular) and writing the plane at every pyramid level;
* ``total``: the whole slice (what a `slice_stitched` event costs the stage), wall clock;
  ``CPU``: the process CPU time of the same (all threads; steadier on a shared machine);
  ``peak GB``: peak of Python/NumPy allocations during one more (untimed) run (tracemalloc).

Errors: largest displacement error over the mosaic (px) and rotation error (deg) against the
known transform. Data generation and slice 0 (the reference plane) are not timed.

    .venv/bin/python bench/register_bench.py --tiles 5 10 20 --repeats 2
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import machine_header, run_sizes
from kernels.register import decompose, similarity_matrix
from services.core.config import Config, Roots, StageSettings
from services.io.layout import mosaic_path
from services.io.omezarr import write_omezarr
from services.stages.register import Register

TILE, OVERLAP, PX_UM = 350, 0.2, 10.0


def texture(shape: tuple[int, int], rng: np.random.Generator, fmax: float = 0.2) -> np.ndarray:
    """Unit-variance 1/f noise, band-limited below ``fmax`` cycles/px."""
    spec = np.fft.rfft2(rng.normal(size=shape).astype(np.float32))
    fy = np.fft.fftfreq(shape[0]).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(shape[1]).astype(np.float32)[None, :]
    f = np.hypot(fy, fx)
    spec *= np.where(f > 0, 1.0 / np.maximum(f, 1.0 / max(shape)), 0.0) * np.exp(-((f / fmax) ** 2))
    out = np.fft.irfft2(spec, s=shape).astype(np.float32)
    return (out - out.mean()) / out.std()


def make_slices(n: int, rotation: float, shift: tuple[float, float], seed: int = 0):
    """Two (5, n, n) en-face stacks: moving[p] shows the sample point of fixed[M p]."""
    rng = np.random.default_rng(seed)
    pad = 64
    base = texture((n + 2 * pad, n + 2 * pad), rng)
    extra = texture((n, n), rng)
    truth = similarity_matrix(rotation, shift, 1.0, ((n - 1) / 2, (n - 1) / 2))
    fixed = base[pad:-pad, pad:-pad]
    g = np.array([[1.0, 0.0, pad], [0.0, 1.0, pad], [0.0, 0.0, 1.0]]) @ truth
    moving = ndimage.affine_transform(base, g[:2, :2], offset=g[:2, 2], output_shape=(n, n))
    moving = 0.98 * moving + 0.2 * extra + 0.1 * rng.normal(size=(n, n)).astype(np.float32)

    def products(aip: np.ndarray, hole: bool) -> dict[str, np.ndarray]:
        out = {
            "aip": 60 + 5 * aip,
            "mip": 80 + 6 * aip,
            "retardance": 40 + 10 * np.tanh(aip),
            "orientation": np.mod(30 * aip + 90, 180) - 90,
            "birefringence": 1 + 0.2 * aip,
        }
        if hole:
            for v in out.values():
                v[:TILE, -TILE:] = np.nan  # a missing corner tile
        return {k: v.astype(np.float32) for k, v in out.items()}

    return products(fixed, False), products(moving, True), truth


class _Log:
    """Collects the stage's log calls (for the estimate time)."""

    def __init__(self) -> None:
        self.records: list[tuple[str, dict]] = []

    def info(self, event: str, **kw) -> None:
        self.records.append((event, kw))

    warning = info


def bench_size(tiles: int, args: argparse.Namespace, root: Path) -> dict:
    n = round(tiles * TILE * (1 - OVERLAP) + TILE * OVERLAP)
    fixed, moving, truth = make_slices(n, args.rotation, tuple(args.shift))
    config = Config(roots=Roots(raw=root / "raw", work=root / "work", output=root / "out"))
    acq = f"bench{tiles}"
    state: dict[int, dict] = {}
    for k, images in enumerate((fixed, moving)):
        rel = mosaic_path(acq, k, 0)
        write_omezarr(config.roots.resolve("output", rel), images, pixel_size_um=(PX_UM,) * 2)
        state[k] = {"stitched": {"path": rel, "inputs": f"in{k}"}}
    settings = StageSettings(**{**Register.defaults, "options": {"threads": args.threads}})
    stage = Register(config, settings)
    log = _Log()
    state[0]["registered"] = stage._register(acq, 0, state, "b0", 200.0, log)
    times, cpus, estimates, rec = [], [], [], {}
    for _ in range(args.repeats):
        log.records.clear()
        t0, c0 = time.perf_counter(), time.process_time()
        rec = stage._register(acq, 1, state, "b1", 200.0, log)
        times.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        done = [kw for ev, kw in log.records if ev == "slice_registered"]
        estimates.append(done[-1]["register_s"])
    tracemalloc.start()  # one more, untimed run for the peak of NumPy allocations
    stage._register(acq, 1, state, "b1", 200.0, log)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    got = np.asarray(rec["pair"])
    yy, xx = np.mgrid[0:n:64, 0:n:64]
    p = np.stack([yy.ravel(), xx.ravel(), np.ones(yy.size)])
    err_px = float(np.hypot(*((got - truth) @ p)[:2]).max())
    err_deg = abs(decompose(got)[0] - decompose(truth)[0])
    best = int(np.argmin(times))
    return {
        "tiles": f"{tiles}x{tiles}",
        "px": f"{n}x{n}",
        "estimate": estimates[best],
        "resample": times[best] - estimates[best],
        "total": times[best],
        "cpu": cpus[best],
        "peak_gb": peak / 1e9,
        "err_px": err_px,
        "err_deg": err_deg,
        "quality": rec["quality"],
        "accepted": rec["accepted"],
    }


def format_table(rows: list[dict]) -> str:
    head = (
        "| mosaic (tiles) | pixels | estimate s | resample + write s | total s/slice "
        "| CPU s/slice | peak GB | max error px | rotation error deg | quality | accepted |"
    )
    lines = [head, "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        lines.append(
            f"| {r['tiles']} | {r['px']} | {r['estimate']:.1f} | {r['resample']:.1f} | "
            f"{r['total']:.1f} | {r['cpu']:.1f} | {r['peak_gb']:.1f} | {r['err_px']:.3f} | "
            f"{r['err_deg']:.4f} | "
            f"{r['quality']:.3f} | {r['accepted']} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--tiles", type=int, nargs="+", default=[5, 10, 20], help="tiles per side")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per size (best kept)")
    p.add_argument("--rotation", type=float, default=1.2, help="known rotation, degrees")
    p.add_argument("--shift", type=float, nargs=2, default=[2.4, -2.9], help="known dy dx px")
    p.add_argument("--threads", type=int, default=1, help="resampling threads (stage option)")
    p.add_argument("--tmp", type=Path, default=None, help="scratch directory (default: temp)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(machine_header(threads=args.threads), flush=True)
    rows = run_sizes(args, bench_size)
    print()
    print(format_table(rows))
    rot = math.radians(args.rotation)
    print(f"\nknown transform: rotation {args.rotation} deg ({rot:.4f} rad), shift {args.shift} px")


if __name__ == "__main__":
    main()
