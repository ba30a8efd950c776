"""`tilepipe process-tile` on a real-size instrument tile: seconds and peak memory per preset.

Writes one tile as the microscope does (350 x 350 A-lines x 2048 samples x 2 channels, the
352-byte NIfTI header: 1.0 GB) with the simulated instrument's calibration files, then runs
`tilepipe process-tile` on it as a separate process per conventions preset ("toolbox": the lab's
chain; "tilepipe": tilepipe's own), and prints wall seconds, CPU seconds, peak RSS and the bytes
read and written, side by side in one run.

    python bench/process_tile_bench.py [--alines 350 --bscans 350] [--presets toolbox,tilepipe]

The tile's content is cheap to make (a few reflectors per A-line with random phases, not the
phantom): the kernels' cost does not depend on what the spectra hold.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.core.manifest import Manifest, Processing  # noqa: E402
from services.io.rawio import nifti_header  # noqa: E402
from services.local.simulate import Instrument, small_manifest, write_manifest  # noqa: E402


def write_tile(path: Path, manifest: Manifest, seed: int = 1, frames: int = 8) -> int:
    """A spectral tile (a few reflectors per A-line); returns its bytes. Only `frames` distinct
    B-lines are synthesised; the others repeat them rolled along the A-lines, so a 1 GB tile
    takes seconds (the kernels' cost does not depend on the content)."""
    raw = manifest.raw
    instrument = Instrument(samples=raw.samples)
    k = [2 * np.pi / (instrument.wavelengths_nm(ch) * 1e-3) for ch in (0, 1)]
    rng = np.random.default_rng(seed)
    distinct = []
    for _ in range(min(frames, raw.bscans)):
        depth = rng.uniform(150.0, 900.0, (raw.alines, 4, 1))
        phase = rng.uniform(0, 2 * np.pi, (raw.alines, 4, 1))
        frame = np.empty((2, raw.alines, raw.samples), np.uint16)
        for ch in (0, 1):
            fringe = np.cos(2 * k[ch][None, None, :] * depth + phase).sum(axis=1)
            frame[ch] = np.clip(20000 + 300 * fringe + rng.normal(0, 2, fringe.shape), 0, 65535)
        distinct.append(frame)
    with open(path, "wb") as fh:
        fh.write(nifti_header((raw.samples, raw.alines, 2, raw.bscans)))
        for b in range(raw.bscans):
            fh.write(np.roll(distinct[b % len(distinct)], b // len(distinct), axis=1).tobytes())
    return path.stat().st_size


def run(tile: Path, manifest: Path, out: Path) -> dict:
    """One `tilepipe process-tile` process: wall s, CPU s, peak RSS (its own rusage)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log = out.with_suffix(".log")
    started = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "services.ops.cli",
                "process-tile",
                str(tile),
                "--manifest",
                str(manifest),
                "--out",
                str(out),
                "--device",
                "cpu",
            ],
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(log.read_text())
    written = sum(p.stat().st_size for p in out.iterdir())
    return {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_gb": usage.ru_maxrss / 1e6,  # kB -> GB, this process alone
        "written_gb": written / 1e9,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alines", type=int, default=350)
    parser.add_argument("--bscans", type=int, default=350)
    parser.add_argument("--presets", default="toolbox,tilepipe")
    parser.add_argument("--dir", type=Path, default=None, help="scratch directory")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        root = Path(scratch)
        rows = {}
        for preset in args.presets.split(","):
            base = small_manifest(
                "bench",
                slices=1,
                rows=1,
                cols=1,
                alines=args.alines,
                bscans=args.bscans,
                samples=2048,
            )
            manifest = base.model_copy(update={"processing": Processing(preset=preset)})
            acq = root / preset
            path = write_manifest(manifest, acq)
            tile = acq / "mosaic_001_image_0001_spectral_0001.nii"
            size = write_tile(tile, manifest)
            rows[preset] = {"tile_gb": size / 1e9, **run(tile, path, acq / "out")}
            tile.unlink()
        print(
            f"process-tile, {args.bscans} x {args.alines} A-lines x 2048 samples, CPU "
            f"({os.cpu_count()} cores), one process per preset, same machine and run"
        )
        print(
            f"{'preset':<10} {'tile GB':>8} {'wall s':>8} {'CPU s':>8} {'peak RSS GB':>12} "
            f"{'written GB':>11}"
        )
        for preset, r in rows.items():
            print(
                f"{preset:<10} {r['tile_gb']:>8.2f} {r['wall_s']:>8.1f} {r['cpu_s']:>8.1f} "
                f"{r['peak_rss_gb']:>12.2f} {r['written_gb']:>11.2f}"
            )
        if len(rows) == 2:
            (name_a, a), (name_b, b) = rows.items()
            print(f"ratio wall {name_a}/{name_b}: {a['wall_s'] / b['wall_s']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
