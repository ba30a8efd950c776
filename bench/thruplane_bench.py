"""Seconds per slice of the register stage's thru-plane step at real mosaic sizes.

Per mosaic size (``--tiles``: normal tiles per side, 350 px tiles with 20 % overlap, so 20
tiles is a 5,670 px square mosaic at 10 um pixels) a synthetic slice is written as two
OME-Zarr mosaics in the ``stitch`` layout (``aip``, ``orientation``, ``birefringence``,
``mask``): a normal one and a tilted one (``--tilted-width`` of the normal width, 80 % by
default) that sees a smooth random fibre field (azimuth, inclination +-50 deg, delta-n with a
1/f texture) projected with :func:`kernels.project` through the tilted beam (gamma -15 deg)
and through a known affine view (``TILTED_VIEW`` of the simulator: 3 % stretch, shear,
shift), 2 % / 0.5 deg noise. The stage's own code path
(:func:`services.stages.thruplane.compute_axis`, no NATS) then registers, resamples, fits
and writes the slice's axis products; timed once per size:

* ``register``: smoothing and :func:`kernels.register.register_slices` (affine, log
  birefringence, coarse 1024 px / refine 2048 px levels);
* ``resample``: the tilted maps into the normal frame (bilinear, orientation as doubled angles);
* ``fit``: :func:`kernels.solve_optic_axis` on the pixels inside both masks (NumPy, or CuPy
  with ``--device gpu``), with the smoothing of both maps on their common support;
* ``products``: previews and channels; ``read + write``: reading the two mosaics and writing
  the 19-channel multiscale OME-Zarr (the rest of ``total``);
* ``total``: the whole slice, wall clock; ``CPU``: process CPU time (all threads);
  ``peak GB``: the process's peak resident memory so far.

Accuracy: largest displacement error of the tilted -> normal transform over the tilted mosaic
(px) and the median / 95th-percentile azimuth and inclination errors (deg) on the fitted
pixels against the truth. Data generation and the input mosaics' writing are not timed.

    .venv/bin/python bench/thruplane_bench.py --tiles 5 10 20
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import machine_header, run_sizes
from kernels.optic_axis import project
from kernels.register import warp_image
from services.io.omezarr import open_level, write_omezarr
from services.local.simulate import TILTED_VIEW
from services.stages.register import Mosaic
from services.stages.thruplane import AxisOptions, compute_axis

TILE, OVERLAP, PX_UM, GAMMA = 350, 0.2, 10.0, -15.0


def smooth(shape: tuple[int, int], rng: np.random.Generator, wavelength_px: float) -> np.ndarray:
    """Unit-variance Gaussian random field with features of about ``wavelength_px``."""
    spec = np.fft.rfft2(rng.normal(size=shape).astype(np.float32))
    fy = np.fft.fftfreq(shape[0]).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(shape[1]).astype(np.float32)[None, :]
    spec *= np.exp(-((np.hypot(fy, fx) * wavelength_px) ** 2))
    out = np.fft.irfft2(spec, s=shape).astype(np.float32)
    return (out - out.mean()) / out.std()


def texture(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Unit-variance 1/f noise between ~15 and ~60 px (the fibre texture of delta-n)."""
    spec = np.fft.rfft2(rng.normal(size=shape).astype(np.float32))
    fy = np.fft.fftfreq(shape[0]).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(shape[1]).astype(np.float32)[None, :]
    f = np.hypot(fy, fx)
    spec *= np.where(f > 1 / 60, 1.0 / np.maximum(f, 1e-6), 0.0) * np.exp(-((f * 15) ** 2))
    out = np.fft.irfft2(spec, s=shape).astype(np.float32)
    return (out - out.mean()) / out.std()


def tilted_matrix() -> np.ndarray:
    """Tilted pixel -> normal pixel of the simulator's TILTED_VIEW."""
    ayy, ayx, axy, axx, by, bx = TILTED_VIEW
    return np.array([[ayy, ayx, by / PX_UM], [axy, axx, bx / PX_UM], [0.0, 0.0, 1.0]])


def make_slice(n: int, width: int, seed: int = 0):
    """(normal maps, tilted maps, truth) for an n x n normal and an n x width tilted mosaic."""
    rng = np.random.default_rng(seed)
    theta = (100.0 * smooth((n, n), rng, 600.0) + 90.0) % 180.0 - 90.0
    alpha = np.clip(35.0 * smooth((n, n), rng, 600.0), -50.0, 50.0)
    dn = (4e-4 * np.exp(0.35 * texture((n, n), rng))).astype(np.float32)
    aip = (60.0 + 5.0 * texture((n, n), rng)).astype(np.float32)
    # the tilted view: field values at T q for tilted pixel q (out[q] = src[T q])
    inv = np.linalg.inv(tilted_matrix())
    shape_t = (n, width)
    t_theta = warp_image(theta, inv, shape_t, axial=True, threads=None)
    t_alpha, t_dn, t_aip = (warp_image(a, inv, shape_t, threads=None) for a in (alpha, dn, aip))
    views = []
    for th, al, d, a, tilted in (
        (theta, alpha, dn, aip, False),
        (t_theta, t_alpha, t_dn, t_aip, True),
    ):
        maps = {"aip": a, "birefringence": None, "orientation": None, "mask": None}
        b = np.empty(a.shape, np.float32)
        o = np.empty(a.shape, np.float32)
        for r0 in range(0, a.shape[0], 512):
            rows = slice(r0, min(r0 + 512, a.shape[0]))
            normal_view, tilted_view = project(th[rows], al[rows], d[rows], GAMMA)
            seen = tilted_view if tilted else normal_view
            noise = rng.standard_normal((2, *seen.birefringence.shape))
            b[rows] = seen.birefringence * (1.0 + 0.02 * noise[0])
            o[rows] = (-seen.orientation_deg + 0.5 * noise[1] + 90.0) % 180.0 - 90.0
        maps.update(birefringence=b, orientation=o, mask=np.isfinite(a).astype(np.float32))
        maps["mask"][~np.isfinite(a)] = np.nan
        views.append(maps)
    return views[0], views[1], {"azimuth": theta, "inclination": alpha}


