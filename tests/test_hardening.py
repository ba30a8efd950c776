"""Hardening (issue 19), against real processes: `tilepipe run` children of the production
`Supervisor`, a real nats-server, real files, FIFOs and signals.

Which test proves which fault is listed in docs/reliability.md and docs/security.md.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
from nats.js.api import DiscardPolicy

from messages import TileArrived, TileCoord, TileProcessed, decode_event, utcnow
from services.core.config import Config, StageSettings
from services.core.manifest import Manifest
from services.io.rawio import encode_tile
from services.local.init import provision
from services.local.simulate import PhantomParams, simulate, write_manifest, write_tile_file
from services.runtime.bus import publish_event
from tests.conftest import stream_messages, tilepipe, wait_for
from tests.procs import Services, fault_config, tiny_acquisition
from tests.test_watcher import payload, tiny_manifest

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
async def test_bad_acquisitions_are_refused_and_reported_while_a_good_one_goes_on(
    config, js, tmp_path
):
    """Bad acquisitions beside a good one, some there at start-up and some appearing later:
    each is refused once (log line with the reason, the refused gauge), the watcher never
    stops, and the good acquisition gets every tile announced and finishes. Two of them pass
    the manifest's own limits but break the events' (a manifest path and tile names longer
    than an event path may be): `tilepipe check` refuses them with the same rule."""
    raw = config.roots.raw
    good = tiny_manifest("good", 2, 2, settle_s=0.2)
    write_manifest(good, raw / "good")
    coords = list(good.coords())
    for coord in coords[:2]:
        write_tile_file(raw / "good" / good.path_of(coord), payload(good))
    deep = raw.joinpath(*["d" * 255] * 4)  # manifest path: 1037 characters
    write_manifest(tiny_manifest("deep", 1, 1), deep)
    names_dir = raw.joinpath(*["n" * 255] * 3)  # tile paths: 1041 characters
    long_names = variant(
        tiny_manifest("longnames", 1, 1),
        pattern="x" * 250 + "/slice{slice:03d}/tile_{index:04d}.nii",
    )
    write_manifest(long_names, names_dir)
    write_tile_file(names_dir / long_names.path_of(coords[0]), payload(long_names))
    pipe = tiny_manifest("pipe", 1, 1)  # valid, its only tile a FIFO
    write_manifest(pipe, raw / "pipe")
    (raw / "pipe" / "slice000").mkdir()
    os.mkfifo(raw / "pipe" / pipe.path_of(coords[0]))
    (raw / "fifo").mkdir()
    os.mkfifo(raw / "fifo" / "manifest.toml")
    for path in (deep, names_dir):
        check = await asyncio.to_thread(
            tilepipe, "check", str(path / "manifest.toml"), config=config
        )
        assert check.returncode == 1, check.stdout
        assert "1024 characters" in check.stdout, check.stdout
    cfg = watcher_config(config)
    with Services(cfg, tmp_path / "svc", ["watcher"]) as services:
        await wait_for(lambda: _at_least(js, "tile_arrived", 2, "good"), timeout=60)
        (raw / "broken").mkdir()
        (raw / "broken" / "manifest.toml").write_text("id = [")  # appears while running
        write_manifest(tiny_manifest("good", 1, 1), raw / "zz-same-id")
        for coord in coords[2:]:
            write_tile_file(raw / "good" / good.path_of(coord), payload(good))
        await wait_for(lambda: count(js, "acq_finished", "good"), timeout=60)

        def refused() -> float:
            return services.metric("watcher", "tilepipe_watcher_acquisitions_refused")

        await wait_for(lambda: refused() == 5, timeout=30)
        await asyncio.sleep(2.0)  # four more rescans: nothing is reported twice
        assert refused() == 5 and services.alive("watcher"), services.log_tail("watcher")
        reports = records(services, "watcher", "acquisition_refused")
        fifo_tiles = [
            r for r in records(services, "watcher", "file_skipped") if r["path"].startswith("pipe/")
        ]
    by_manifest = {r["manifest"].split("/")[0][:8]: r for r in reports}
    assert len(reports) == 5 and set(by_manifest) == {
        "d" * 8,
        "n" * 8,
        "fifo",
        "broken",
        "zz-same-",
    }, reports
    assert "1024" in by_manifest["d" * 8]["error"] and "1024" in by_manifest["n" * 8]["error"]
    assert "not a regular file" in by_manifest["fifo"]["error"]
    assert by_manifest["zz-same-"]["reason"] == "duplicate_id"
    assert all(r["level"] == "error" for r in reports)
    assert len(fifo_tiles) == 1 and fifo_tiles[0]["outcome"] == "not_regular", fifo_tiles
    assert "FIFO" in fifo_tiles[0]["reason"]
    assert await count(js, "acq_started") == 2 and await count(js, "tile_arrived") == 4
    (finished,) = await events(js, "acq_finished")
    assert finished.acq == "good" and finished.complete


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
async def test_acq_started_waits_for_a_full_stream_and_failures_are_logged_rate_limited(
    config, js, tmp_path
):
    """The stream refuses every publish (JetStream full: `max_msgs` reached, discard new)
    when an acquisition appears: the watcher does not register it, logs the failure a few
    times, not once per file and tick, and announces nothing; once the stream takes events
    again `acq_started` is published, then every tile, and the acquisition finishes."""
    stream = await js.stream_info(STREAM)
    await js.publish("tp.attempt.filler._._", b"{}")
    await js.update_stream(
        dataclasses.replace(stream.config, max_msgs=1, discard=DiscardPolicy.NEW)
    )
    manifest = tiny_manifest("full", 2, 2)
    cfg = watcher_config(config, settle_s=0.1)
    with Services(cfg, tmp_path / "svc", ["watcher"]) as services:
        await wait_for(lambda: services.metrics("watcher"), timeout=30)
        write_manifest(manifest, config.roots.raw / "full")
        for coord in manifest.coords():
            write_tile_file(config.roots.raw / "full" / manifest.path_of(coord), payload(manifest))

        await asyncio.sleep(8.0)  # a few hundred ticks of the watcher
        warnings = [r for r in services.log("watcher") if r.get("level") in ("warning", "error")]
        assert 1 <= len(warnings) <= 4, warnings
        assert "maximum messages" in warnings[0]["error"], warnings[0]
        failures = services.metric("watcher", "tilepipe_watcher_publish_failures_total")
        assert 1 <= failures <= 40, failures  # paced by the backoff, not once per file and tick
        assert await count(js, "acq_started") == 0 and await count(js, "tile_arrived") == 0
        await js.update_stream(stream.config)
        await wait_for(lambda: count(js, "acq_finished"), timeout=60)
        assert services.alive("watcher")
    messages = await stream_messages(js, "tp.*.full.>")
    kinds = [m.subject.split(".")[1] for m in messages]
    assert kinds[0] == "acq_started" and kinds.count("acq_started") == 1, kinds
    assert kinds.count("tile_arrived") == 4 and kinds[-1] == "acq_finished"


# ------------------------------------------- (14) rescans, rewrites, clocks; (12) stalls
async def test_rescans_count_no_duplicates_only_real_rewrites(config, js, tmp_path):
    """Announced tiles seen again by every rescan are neither logged nor counted; a tile
    rewritten after its event is logged and counted once, however many rescans follow."""
    manifest = tiny_manifest("again", 2, 2)
    acq_dir = config.roots.raw / "again"
    write_manifest(manifest, acq_dir)
    files = [acq_dir / manifest.path_of(c) for c in manifest.coords()]
    for path in files:
        write_tile_file(path, payload(manifest))
    with Services(watcher_config(config), tmp_path / "svc", ["watcher"]) as services:
        await wait_for(lambda: count(js, "acq_finished"), timeout=60)

        def duplicates() -> float:
            return services.metric("watcher", "tilepipe_watcher_files_total", outcome="duplicate")

        await asyncio.sleep(2.5)  # five rescans
        assert duplicates() == 0 and records(services, "watcher", "file_skipped") == []
        write_tile_file(files[1], payload(manifest))  # a real rewrite
        await wait_for(lambda: duplicates() == 1, timeout=30)
        await asyncio.sleep(2.0)
        assert duplicates() == 1
        (skipped,) = records(services, "watcher", "file_skipped")
    assert skipped["outcome"] == "duplicate" and skipped["path"].endswith(files[1].name)
    assert skipped["level"] == "warning" and skipped["acq"] == "again"
    assert await count(js, "tile_arrived") == 4


async def test_a_tile_dated_in_the_future_settles_by_the_local_clock(config, js, tmp_path):
    """A tile whose mtime is an hour ahead (a clock skew between the acquisition PC and the
    file server) is announced after `settle_s` by the watcher's clock, and logged once."""
    manifest = tiny_manifest("skew", 1, 1)
    acq_dir = config.roots.raw / "skew"
    write_manifest(manifest, acq_dir)
    with Services(watcher_config(config), tmp_path / "svc", ["watcher"]) as services:
        await wait_for(lambda: services.metrics("watcher"), timeout=30)
        tile = acq_dir / manifest.path_of(next(manifest.coords()))
        outside = tmp_path / "outside.nii"  # dated first, then moved in (same filesystem)
        write_tile_file(outside, payload(manifest))
        ahead = time.time() + 3600
        os.utime(outside, (ahead, ahead))
        tile.parent.mkdir(parents=True, exist_ok=True)
        outside.rename(tile)
        written = time.time()
        await wait_for(lambda: count(js, "tile_arrived"), timeout=10)
        latency = time.time() - written
        await asyncio.sleep(1.5)
        notes = records(services, "watcher", "file_mtime_in_future")
    assert latency < 5.0
    assert len(notes) == 1 and notes[0]["ahead_s"] > 3500 and notes[0]["acq"] == "skew"
    (event,) = await events(js, "tile_arrived")
    assert event.completed_at.timestamp() < ahead - 3000  # the local time it settled


