"""Stitching accuracy and speed: this stitcher vs ASHLAR, m2stitch and multiview-stitcher.

All tools get the same mosaics (:mod:`bench.stitch_data`: tiles cut from a real image with
known sub-pixel positions, stage jitter, vignetting, per-tile gain and noise) and the same
nominal (stage) positions, and return tile positions ``(y, x)`` in pixels. Reported per tool
and overlap: mean / max position error after removing the best global translation, the share
of neighbour pairs the tool rejected (as the tool itself reports it), and wall seconds.

    python bench/stitch_bench.py --tiles 10 --tile-size 128 --overlaps 10 15 20

Each tool runs in its own Python process (same mosaics: same seed). Timing: from tiles in
memory to positions, including building each tool's input objects; excluding imports
(ASHLAR's JVM start) and one untimed warm-up run on a 3 x 3 mosaic (caches, lazy imports).
Best of ``--repeats`` (runs over 30 s are not repeated). ``--threads N`` sets the
OpenBLAS/OpenMP/MKL thread count of every tool's process (default: library defaults; the
dask pool of multiview-stitcher is not limited).

How each tool is driven (its defaults unless stated):

* ``tilepipe``: :func:`kernels.stitch.align_lattice` + :func:`kernels.stitch.solve_positions`.
  Rejected: pairs not ``accepted`` by the solver.
* ``ASHLAR``: ``ashlar.reg.EdgeAligner`` on an in-memory ``Metadata``/``Reader`` pair (no
  files, pixel size 1 so its ``max_shift=15`` um is 15 px), ``run()`` (error threshold from
  random strips, pair registration, spanning tree, linear model). Run twice: ``filter_sigma=0``
  (its default) and ``filter_sigma=2``. Rejected: pairs whose error it set to infinity
  (above its threshold or beyond ``max_shift``).
* ``m2stitch``: ``stitch_images(stack, rows, cols, position_initial_guess=nominal,
  row_col_transpose=False)``, other settings default. Tiles are mean-subtracted first: its NCC
  divides by ``|a| |b|`` without removing the mean, so on our bright-field tiles every pair
  scores < 0.1 and it aborts ("no good top pair"). Rejected: pairs with ``valid3`` False
  (translations it replaced by its stage-model estimate). Positions are integers.
* ``multiview-stitcher``: one ``msim`` per tile (``get_sim_from_array`` with the nominal
  translation, no pyramid), ``registration.register`` with default pairing, pruning,
  ``phase_correlation_registration`` and ``global_optimization``, under
  ``dask.config.set(scheduler="threads")`` (else it spawns processes to build the overlap
  graph). Positions: the registered affine applied to each tile's origin. Rejected: pairs
  dropped by the global optimisation (not in ``used_edges``).
* ``stage only``: the nominal positions (what no registration gives), for scale.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # m2stitch progress bars (read at tqdm import)

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import cpu_model
from bench.stitch_data import LatticeMosaic, make_mosaic, position_errors
from kernels.stitch import align_lattice, solve_positions

# A tool: mosaic -> (positions (n, 2) y/x px, rejected share or None when not reported)
Tool = Callable[[LatticeMosaic], tuple[np.ndarray, float | None]]


# --------------------------------------------------------------------------- tools
def run_tilepipe(m: LatticeMosaic) -> tuple[np.ndarray, float | None]:
    rows, cols = m.shape
    pairs = align_lattice(m.tiles, m.nominal_yx, rows, cols)
    layout = solve_positions(m.nominal_yx, pairs)
    return layout.positions_yx, float(1.0 - layout.accepted.mean())


def run_stage_only(m: LatticeMosaic) -> tuple[np.ndarray, float | None]:
    return m.nominal_yx.copy(), None


def make_ashlar(filter_sigma: float) -> Tool:
    from ashlar import reg  # starts a JVM (Bio-Formats) on import

    class _Metadata(reg.Metadata):
        def __init__(self, m: LatticeMosaic) -> None:
            self._m = m

        @property
        def _num_images(self) -> int:
            return len(self._m.tiles)

        @property
        def num_channels(self) -> int:
            return 1

        @property
        def pixel_size(self) -> float:
            return 1.0

        @property
        def pixel_dtype(self) -> np.dtype:
            return np.dtype(np.float32)

        def tile_position(self, i: int) -> np.ndarray:
            return self._m.nominal_yx[i]  # (y, x), pixels (pixel_size 1)

        def tile_size(self, i: int) -> np.ndarray:
            return np.array(self._m.tiles[i].shape)

    class _Reader(reg.Reader):
        def __init__(self, m: LatticeMosaic) -> None:
            self.metadata = _Metadata(m)
            self._m = m

        def read(self, series: int, c: int) -> np.ndarray:
            return self._m.tiles[series]

    def run(m: LatticeMosaic) -> tuple[np.ndarray, float | None]:
        aligner = reg.EdgeAligner(
            _Reader(m), channel=0, filter_sigma=filter_sigma, do_make_thumbnail=False
        )
        aligner.run()
        errors = np.array([err for _, err in aligner._cache.values()])
        return np.asarray(aligner.positions, float), float(np.isinf(errors).mean())

    return run


def make_m2stitch() -> Tool:
    import m2stitch

    def run(m: LatticeMosaic) -> tuple[np.ndarray, float | None]:
        rows, cols = np.divmod(np.arange(len(m.tiles)), m.shape[1])
        stack = m.stack
        stack = stack - stack.mean(axis=(1, 2), keepdims=True)
        grid, _ = m2stitch.stitch_images(
            stack,
            rows=list(rows),
            cols=list(cols),
            position_initial_guess=m.nominal_yx,
            row_col_transpose=False,
            full_output=True,
        )
        pos = grid[["y_pos", "x_pos"]].to_numpy(float)
        valid = []
        for d in ("top", "left"):
            has = grid[d].notna().to_numpy()
            valid.append(grid[f"{d}_valid3"].to_numpy()[has].astype(bool))
        v = np.concatenate(valid)
        return pos, float(1.0 - v.mean())

    return run


def make_multiview_stitcher() -> Tool:
    import dask
    from multiview_stitcher import msi_utils, registration
    from multiview_stitcher import spatial_image_utils as si_utils

    def run(m: LatticeMosaic) -> tuple[np.ndarray, float | None]:
        msims = []
        for tile, p in zip(m.tiles, m.nominal_yx, strict=True):
            sim = si_utils.get_sim_from_array(
                tile,
                dims=["y", "x"],
                scale={"y": 1.0, "x": 1.0},
                translation={"y": float(p[0]), "x": float(p[1])},
                transform_key="stage",
            )
            msims.append(msi_utils.get_msim_from_sim(sim, scale_factors=[]))
        with dask.config.set(scheduler="threads"):
            out = registration.register(
                msims,
                transform_key="stage",
                reg_channel_index=0,
                new_transform_key="registered",
                return_dict=True,
            )
        pos = []
        for msim in msims:
            affine = np.asarray(msi_utils.get_transform_from_msim(msim, "registered")).squeeze()
            sim = msi_utils.get_sim_from_msim(msim)
            origin = np.array([float(sim.coords["y"][0]), float(sim.coords["x"][0]), 1.0])
            pos.append((affine @ origin)[:2])
        n_edges = out["pairwise_registration"]["graph"].number_of_edges()
        used = out["groupwise_resolution"]["metrics"]["used_edges"]
        n_used = len(next(iter(used.values()))) if used else 0
        return np.array(pos), (1.0 - n_used / n_edges) if n_edges else None

    return run


TOOLS: dict[str, Callable[[], Tool]] = {
    "tilepipe": lambda: run_tilepipe,
    "ASHLAR (filter_sigma=0, default)": lambda: make_ashlar(0.0),
    "ASHLAR (filter_sigma=2)": lambda: make_ashlar(2.0),
    "m2stitch": make_m2stitch,
    "multiview-stitcher": make_multiview_stitcher,
    "stage only (no registration)": lambda: run_stage_only,
}


# --------------------------------------------------------------------------- harness
NO_REPEAT_S = 30.0
THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass
class Row:
    overlap: float
    tool: str
    mean_px: float = math.nan
    max_px: float = math.nan
    rejected: str = "n/a"
    seconds: float = math.nan
    status: str = ""  # "" or why there are no numbers


def _short(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {msg[:140]}"


def _timed(tool: Tool, m: LatticeMosaic, repeats: int) -> tuple[np.ndarray, float | None, float]:
    """Best of ``repeats`` runs (a run over ``NO_REPEAT_S`` is not repeated)."""
    best = math.inf
    out: tuple[np.ndarray, float | None] = (np.empty((0, 2)), None)
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = tool(m)
        best = min(best, time.perf_counter() - t0)
        if best > NO_REPEAT_S:
            break
    return out[0], out[1], best


def _mosaic_kw(args: argparse.Namespace) -> dict:
    return dict(
        tile_size=args.tile_size,
        jitter_px=args.jitter,
        noise=args.noise,
        vignetting=args.vignetting,
        seed=args.seed,
    )


def worker(name: str, args: argparse.Namespace) -> None:
    """Run one tool on every overlap in this process; one ``ROW {json}`` line per overlap."""
    kw = _mosaic_kw(args)
    t0 = time.perf_counter()
    status = ""
    tool: Tool | None = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tool = TOOLS[name]()
    except ImportError as exc:
        status = f"not installable: {_short(exc)}"
    except Exception as exc:  # imports, but cannot start here
        status = f"failed to start: {_short(exc)}"
    if tool is not None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tool(make_mosaic(3, 3, overlap=0.15, **{**kw, "seed": 12345}))  # untimed
            print(f"# {name}: import + warm-up {time.perf_counter() - t0:.1f} s", flush=True)
        except Exception as exc:  # e.g. too few pairs on 3 x 3; the timed runs still go ahead
            print(f"# {name}: warm-up failed ({_short(exc)})", flush=True)
    for ov in args.overlaps:
        row = Row(ov, name, status=status)
        if tool is not None:
            m = make_mosaic(args.tiles, args.tiles, overlap=ov, **kw)
            try:
                pos, rej, secs = _timed(tool, m, args.repeats)
                err = position_errors(pos, m.truth_yx)
                row.mean_px, row.max_px, row.seconds = float(err.mean()), float(err.max()), secs
                row.rejected = "n/a" if rej is None else f"{100 * rej:.1f} %"
            except Exception as exc:
                row.status = f"failed: {_short(exc)}"
        print("ROW " + json.dumps(asdict(row)), flush=True)


def run_bench(args: argparse.Namespace, argv: list[str]) -> list[Row]:
    """Each tool in its own process: ASHLAR's in-process JVM has crashed later multithreaded
    OpenBLAS calls (SIGSEGV in NumPy matmul) here, and imports/thread pools must not leak
    between tools."""
    rows: list[Row] = []
    for name in args.tools:
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", name]
        env = dict(os.environ)
        if args.threads:
            env.update(dict.fromkeys(THREAD_VARS, str(args.threads)))
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        got = {}
        for line in proc.stdout.splitlines():
            if line.startswith("ROW "):
                r = Row(**json.loads(line[4:]))
                got[r.overlap] = r
            elif line.startswith("#"):
                print(line, flush=True)
        why = ""
        if proc.returncode != 0:
            sig = -proc.returncode
            code = signal.Signals(sig).name if sig > 0 else f"exit code {proc.returncode}"
            tail = " ".join(proc.stderr.strip().splitlines()[-1:])[:160]
            why = f"crashed ({code}){': ' + tail if tail else ''}"
            print(f"# {name}: {why}", flush=True)
        for ov in args.overlaps:
            rows.append(got.get(ov) or Row(ov, name, status=why or "no result"))
    return sorted(rows, key=lambda r: (r.overlap, args.tools.index(r.tool)))


def format_table(rows: list[Row]) -> str:
    head = "| overlap | tool | mean err (px) | max err (px) | pairs rejected | seconds |"
    lines = [head, "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        if r.status:
            lines.append(f"| {r.overlap:.0%} | {r.tool} | {r.status} | | | |")
        else:
            lines.append(
                f"| {r.overlap:.0%} | {r.tool} | {r.mean_px:.3f} | {r.max_px:.3f} "
                f"| {r.rejected} | {r.seconds:.2f} |"
            )
    return "\n".join(lines)


def goal_summary(rows: list[Row]) -> str:
    """Is ``tilepipe`` more accurate (mean and max) and faster than every other tool?"""
    out = []
    for ov in sorted({r.overlap for r in rows}):
        mine = next((r for r in rows if r.overlap == ov and r.tool == "tilepipe"), None)
        others = [
            r
            for r in rows
            if r.overlap == ov and r.tool not in ("tilepipe",) and not r.tool.startswith("stage")
        ]
        if mine is None or mine.status:
            out.append(f"{ov:.0%}: tilepipe has no result")
            continue
        ran = [r for r in others if not r.status]
        acc = all(mine.mean_px < r.mean_px and mine.max_px < r.max_px for r in ran)
        fast = all(mine.seconds < r.seconds for r in ran)
        missing = [r.tool for r in others if r.status]
        note = f" (no result: {', '.join(missing)})" if missing else ""
        out.append(
            f"{ov:.0%}: lower mean and max error than all: {'yes' if acc else 'NO'}; "
            f"faster than all: {'yes' if fast else 'NO'}{note}"
        )
    return "\n".join(out)


def machine() -> str:
    return f"{cpu_model()}, nproc={os.cpu_count()}, Python {platform.python_version()}"


def _overlap(s: str) -> float:
    v = float(s)
    return v / 100.0 if v >= 1.0 else v


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--tiles", type=int, default=10, help="lattice side (tiles x tiles)")
    p.add_argument("--tile-size", type=int, default=128, help="tile side (px)")
    p.add_argument(
        "--overlaps", type=_overlap, nargs="+", default=[0.10, 0.15, 0.20],
        help="nominal overlaps, fractions or percent (10 15 20)",
    )  # fmt: skip
    p.add_argument("--jitter", type=float, default=5.0, help="stage jitter, +- px per axis")
    p.add_argument("--noise", type=float, default=0.02, help="noise std (image range 0..1)")
    p.add_argument("--vignetting", type=float, default=0.25, help="intensity lost at corners")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="timed runs per tool, best kept")
    p.add_argument(
        "--threads", type=int, default=0,
        help="set OPENBLAS/OMP/MKL_NUM_THREADS for every tool (0: leave as is)",
    )  # fmt: skip
    p.add_argument("--tools", nargs="+", default=list(TOOLS), choices=list(TOOLS))
    p.add_argument("--worker", choices=list(TOOLS), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        worker(args.worker, args)
        return
    print(
        f"# {_dt.datetime.now().isoformat(timespec='seconds')} | {machine()}\n"
        f"# {args.tiles}x{args.tiles} tiles of {args.tile_size} px, overlaps "
        f"{', '.join(f'{o:.0%}' for o in args.overlaps)}, jitter +-{args.jitter} px, "
        f"noise {args.noise}, vignetting {args.vignetting}, seed {args.seed}, "
        f"BLAS/OpenMP threads {args.threads or 'default'}, best of {args.repeats}",
        flush=True,
    )
    rows = run_bench(args, argv)
    print()
    print(format_table(rows))
    print()
    print(goal_summary(rows))


if __name__ == "__main__":  # guard: multiview-stitcher/dask may spawn worker processes
    main()
