"""Watcher figures: latency from a file's completion to its event, and events/s in a burst.

Runs a real nats-server and the real Watcher in-process on a temporary raw root.

    .venv/bin/python bench/watcher_bench.py [--burst 2000] [--paced 200] [--rate 50]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

import nats

from services.core.config import Config, NatsSettings, Roots, WatcherSettings
from services.core.manifest import Calibration, Lattice, Manifest, RawLayout
from services.local.natsserver import EmbeddedServer
from services.local.simulate import write_manifest, write_tile_file
from services.runtime.provision import ensure_kv, ensure_stream
from services.state.status import read_events
from services.watcher.service import Watcher

LAYOUT = RawLayout(samples=64, alines=2, bscans=2)


def manifest(acq: str, n: int, settle_s: float) -> Manifest:
    from kernels.calibration import SpectrometerCalibration

    cols = 50
    return Manifest(
        id=acq,
        lattice=Lattice(slices=1, rows=-(-n // cols), cols=cols),
        raw=LAYOUT,
        pattern="slice{slice:03d}/tile_{index:05d}.nii",
        settle_s=settle_s,
        calibration=Calibration(
            wavelength_poly_nm=SpectrometerCalibration.from_band(64).wavelength_poly_nm,
            autocorr_bins=4,
        ),
    )


async def run(
    acq: str, n: int, rate: float, settle_s: float, config: Config, js, prewrite: bool = False
) -> dict:
    m = manifest(acq, n, settle_s)
    acq_dir = Path(config.roots.raw) / acq
    write_manifest(m, acq_dir)
    payload = os.urandom(m.raw.expected_bytes)
    coords = list(m.coords())[:n]

    def write() -> float:
        start = time.time()
        for i, c in enumerate(coords):
            if rate:
                delay = start + i / rate - time.time()
                if delay > 0:
                    time.sleep(delay)
            write_tile_file(acq_dir / m.path_of(c), payload)
        return start

    if prewrite:  # catch-up: the files are there before the watcher starts
        await asyncio.to_thread(write)
        await asyncio.sleep(settle_s)
    started = time.time()
    watcher = Watcher(config, js)
    stop = asyncio.Event()
    task = asyncio.create_task(watcher.run(stop))
    await watcher.ready.wait()
    if not prewrite:
        started = await asyncio.to_thread(write)
    while True:
        info = await js.stream_info("TILEPIPE", subjects_filter=f"tp.tile_arrived.{acq}.>")
        if len(info.state.subjects or {}) >= n:
            break
        await asyncio.sleep(0.05)
    stop.set()
    await task
    msgs = await read_events(js, "TILEPIPE", f"tp.tile_arrived.{acq}.>")
    from messages.codec import decode_event

    lat, last = [], 0.0
    for msg in msgs:
        event = decode_event(msg.data)
        published = msg.metadata.timestamp.timestamp()
        lat.append(published - event.completed_at.timestamp())
        last = max(last, published)
    lat.sort()
    return {
        "files": n,
        "rate": rate or "max",
        "settle_s": settle_s,
        "events_per_s": n / (last - started),
        "p50_ms": 1000 * statistics.median(lat),
        "p99_ms": 1000 * lat[int(0.99 * (n - 1))],
    }


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        server = EmbeddedServer(root / "nats").start()
        try:
            roots = Roots(raw=root / "raw", work=root / "work", output=root / "out")
            config = Config(
                nats=NatsSettings(url=server.url), roots=roots, watcher=WatcherSettings()
            )
            nc = await nats.connect(server.url)
            js = nc.jetstream()
            await ensure_stream(js, config.nats)
            await ensure_kv(js)
            rows = [
                await run("burst", args.burst, 0, args.settle, config, js),
                await run("catchup", args.burst, 0, args.settle, config, js, prewrite=True),
                await run("paced", args.paced, args.rate, args.settle, config, js),
            ]
            await nc.close()
        finally:
            server.stop()
    print(
        f"{'run':<10}{'files':>7}{'rate/s':>8}{'settle s':>10}{'events/s':>10}"
        f"{'p50 ms':>9}{'p99 ms':>9}"
    )
    for name, r in zip(("burst", "catch-up", "paced"), rows, strict=True):
        print(
            f"{name:<10}{r['files']:>7}{r['rate']!s:>8}{r['settle_s']:>10.2f}"
            f"{r['events_per_s']:>10.0f}{r['p50_ms']:>9.0f}{r['p99_ms']:>9.0f}"
        )
    print(
        "burst: files written (with fsync) as fast as possible while watching; catch-up: "
        "files already there at start, events/s from watcher start;\nlatency = stream "
        "timestamp of tile_arrived - file mtime (last write); it includes the settle interval "
        "by design (catch-up latency also counts the time before the watcher started)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--burst", type=int, default=2000)
    parser.add_argument("--paced", type=int, default=200)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--settle", type=float, default=0.2)
    asyncio.run(main(parser.parse_args()))
