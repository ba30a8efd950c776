"""3-D volume mosaics at real size: seconds and peak memory per mosaic (issue 22, item 5).

Real-size tile products as the process stage writes them (350 x 350 A-lines x 1000 depth
samples, float32, chunks of 16 B-lines, its codec: ``--codec``, lz4 by default) are fused
into dBI, R3D and O3D mosaics of ``n x n`` tiles (20 % overlap), cropped to 500 samples
from 30 below a focus plane (fitted first, from the tiles' unfiltered surfaces), masked
with a mosaic mask. Each mosaic runs in a fresh Python process, which reports its wall
seconds per step, CPU seconds and peak resident memory (``VmHWM``): memory set by the
block, not by the mosaic, shows as the same peak for every n.

    python bench/volume_mosaic_bench.py --sizes 2 4 [--codec lz4] [--distinct 2] [--work DIR]

To keep the disk and the set-up small, ``--distinct`` tile stores are written once and each
mosaic's tiles reuse them round-robin (the fuser reads every tile through its own path; the
page cache may hold them, so reading is the decompression, not the disk).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

from kernels.focus_plane import focus_plane
from services.io.focus_plane import fit_from_tiles, plane_of
from services.io.mosaic_volume import BLOCK_YX, DepthCrop, MosaicMask, fuse_volume
from services.io.omezarr import write_omezarr
from services.stages.process import CODECS

ARRAYS = ("db", "retardance", "orientation")


def write_tiles(root: Path, count: int, alines: int, depth: int, codec: str) -> list[Path]:
    """`count` products groups of real size, written 16 B-lines at a time."""
    plane = focus_plane([12.0, -6.0, 8.0, 2.0, 5.0], (alines, alines))
    rng = np.random.default_rng(0)
    paths = []
    for k in range(count):
        path = root / f"tile{k}.zarr"
        paths.append(path)
        if (path / "zarr.json").exists():
            continue
        group = zarr.open_group(str(path), mode="w", zarr_format=3)
        arrays = {
            name: group.create_array(
                name,
                shape=(alines, alines, depth),
                chunks=(16, alines, depth),
                dtype="float32",
                compressors=CODECS[codec],
            )
            for name in ARRAYS
        }
        z = np.arange(depth, dtype=np.float32)
        for b0 in range(0, alines, 16):
            b1 = min(alines, b0 + 16)
            shape = (b1 - b0, alines, depth)
            noise = rng.normal(0, 2.0, shape).astype(np.float32)
            arrays["db"][b0:b1] = 90 - 0.04 * z + noise
            arrays["retardance"][b0:b1] = np.abs(30 + 4 * noise)
            arrays["orientation"][b0:b1] = np.mod(20 * noise + 90, 180) - 90
        surface = 100 + plane + rng.normal(0, 0.5, (alines, alines))
        group.create_array("surface_raw", data=np.rint(surface).astype(np.int32))
        group.create_array("aip", data=np.full((alines, alines), 80.0, np.float32))
    return paths


def layout(n: int, alines: int, overlap: float) -> list[tuple[float, float]]:
    step = round(alines * (1 - overlap))
    return [(float(r * step), float(c * step)) for r in range(n) for c in range(n)]


def worker(args) -> None:
    """One mosaic in this process: focus fit, then the three products; JSON on stdout."""
    stores = sorted(Path(args.work).glob("tile*.zarr"))
    positions = layout(args.n, args.alines, args.overlap)
    tiles = [(stores[k % len(stores)], p) for k, p in enumerate(positions)]
    out = Path(args.work) / f"mosaic{args.n}"
    seconds = {}
    t0 = time.perf_counter()
    record = fit_from_tiles(tiles, threshold_db=60.0)
    plane = plane_of(record, (args.alines, args.alines))
    seconds["focus"] = time.perf_counter() - t0
    crop = DepthCrop(offset=30, depth=500, plane=plane)
    mask = MosaicMask(out / "mosaic.ome.zarr")
    shape = None
    for product in ("dBI", "R3D", "O3D"):
        t0 = time.perf_counter()
        shape = fuse_volume(
            tiles,
            out / f"m-{product}.ome.zarr",
            10.0,
            2.5,
            product=product,
            crop=crop,
            mask=mask,
            block_yx=tuple(args.block),
        )
        seconds[product] = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    status = Path("/proc/self/status").read_text()
    hwm_kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")))
    cpu = usage.ru_utime + usage.ru_stime
    report = {"n": args.n, "shape": shape, "seconds": seconds, "cpu_s": cpu}
    print(json.dumps({**report, "peak_rss_mb": hwm_kb / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--alines", type=int, default=350)
    parser.add_argument("--depth", type=int, default=1000, help="tile depth samples")
    parser.add_argument("--overlap", type=float, default=0.2)
    parser.add_argument("--distinct", type=int, default=2, help="tile stores written")
    parser.add_argument("--codec", choices=list(CODECS), default="lz4", help="tiles' codec")
    parser.add_argument("--block", type=int, nargs=2, default=list(BLOCK_YX))
    parser.add_argument("--work", default=None, help="directory for tiles and outputs")
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)  # worker mode
    args = parser.parse_args()
    if args.n is not None:
        return worker(args)
    work = Path(args.work or tempfile.mkdtemp(prefix="volbench-"))
    t0 = time.perf_counter()
    write_tiles(work, args.distinct, args.alines, args.depth, args.codec)
    print(f"tiles: {args.distinct} stores in {time.perf_counter() - t0:.0f} s under {work}")
    head = "| tiles | output (z, y, x) | GB per product | focus s | dBI s | R3D s | O3D s |"
    print(head + " total s | CPU s | peak RSS MB |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for n in args.sizes:
        positions = np.array(layout(n, args.alines, args.overlap))
        size = int(positions.max() + args.alines + 1)
        mask = np.ones((size, size), np.float32)
        mask[: size // 10] = 0.0  # a strip without tissue
        write_omezarr(
            work / f"mosaic{n}" / "mosaic.ome.zarr",
            {"aip": np.zeros_like(mask), "mask": mask},
            fsync=False,
        )
        cmd = [sys.executable, __file__, "--work", str(work), "--n", str(n)]
        cmd += ["--alines", str(args.alines), "--overlap", str(args.overlap)]
        cmd += ["--block", *map(str, args.block)]
        result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        s = result["seconds"]
        z, y, x = result["shape"]
        print(
            f"| {n}x{n} | ({z}, {y}, {x}) | {z * y * x * 4 / 1e9:.2f} | {s['focus']:.1f} | "
            f"{s['dBI']:.0f} | {s['R3D']:.0f} | {s['O3D']:.0f} | {sum(s.values()):.0f} | "
            f"{result['cpu_s']:.0f} | {result['peak_rss_mb']:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
