"""Hardening (issue 19), against real processes: `tilepipe run` children of the production
`Supervisor`, a real nats-server, real files, FIFOs and signals.

Which test proves which fault is listed in docs/reliability.md and docs/security.md.
"""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import numpy as np

from messages import TileArrived, TileCoord, TileProcessed, decode_event, utcnow
from services.bus import publish_event
from services.cli import provision
from services.config import Config
from services.manifest import Manifest
from services.rawio import encode_tile
from services.simulate import PhantomParams, simulate, write_manifest, write_tile_file
from tests.conftest import stream_messages, wait_for
from tests.procs import Services, fault_config, tiny_acquisition
from tests.test_watcher import tiny_manifest

STREAM = "TILEPIPE"
PARAMS = PhantomParams(scatterers=6, scatterer_spacing_um=30.0)


def watcher_config(config: Config, **watcher) -> Config:
    """Short settle and rescan intervals: several rescans happen within a test."""
    settings = {"settle_s": 0.2, "rescan_s": 0.5, **watcher}
    return config.model_copy(update={"watcher": config.watcher.model_copy(update=settings)})


async def events(js, kind: str, acq: str = "*") -> list:
    return [decode_event(m.data) for m in await stream_messages(js, f"tp.{kind}.{acq}.>")]


async def count(js, kind: str, acq: str = "*") -> int:
    info = await js.stream_info(STREAM, subjects_filter=f"tp.{kind}.{acq}.>")
    return sum((info.state.subjects or {}).values())


def records(services: Services, name: str, event: str) -> list[dict]:
    return [r for r in services.log(name) if r.get("event") == event]


def variant(manifest: Manifest, **changes) -> Manifest:
    """`manifest` with `changes`, validated again."""
    return Manifest.model_validate({**manifest.model_dump(), **changes})


def good_tile(manifest: Manifest) -> bytes:
    """A readable raw tile (a valid header, zero samples)."""
    raw = manifest.raw
    data = np.zeros((raw.bscans, 2, raw.alines, raw.samples), np.uint16)
    return encode_tile(data, raw)


# ------------------------------------------------------------------ (1) isolation
async def _at_least(js, kind: str, n: int, acq: str = "*") -> bool:
    return await count(js, kind, acq) >= n


# ------------------------------------------------------- (2) FIFOs, (9), (12) in convert
async def test_convert_refuses_special_files_corrupt_headers_and_outside_tiles_at_once(
    config, js, tmp_path
):
    """`tile_arrived` events whose raw file or manifest is a FIFO, whose raw file has a
    corrupt header, or whose tile lies outside the lattice fail at once (one attempt,
    `stage_failed` naming the reason) and never block a worker: convert runs one delivery at
    a time, and the good tiles after them are converted."""
    raw = config.roots.raw
    manifest = tiny_manifest("conv", 2, 2)
    write_manifest(manifest, raw / "conv")
    tiff = variant(
        tiny_manifest("convtiff", 2, 2),
        raw={**manifest.raw.model_dump(), "format": "tiff"},
        pattern="slice{slice:03d}/tile_{index:04d}.tif",
    )
    write_manifest(tiff, raw / "convtiff")
    (raw / "convfifo").mkdir()
    os.mkfifo(raw / "convfifo" / "manifest.toml")
    coords = list(manifest.coords())
    paths = {c: f"conv/{manifest.path_of(c)}" for c in coords}
    write_tile_file(raw / paths[coords[0]], good_tile(manifest))
    write_tile_file(raw / paths[coords[3]], good_tile(manifest))
    os.mkfifo(raw / paths[coords[1]])
    write_tile_file(raw / paths[coords[2]], os.urandom(manifest.raw.expected_bytes))
    os.mkfifo(raw / "convtiff" / "tile.tif")

    def arrived(acq: str, tile: TileCoord, path: str, manifest_rel: str) -> TileArrived:
        return TileArrived(
            acq=acq,
            tile=tile,
            path=path,
            manifest=manifest_rel,
            size_bytes=manifest.raw.expected_bytes,
            completed_at=utcnow(),
            raw_format="tiff" if acq == "convtiff" else "nifti-spectral",
        )

    conv = "conv/manifest.toml"
    outside = [TileCoord(slice=0, row=9, col=9), TileCoord(slice=7, row=0, col=0)]
    inputs = [
        arrived("convtiff", coords[0], "convtiff/tile.tif", "convtiff/manifest.toml"),
        arrived("conv", coords[1], paths[coords[1]], conv),
        arrived("convfifo", coords[0], paths[coords[0]], "convfifo/manifest.toml"),
        arrived("conv", coords[2], paths[coords[2]], conv),
        *(arrived("conv", t, paths[coords[0]], conv) for t in outside),
        arrived("conv", coords[0], paths[coords[0]], conv),
        arrived("conv", coords[3], paths[coords[3]], conv),
    ]
    cfg = fault_config(
        config, ("convert",), per_stage={"convert": {"concurrency": 1}}, max_deliver=5
    )
    await provision(cfg)
    with Services(cfg, tmp_path / "svc", ["convert"]) as services:
        for event in inputs:
            await publish_event(js, event)

        async def settled() -> bool:
            return await count(js, "stage_failed") == 6 and await count(js, "tile_converted") == 2

        await wait_for(settled, timeout=60, interval=0.2)
        retries = services.metric(
            "convert", "tilepipe_events_handled_total", stage="convert", outcome="retry"
        )
    assert retries == 0
    failed = {(e.acq, e.tile.slice, e.tile.token()): e for e in await events(js, "stage_failed")}
    assert all(e.attempts == 1 and e.stage == "convert" for e in failed.values()), failed
    fifo_tiff = failed[("convtiff", 0, coords[0].token())].error
    fifo_raw = failed[("conv", 0, coords[1].token())].error
    fifo_manifest = failed[("convfifo", 0, coords[0].token())].error
    corrupt = failed[("conv", 0, coords[2].token())].error
    assert "not a regular file (FIFO)" in fifo_tiff and "not a regular file (FIFO)" in fifo_raw
    assert "not a regular file" in fifo_manifest
    assert corrupt.startswith("RawFormatError") and "NIfTI" in corrupt
    far = failed[("conv", 0, "m0-r9-c9")].error
    late = failed[("conv", 7, "m0-r0-c0")].error
    assert "outside the lattice" in far and "r9" in far and "2x2" in far, far
    assert "slice 7" in late and "1 slice" in late, late
    converted = {e.tile.token() for e in await events(js, "tile_converted")}
    assert converted == {coords[0].token(), coords[3].token()}


