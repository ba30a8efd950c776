"""Raw archival of one real-size tile: seconds, MB/s and peak memory (issue 22).

Writes one instrument-size spectral tile (`nifti-spectral`: 2048 samples x 350 A-lines x 2
channels x 350 B-lines, uint16, 1.0 GB) with spectrometer-like content (a Gaussian source
spectrum, interference fringes of a few reflectors, shot and read noise, 12-bit values), then
archives it with `services.io.raw_archive.archive_tile` in a fresh process per gzip level and
thread count and
reports seconds, raw MB/s, compression ratio and that process's peak RSS (ru_maxrss).

    .venv/bin/python bench/archive_bench.py --dir /scratch/tp-ab --levels 1 3 --threads 1 2
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.core.manifest import RawLayout
from services.io.rawio import nifti_header


def layout(args) -> RawLayout:
    return RawLayout(
        format="nifti-spectral", samples=args.samples, alines=args.alines, bscans=args.bscans
    )


def write_tile(path: Path, lay: RawLayout, seed: int = 0) -> None:
    """A spectrometer-like tile, written one B-line at a time (bounded memory)."""
    rng = np.random.default_rng(seed)
    s = np.arange(lay.samples)
    source = 1500.0 * np.exp(-0.5 * ((s - lay.samples / 2) / (lay.samples / 5)) ** 2)
    with open(path, "wb") as fh:
        fh.write(nifti_header((lay.samples, lay.alines, 2, lay.bscans)))
        for _ in range(lay.bscans):
            depth = rng.uniform(50, 400, size=(3, 1, lay.alines, 1))
            amp = rng.uniform(20, 200, size=(3, 1, lay.alines, 1))
            fringes = (amp * np.cos(2 * np.pi * depth * s / lay.samples)).sum(axis=0)
            line = 200.0 + source * (1 + 0.001 * fringes) + fringes  # [1?, A, S] broadcast
            line = np.broadcast_to(line, (2, lay.alines, lay.samples))
            noisy = line + rng.normal(0, np.sqrt(np.maximum(line, 1.0)) + 3.0)
            fh.write(np.clip(noisy, 0, 4095).astype("<u2").tobytes())  # [2, A, S] per B-line


def archive_once(raw: Path, lay: RawLayout, level: int, threads: int) -> dict:
    import nibabel  # noqa: F401  (imported before the clock starts)

    from services.io.raw_archive import archive_tile

    target = raw.with_name(f"{raw.stem}-l{level}.nii.gz")
    report = archive_tile(raw, lay, target, level=level, threads=threads)
    target.unlink()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "level": level,
        "threads": threads,
        "seconds": round(report.seconds, 2),
        "raw_mb_per_s": round(report.raw_bytes / report.seconds / 1e6, 1),
        "raw_bytes": report.raw_bytes,
        "archive_bytes": report.archive_bytes,
        "ratio": round(report.archive_bytes / report.raw_bytes, 3),
        "peak_rss_mb": round(peak_mb, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/tp-archive-bench"))
    ap.add_argument("--samples", type=int, default=2048)
    ap.add_argument("--alines", type=int, default=350)
    ap.add_argument("--bscans", type=int, default=350)
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--one", type=int, nargs=2, help=argparse.SUPPRESS)  # child: level threads
    args = ap.parse_args()
    lay = layout(args)
    raw = args.dir / "mosaic_001_image_0001_spectral_0001.nii"
    if args.one is not None:
        print(json.dumps(archive_once(raw, lay, *args.one)))
        return 0
    args.dir.mkdir(parents=True, exist_ok=True)
    if not raw.is_file() or raw.stat().st_size != lay.expected_bytes:
        write_tile(raw, lay)
    print(
        f"# {platform.processor() or platform.machine()}, Python {platform.python_version()}, "
        f"numpy {np.__version__}; tile {raw.stat().st_size / 1e9:.3f} GB"
    )
    for threads in args.threads:
        for level in args.levels:
            child = subprocess.run(
                [sys.executable, __file__, *sys.argv[1:], "--one", str(level), str(threads)],
                capture_output=True,
                text=True,
                check=True,
            )
            print(child.stdout.strip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