async def test_a_partial_file_that_stops_growing_is_logged_once(config, js, tmp_path):
    """A tile file stuck below its size (the writer died) is reported once, with its size,
    when it has not grown for `stalled_s`, however many ticks and rescans follow."""
    manifest = tiny_manifest("stall", 1, 2)
    acq_dir = config.roots.raw / "stall"
    write_manifest(manifest, acq_dir)
    cfg = watcher_config(config, stalled_s=1.0)
    with Services(cfg, tmp_path / "svc", ["watcher"]) as services:
        await wait_for(lambda: services.metrics("watcher"), timeout=30)
        first, second = (acq_dir / manifest.path_of(c) for c in manifest.coords())
        data = payload(manifest)
        write_tile_file(first, data[: len(data) // 2])
        write_tile_file(second, data)
        await wait_for(lambda: records(services, "watcher", "file_stalled"), timeout=15)
        await asyncio.sleep(3.0)
        stalled = records(services, "watcher", "file_stalled")
    assert len(stalled) == 1, stalled
    assert stalled[0]["path"] == "stall/" + manifest.path_of(next(manifest.coords()))
    assert stalled[0]["size_bytes"] == len(data) // 2 and stalled[0]["expected_bytes"] == len(data)
    assert stalled[0]["level"] == "warning" and stalled[0]["acq"] == "stall"
    assert await count(js, "tile_arrived") == 1


# ------------------------------------------------------- (12) a late tile after finish
async def test_a_tile_arriving_after_finish_is_no_longer_listed_missing(config, js, tmp_path):
    """`tilepipe finish` declares two tiles missing; when one arrives after all, the watcher
    publishes `acq_finished` again listing only the other, and `tilepipe status` shows only
    that one missing; when the last arrives the acquisition is finished complete."""
    manifest = tiny_manifest("late", 2, 2)
    acq_dir = config.roots.raw / "late"
    write_manifest(manifest, acq_dir)
    coords = list(manifest.coords())
    for coord in coords[:2]:
        write_tile_file(acq_dir / manifest.path_of(coord), payload(manifest))

    async def missing() -> list[str]:
        status = await asyncio.to_thread(tilepipe, "status", "late", "--json", config=config)
        return json.loads(status.stdout)["missing_tiles"]

    with Services(watcher_config(config), tmp_path / "svc", ["watcher"]):
        await wait_for(lambda: _at_least(js, "tile_arrived", 2), timeout=60)
        finish = await asyncio.to_thread(tilepipe, "finish", "late", config=config)
        assert finish.returncode == 0 and "2 missing" in finish.stdout, finish.stderr
        assert await missing() == sorted(f"0.{c.token()}" for c in coords[2:])
        await asyncio.sleep(1.5)  # the watcher's rescans see the operator's acq_finished
        write_tile_file(acq_dir / manifest.path_of(coords[2]), payload(manifest))
        await wait_for(lambda: _at_least(js, "acq_finished", 2), timeout=30)
        assert await missing() == [f"0.{coords[3].token()}"]
        write_tile_file(acq_dir / manifest.path_of(coords[3]), payload(manifest))
        await wait_for(lambda: _at_least(js, "acq_finished", 3), timeout=30)
    finished = await events(js, "acq_finished")
    assert [len(e.missing) for e in finished] == [2, 1, 0], finished
    assert [e.tiles_arrived for e in finished] == [2, 3, 4]
    assert finished[1].missing == [coords[3]] and finished[-1].complete
    assert await missing() == []


# ------------------------------------------------------------------- (7) the sweeper
HOST = socket.gethostname()


def temporary(parent: Path, final: str, pid: int, host: str = HOST, kind: str = "tmp") -> Path:
    """A writer's temporary directory beside `final`, named as services/io/atomic.py names it."""
    from services.io.atomic import temp_name

    path = temp_name(parent / final, kind=kind, pid=pid, host=host)
    (path / "c").mkdir(parents=True)
    (path / "zarr.json").write_text("{}")
    return path


async def test_sweeper_removes_dead_writers_temporaries_never_live_ones(config, js, tmp_path):
    """Temporaries left in the work and output roots by a writer that died are removed at a
    service's start-up; a live writer's stay until it is gone (the periodic sweep), another
    host's stay until older than `max_age_s`; final names are never touched."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen(["sleep", "120"])
    work, out = config.roots.work, config.roots.output
    tiles = work / "acq" / "converted" / "slice0000"
    mosaics = out / "acq" / "mosaics"
    final = tiles / "m0-r0-c0.zarr"
    (final / "c").mkdir(parents=True)
    (final / "zarr.json").write_text("{}")
    keep_names = [tiles / ".keep", tiles / ".m0-r0-c0.zarr.tmp", mosaics / "notes.tmp-1-2"]
    for path in keep_names:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("not a temporary of a writer")
    gone = [
        temporary(tiles, "m0-r0-c1.zarr", dead.pid),
        temporary(mosaics, "slice0000-m0.ome.zarr", dead.pid),
        temporary(mosaics, "slice0001-m0.ome.zarr", dead.pid, kind="old"),
        temporary(final, "zarr.json", dead.pid),
    ]
    old_elsewhere = temporary(tiles, "m0-r1-c1.zarr", 1, host="elsewhere")
    past = time.time() - 3 * 86400
    os.utime(old_elsewhere, (past, past))
    later = temporary(tiles, "m0-r1-c0.zarr", live.pid)
    young_elsewhere = temporary(mosaics, "slice0002-m0.ome.zarr", 1, host="elsewhere")
    cfg = fault_config(config, ("convert",)).model_copy(
        update={"sweep": config.sweep.model_copy(update={"interval_s": 0.5, "max_age_s": 86400})}
    )
    await provision(cfg)
    try:
        with Services(cfg, tmp_path / "svc", ["convert"]) as services:
            await wait_for(lambda: not any(p.exists() for p in [*gone, old_elsewhere]), timeout=60)
            assert later.exists() and young_elsewhere.exists()
            live.kill()
            live.wait()
            await wait_for(lambda: not later.exists(), timeout=30)
            swept = records(services, "convert", "temporaries_swept")
    finally:
        live.kill()
    assert young_elsewhere.exists() and (final / "zarr.json").exists() and (final / "c").is_dir()
    assert all(p.exists() for p in keep_names)
    assert sum(r["removed"] for r in swept) == 6 and swept[0]["level"] == "info", swept


def test_sweep_keeps_the_temporaries_this_process_is_writing(tmp_path):
    """In one process: a temporary of an output being written is kept, the same process's
    abandoned one (a failed attempt whose clean-up did not finish) is removed."""
    from services.io.atomic import atomic_directory, sweep_temporaries

    target = tmp_path / "work" / "acq" / "converted" / "slice0000" / "m0-r0-c0.zarr"
    abandoned = temporary(target.parent, "m0-r0-c1.zarr", os.getpid())
    with atomic_directory(target) as tmp:
        tmp.mkdir()
        (tmp / "zarr.json").write_text("{}")
        removed = sweep_temporaries([tmp_path / "work", tmp_path / "output"], max_age_s=86400)
        assert tmp.exists() and not abandoned.exists() and removed == [abandoned]
    assert (target / "zarr.json").exists()


# ---------------------------------------------------------- (2) SIGTERM, stuck handler
async def test_sigterm_stops_a_service_whose_handler_is_stuck_in_a_read(config, js, tmp_path):
    """A handler blocked in a read that never returns (a FIFO without a writer, a hung
    network mount) does not keep the process alive: after SIGTERM it exits within its drain
    timeout, and the delivery it held comes back to the next process."""
    fifo = tmp_path / "never-written"
    os.mkfifo(fifo)
    marks = tmp_path / "marks"
    stuck = StageSettings(
        impl="tests.stages_for_tests:StuckReader",
        drain_timeout_s=2.0,
        ack_wait_s=30.0,
        options={"fifo": str(fifo), "marker_dir": str(marks)},
    )
    cfg = config.model_copy(update={"stages": {"stuck": stuck}})
    await provision(cfg)
    with Services(cfg, tmp_path / "svc", ["stuck"]) as services:
        await wait_for(lambda: js.consumer_info(STREAM, "stuck"), timeout=60)
        await publish_event(
            js,
            TileArrived(
                acq="stuck",
                tile=TileCoord(slice=0, row=0, col=0),
                path="stuck/t.nii",
                manifest="stuck/manifest.toml",
                size_bytes=1,
                completed_at=utcnow(),
            ),
        )
        await wait_for(lambda: (marks / "start-m0-r0-c0").exists(), timeout=60)
        proc = services.child("stuck").proc
        asked = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.to_thread(proc.wait, 15)
        except subprocess.TimeoutExpired:
            services.kill9("stuck")
            raise AssertionError("still running 15 s after SIGTERM") from None
        took = time.monotonic() - asked
        log = services.log("stuck")
    assert code == 0 and took < 2.0 + 8.0, took
    assert any(r.get("event") == "drain_timeout" for r in log)
    assert any(r.get("event") == "stuck_threads_abandoned" for r in log), log[-3:]
    info = await js.consumer_info(STREAM, "stuck")
    assert info.num_ack_pending == 1  # not acknowledged: redelivered after ack_wait