# ------------------------------------------------------------------- (9) stitch
async def test_a_processed_tile_outside_the_lattice_never_breaks_the_mosaic(config, js, tmp_path):
    """Tiles outside the lattice: convert refuses them at once; a `tile_processed` outside the
    lattice reaching stitch (from an older pipeline, another producer) fails at once in
    stitch, and the mosaic is stitched whole when its last tile arrives (no KeyError)."""
    names = ["watcher", "convert", "process", "stitch"]
    cfg = fault_config(config, ("convert", "process", "stitch"))
    manifest = tiny_acquisition("edge", slices=1)
    path = write_manifest(manifest, config.roots.raw / "edge")
    coords = list(manifest.coords())
    await provision(cfg)
    with Services(cfg, tmp_path / "svc", names):
        await asyncio.to_thread(
            simulate, path, manifest, 0, params=PARAMS, only=lambda c: c != coords[-1]
        )
        await wait_for(lambda: _at_least(js, "tile_processed", 3), timeout=180, interval=0.5)
        first = (await events(js, "tile_arrived"))[0]
        for tile in (TileCoord(slice=0, row=9, col=9), TileCoord(slice=7, row=0, col=0)):
            await publish_event(js, first.model_copy(update={"tile": tile}))
        done = next(e for e in await events(js, "tile_processed"))
        stray = TileProcessed(
            acq="edge",
            tile=TileCoord(slice=0, row=5, col=5),
            products=done.products,
            device="cpu",
            seconds=0.0,
        )
        await publish_event(js, stray)
        await wait_for(lambda: _at_least(js, "stage_failed", 3), timeout=60, interval=0.5)
        await asyncio.to_thread(
            simulate, path, manifest, 0, params=PARAMS, only=lambda c: c == coords[-1]
        )
        stitched = await wait_for(lambda: events(js, "slice_stitched"), timeout=120, interval=0.5)
    failed = {(e.stage, e.tile.slice, e.tile.token()): e for e in await events(js, "stage_failed")}
    assert set(failed) == {
        ("convert", 0, "m0-r9-c9"),
        ("convert", 7, "m0-r0-c0"),
        ("stitch", 0, "m0-r5-c5"),
    }, failed
    assert all(e.attempts == 1 and "outside the lattice" in e.error for e in failed.values())
    assert len(stitched) == 1 and stitched[0].missing == [] and len(stitched[0].positions) == 4


# ------------------------------------------------ (5) acq_started and a full stream
# ------------------------------------------- (14) rescans, rewrites, clocks; (12) stalls
# ------------------------------------------------------- (12) a late tile after finish
# ------------------------------------------------------------------- (7) the sweeper
HOST = socket.gethostname()


def temporary(parent: Path, final: str, pid: int, host: str = HOST, kind: str = "tmp") -> Path:
    """A writer's temporary directory beside `final`, named as services/atomic.py names it."""
    from services.atomic import temp_name

    path = temp_name(parent / final, kind=kind, pid=pid, host=host)
    (path / "c").mkdir(parents=True)
    (path / "zarr.json").write_text("{}")
    return path


# ---------------------------------------------------------- (2) SIGTERM, stuck handler
