"""Real-size tiles through the real stages: file complete -> products on disk (issue 20).

Starts an embedded nats-server and the watcher, convert and process services as processes (the
same `Supervisor` as `tilepipe up`), writes N instrument tiles of 350 x 350 A-lines x 2048
samples x 2 channels (1.0 GB each, cheap content: the kernels' cost does not depend on it) into
the raw root one after the other, waits for every `tile_processed`, and prints per stage: the
handling seconds per tile (mean of the runtime's `event_handled` log records), the bytes read
and written per tile (the stages' `/metrics` counters) and the peak RSS of the process
(`VmHWM`); then, side by side on the same machine and data: the kernels alone on one tile held
in memory (`kernels.process_tile`), and a plain `cat FILE > /dev/null` of the same bytes (from
the page cache: the files were just written), the I/O bound. The critical path is a tile's
file-complete -> processed time (its `tile_arrived` -> `tile_processed` events).

    python bench/realsize_bench.py [--tiles 4] [--alines 350 --bscans 350] [--device cpu]

Optionally `--out FILE` writes the table to a file too (the one-command GPU check uses it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from bench.harness import supervised, work_roots  # noqa: E402
from bench.process_tile_bench import write_tile  # noqa: E402
from kernels.backend import get_xp  # noqa: E402
from kernels.pipeline import process_tile  # noqa: E402
from messages import decode_event  # noqa: E402
from services.core.config import Config, StageSettings, WatcherSettings  # noqa: E402
from services.core.manifest import load_manifest  # noqa: E402
from services.io.rawio import read_tile  # noqa: E402
from services.local.simulate import small_manifest, write_manifest  # noqa: E402
from services.state.status import read_events  # noqa: E402

STAGES = ("convert", "process")


def peak_rss_gb(pid: int) -> float:
    """Peak resident set size of a live process (VmHWM) in GB, 0 if unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return 0.0


def metric(port: int, name: str, stage: str) -> float:
    """One counter of a service's /metrics (0 when absent)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels.get("stage") == stage:
                return s.value
    return 0.0


def handled_seconds(log: Path) -> list[float]:
    """`event_handled` seconds of a service's JSON log."""
    out = []
    for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
        if line.startswith("{") and '"event_handled"' in line:
            out.append(json.loads(line)["seconds"])
    return out


def cat_seconds(path: Path) -> float:
    started = time.perf_counter()
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