def write_mosaic(path: Path, maps: dict, tilted: bool) -> None:
    write_omezarr(
        path,
        {k: maps[k] for k in ("aip", "orientation", "birefringence", "mask")},
        pixel_size_um=(PX_UM, PX_UM),
        attributes={
            "mosaic": int(tilted),
            "illumination": "tilted" if tilted else "normal",
            "tilt_deg": GAMMA if tilted else 0.0,
        },
    )


def bench_size(tiles: int, args: argparse.Namespace, root: Path) -> dict:
    n = round(tiles * TILE * (1 - OVERLAP) + TILE * OVERLAP)
    width = round(n * args.tilted_width)
    t0 = time.perf_counter()
    normal, tilted, truth = make_slice(n, width, args.seed)
    paths = {False: root / "m0.ome.zarr", True: root / "m1.ome.zarr"}
    write_mosaic(paths[False], normal, False)
    write_mosaic(paths[True], tilted, True)
    del normal, tilted
    print(f"# {n} px: data in {time.perf_counter() - t0:.0f} s", flush=True)
    options = AxisOptions(device=args.device)
    w0, c0 = time.perf_counter(), time.process_time()
    rec = compute_axis(
        "bench",
        0,
        Mosaic.open(paths[False]),
        Mosaic.open(paths[True]),
        1,
        options,
        "b",
        {},
        root / "axis.ome.zarr",
        "bench/axis.ome.zarr",
        args.threads,
    )
    total, cpu = time.perf_counter() - w0, time.process_time() - c0
    fig = rec["figures"]
    got = np.asarray(rec["transform"])
    yy, xx = np.mgrid[0:n:64, 0:width:64]
    p = np.stack([yy.ravel(), xx.ravel(), np.ones(yy.size)])
    err_px = float(np.hypot(*((got - tilted_matrix()) @ p)[:2]).max())
    level = open_level(root / "axis.ome.zarr", 0)
    fitted = np.asarray(level[18]) > 0.5  # mask
    fitted = ndimage.binary_erosion(fitted, iterations=4)
    d = np.asarray(level[2]) - truth["azimuth"]
    e_theta = np.abs((d + 90.0) % 180.0 - 90.0)[fitted]
    alpha = np.where(np.abs(d) > 90.0, -np.asarray(level[1]), np.asarray(level[1]))
    e_alpha = np.abs(alpha - truth["inclination"])[fitted]
    inner = fig["register_s"] + fig["resample_s"] + fig["smooth_s"] + fig["fit_s"]
    inner += fig["products_s"]
    return {
        "tiles": f"{tiles}x{tiles}",
        "px": f"{n}x{n} + {n}x{width}",
        "register": fig["register_s"],
        "resample": fig["resample_s"],
        "fit": fig["fit_s"] + fig["smooth_s"],
        "products": fig["products_s"],
        "io": total - inner,
        "total": total,
        "cpu": cpu,
        "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "err_px": err_px,
        "theta": (float(np.median(e_theta)), float(np.percentile(e_theta, 95))),
        "alpha": (float(np.median(e_alpha)), float(np.percentile(e_alpha, 95))),
        "quality": rec["quality"],
        "accepted": rec["accepted"],
        "fitted_mpx": fig["fitted_px"] / 1e6,
    }


def format_table(rows: list[dict]) -> str:
    head = (
        "| mosaic (tiles) | pixels (normal + tilted) | register s | resample s | fit s "
        "| products s | read + write s | total s/slice | CPU s | peak RSS GB | fitted Mpx "
        "| transform error px | azimuth error deg (median / p95) "
        "| inclination error deg (median / p95) | quality |"
    )
    lines = [head, "| --- | --- |" + " ---: |" * 13]
    for r in rows:
        lines.append(
            f"| {r['tiles']} | {r['px']} | {r['register']:.1f} | {r['resample']:.1f} | "
            f"{r['fit']:.1f} | {r['products']:.1f} | {r['io']:.1f} | {r['total']:.1f} | "
            f"{r['cpu']:.1f} | {r['peak_gb']:.1f} | {r['fitted_mpx']:.1f} | {r['err_px']:.3f} | "
            f"{r['theta'][0]:.2f} / {r['theta'][1]:.2f} | "
            f"{r['alpha'][0]:.2f} / {r['alpha'][1]:.2f} | {r['quality']:.3f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--tiles", type=int, nargs="+", default=[5, 10, 20], help="tiles per side")
    p.add_argument("--tilted-width", type=float, default=0.8, help="tilted / normal width")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="resampling")
    p.add_argument("--device", default="cpu", choices=("cpu", "gpu", "auto"), help="the fit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tmp", type=Path, default=None, help="scratch directory (default: temp)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(machine_header(device=args.device, threads=args.threads), flush=True)
    rows = run_sizes(args, bench_size)
    print()
    print(format_table(rows))
    a = TILTED_VIEW
    print(
        f"\nknown tilted -> normal view: A = [[{a[0]}, {a[1]}], [{a[2]}, {a[3]}]], "
        f"b = ({a[4] / PX_UM}, {a[5] / PX_UM}) px; gamma {GAMMA} deg"
    )
    print("angle errors over the fitted pixels more than 4 px inside the mask")


if __name__ == "__main__":
    main()
