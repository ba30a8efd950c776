"""`tilepipe up --demo`: a small simulated acquisition end to end, with live progress."""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.live import Live

from messages.codec import decode_event
from services.bus import connect
from services.config import Config
from services.layout import volume_path
from services.simulate import PhantomParams, simulate, small_manifest, write_manifest
from services.status import read_events, snapshot
from services.status_view import render
from services.supervisor import Supervisor


def demo_acquisition(raw_root: Path) -> tuple[Path, object]:
    """Write a fresh demo manifest (2 slices of 3x3 tiles, 64x64 A-lines x 512 samples)."""
    acq = "demo-" + datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    manifest = small_manifest(acq, slices=2, rows=3, cols=3, settle_s=0.3)
    return write_manifest(manifest, raw_root / acq), manifest


async def run_demo(
    config: Config,
    supervisor: Supervisor,
    stages: list[str],
    rate: float,
    stop: asyncio.Event,
    console: Console | None = None,
) -> dict:
    """Simulate, show the live lattice until every tile has passed every tile stage."""
    console = console or Console()
    path, manifest = demo_acquisition(Path(config.roots.raw))
    lat = manifest.lattice
    params = PhantomParams(scatterers=12)
    sim = threading.Thread(
        target=simulate, args=(path, manifest, rate), daemon=True, kwargs={"params": params}
    )
    started = time.monotonic()
    sim.start()
    nc = await connect(config.nats, name="tilepipe-demo")
    js = nc.jetstream()
    last = "tile_processed" if "process" in stages else "tile_converted"
    stages = [s for s in stages if s != "watcher"]
    try:
        with Live(console=console, refresh_per_second=4) as live:
            while not stop.is_set():
                status = await snapshot(js, config.nats.stream, manifest.id, stages)
                live.update(render(status, (lat.rows, lat.cols, lat.slices, lat.mosaics)))
                tiles_done = status.count(last) + len(status.failed_tiles) >= lat.tiles
                mosaics_done = (
                    "stitch" not in stages
                    or len(status.mosaics.get("slice_stitched", ())) >= lat.slices * lat.mosaics
                )
                registered = (
                    "register" not in stages
                    or len(status.mosaics.get("slice_registered", ())) >= lat.slices
                )
                if tiles_done and mosaics_done and registered:
                    break
                supervisor.check(console.print)
                await asyncio.sleep(0.5)
        figures = await _figures(js, config.nats.stream, manifest.id, last)
        figures["wall_s"] = time.monotonic() - started
        volume = Path(config.roots.output) / volume_path(manifest.id)
        figures["volume"] = str(volume) if volume.exists() else None
        figures["mosaics"] = sorted(
            str(Path(config.roots.output) / decode_event(m.data).path)
            for m in await read_events(js, config.nats.stream, f"tp.slice_stitched.{manifest.id}.>")
        )
        figures["acq"] = manifest.id
        return figures
    finally:
        await nc.close()


async def _figures(js, stream: str, acq: str, last: str) -> dict:
    arrived = {
        e.tile.token() + str(e.tile.slice): e
        for e in map(
            lambda m: decode_event(m.data),
            await read_events(js, stream, f"tp.tile_arrived.{acq}.>"),
        )
    }
    done = [decode_event(m.data) for m in await read_events(js, stream, f"tp.{last}.{acq}.>")]
    latency = sorted(
        (e.emitted_at - arrived[e.tile.token() + str(e.tile.slice)].completed_at).total_seconds()
        for e in done
        if e.tile.token() + str(e.tile.slice) in arrived
    )
    out = {"tiles_done": len(done), "last_stage": last}
    if latency:
        out["latency_p50_s"] = statistics.median(latency)
        out["latency_max_s"] = latency[-1]
    return out