async def run(args: argparse.Namespace, work: Path) -> list[str]:
    roots = work_roots(work)
    options = {"device": args.device}
    config = Config(
        roots=roots,
        watcher=WatcherSettings(settle_s=0.2),
        stages={
            "convert": StageSettings(concurrency=1, ack_wait_s=600),
            "process": StageSettings(concurrency=1, ack_wait_s=600, options=options),
        },
    )
    services = ["watcher", *STAGES]
    manifest = small_manifest(
        "real",
        slices=1,
        rows=1,
        cols=args.tiles,
        alines=args.alines,
        bscans=args.bscans,
        samples=2048,
        settle_s=0.2,
    )
    manifest_path = write_manifest(manifest, roots.raw / "real")
    manifest = load_manifest(manifest_path)
    staging = work / "staging"  # same file system as the raw root: landing is a rename
    staging.mkdir(exist_ok=True)
    staged = []
    for coord in manifest.coords():
        ready = staging / f"tile{coord.col:03d}.nii"
        write_tile(ready, manifest, coord.col + 1)
        staged.append((coord, ready))
    lines = []
    async with supervised(config, work, services, "realsize-bench") as pipeline:
        js = pipeline.js
        await asyncio.sleep(2.0)  # every service subscribed
        # Tiles land the way the instrument writes them: complete, one at a time, each after
        # the previous one is processed (the per-tile latency, no queueing, no generator
        # competing for the cores). They are generated beforehand (see `staged`).
        files = []
        deadline = time.monotonic() + args.timeout
        for k, (coord, ready) in enumerate(staged):
            path = manifest_path.parent / manifest.path_of(coord)
            path.parent.mkdir(parents=True, exist_ok=True)
            os.utime(ready)  # written complete now (the watcher dates arrival by mtime)
            os.rename(ready, path)
            files.append(path)
            while True:
                done = await read_events(js, config.nats.stream, "tp.tile_processed.real.>")
                if len(done) > k or time.monotonic() > deadline:
                    break
                pipeline.supervisor.check(print)
                await asyncio.sleep(0.5)
        arrived = {
            e.tile.col: e.completed_at
            for e in map(
                decode_event,
                (
                    m.data
                    for m in await read_events(js, config.nats.stream, "tp.tile_arrived.real.>")
                ),
            )
        }
        processed = {e.tile.col: e for e in map(decode_event, (m.data for m in done))}
        paths = [(processed[c].completed_at - arrived[c]).total_seconds() for c in processed]
        rss = {c.name: peak_rss_gb(c.proc.pid) for c in pipeline.supervisor.children if c.proc}
        io = {
            s: (
                metric(pipeline.ports[s], "tilepipe_read_bytes_total", s) / args.tiles / 1e9,
                metric(pipeline.ports[s], "tilepipe_written_bytes_total", s) / args.tiles / 1e9,
            )
            for s in STAGES
        }
    per_stage = {s: handled_seconds(work / "logs" / f"{s}.log") for s in STAGES}
    # side by side: the kernels alone on one tile in memory, and cat of the same bytes
    layout = manifest.geometry(0).raw
    raw = read_tile(files[0], layout)
    xp = get_xp(args.device)
    kernels = []
    for _ in range(2):
        started = time.perf_counter()
        process_tile(raw, manifest.spectrometer(), manifest.processing_params(), xp=xp)
        kernels.append(time.perf_counter() - started)
    kernel_s = min(kernels)
    cat_s = statistics.median(cat_seconds(f) for f in files)
    size = files[0].stat().st_size / 1e9
    lines.append(
        f"{args.tiles} tiles of {args.bscans} x {args.alines} A-lines x 2048 samples "
        f"({size:.2f} GB each), {manifest.processing.preset} conventions, device {args.device}, "
        f"{platform.node()} ({os.cpu_count()} cores), {time.strftime('%Y-%m-%d %H:%M')}"
    )
    lines.append(
        f"{'stage':<10} {'s/tile':>8} {'GB read':>8} {'GB written':>11} {'peak RSS GB':>12}"
    )
    for s in STAGES:
        secs = statistics.fmean(per_stage[s]) if per_stage[s] else float("nan")
        lines.append(
            f"{s:<10} {secs:>8.2f} {io[s][0]:>8.2f} {io[s][1]:>11.2f} {rss.get(s, 0):>12.2f}"
        )
    crit = statistics.median(paths) if paths else float("nan")
    lines += [
        f"watcher    {'':>8} {'':>8} {'':>11} {rss.get('watcher', 0):>12.2f}",
        f"file complete -> processed, median per tile: {crit:.2f} s "
        f"({len(paths)} of {args.tiles} tiles: {', '.join(f'{p:.2f}' for p in paths)})",
        f"kernels alone (one tile in memory, best of 2): {kernel_s:.2f} s",
        f"cat FILE > /dev/null (page cache, median): {cat_s:.2f} s",
        f"ratio critical path / kernels alone: {crit / kernel_s:.2f}",
        f"ratio critical path / cat: {crit / cat_s:.1f}",
    ]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=4)
    parser.add_argument("--alines", type=int, default=350)
    parser.add_argument("--bscans", type=int, default=350)
    parser.add_argument("--device", choices=("cpu", "gpu", "auto"), default="cpu")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--dir", type=Path, default=None, help="scratch directory")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    parser.add_argument("--keep", action="store_true", help="keep the scratch (logs) after")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="realsize-", dir=args.dir))
    try:
        lines = asyncio.run(run(args, scratch))
    finally:
        if args.keep:
            print(f"scratch kept: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
