"""Faults a multi-day acquisition meets in a lab, injected for real: every service is a
`tilepipe run` process (supervised as under `tilepipe up`), the server a real nats-server, the
files real files; kills are SIGKILL, a full disk is a small tmpfs mount.

Which test proves which failure mode is listed in docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from messages import TileArrived, TileCoord, decode_event, utcnow
from services.core.config import Config
from services.core.manifest import Manifest
from services.io.atomic import is_complete
from services.io.layout import converted_path, mosaic_path, products_path, volume_path
from services.io.omezarr import open_level, read_multiscale
from services.io.volume import Volume
from services.local.init import provision
from services.local.simulate import PhantomParams, simulate, write_manifest, write_tile_file
from services.ops.control import pause, resume
from services.runtime.bus import publish_event
from tests.conftest import stream_messages, tilepipe, wait_for
from tests.procs import ALL_STAGES, TILE_STAGES, Services, fault_config, tiny_acquisition

TILE_KINDS = ("tile_arrived", "tile_converted", "tile_processed")
PARAMS = PhantomParams(scatterers=6, scatterer_spacing_um=30.0)
STREAM = "TILEPIPE"


async def events(js, kind: str, acq: str = "*") -> list:
    return [decode_event(m.data) for m in await stream_messages(js, f"tp.{kind}.{acq}.>")]


async def per_subject(js, subjects: str) -> dict[str, int]:
    """Messages in the stream per subject (the exact count, duplicates would show as 2)."""
    info = await js.stream_info(STREAM, subjects_filter=subjects)
    return dict(info.state.subjects or {})


async def holds_delivery(js, stage: str) -> bool:
    """The stage has an input delivered and not yet acknowledged (it is mid-tile)."""
    info = await js.consumer_info(STREAM, stage)
    return (info.num_ack_pending or 0) > 0


async def kill_mid_delivery(js, services: Services, stage: str, tries: int = 8) -> int:
    """kill -9 `stage` while it holds an unacknowledged delivery; the supervisor restarts it.

    The proof the kill landed mid-tile: after the process is dead the server still counts
    the delivery as unacknowledged. Returns the number of kills it took (another try on the
    next input when the handler finished between the poll and the kill)."""
    for attempt in range(1, tries + 1):
        await wait_for(lambda: holds_delivery(js, stage), timeout=180, interval=0.01)
        services.kill9(stage)
        landed = await holds_delivery(js, stage)
        services.restart_crashed()
        if landed:
            return attempt
    raise AssertionError(f"no kill of {stage} landed while it held a delivery in {tries} tries")


def handled_attempts(services: Services, stage: str) -> list[int]:
    return [r["attempt"] for r in services.log(stage) if r.get("event") == "event_handled"]


def assert_tile_outputs_complete(config: Config, manifest: Manifest) -> None:
    """Every tile's converted recipe and products group is complete and readable."""
    raw = manifest.raw
    for tile in manifest.coords():
        converted = config.roots.work / converted_path(manifest.id, tile)
        products = config.roots.work / products_path(manifest.id, tile)
        assert is_complete(converted) and is_complete(products), tile
        recipe = zarr.open_group(str(converted), mode="r").attrs
        assert recipe["layout"]["alines"] == raw.alines and recipe["calibration"], tile
        group = zarr.open_group(str(products), mode="r")
        assert group.attrs["raw_sha256"].startswith("sha256:")
        aip = np.asarray(group["aip"][:])
        assert aip.shape == (raw.bscans, raw.alines) and np.isfinite(aip).all()


def assert_mosaic_valid(config: Config, acq: str, slice_index: int) -> np.ndarray:
    store = config.roots.output / mosaic_path(acq, slice_index, 0)
    assert read_multiscale(store)["channel_names"][0] == "aip"
    level0 = np.asarray(open_level(store, 0)[:])
    assert np.isfinite(level0[0]).mean() > 0.5
    return level0


def hidden_leftovers(root: Path) -> list[Path]:
    """Temporary names a crash may leave (never under a final name)."""
    return sorted(p for p in root.rglob(".*tmp-*"))


# ------------------------------------------------------------------------------- kill -9
async def test_kill9_each_stage_mid_tile_redelivered_complete_not_duplicated(config, js, tmp_path):
    """Every stage process is SIGKILLed while it holds a delivery; the supervisor restarts
    it, the delivery comes back after `ack_wait`, and every output exists once and whole."""
    bucket = tmp_path / "bucket"
    stages = (*ALL_STAGES, "upload")
    cfg = fault_config(
        config,
        stages,
        per_stage={"upload": {"enabled": True, "options": {"url": f"file://{bucket}"}}},
    )
    manifest = tiny_acquisition("kill", slices=3)
    path = write_manifest(manifest, config.roots.raw / "kill")
    await asyncio.to_thread(simulate, path, manifest, 0, params=PARAMS)
    await provision(cfg)
    downstream = stages[1:]
    for stage in downstream:  # let each stage's backlog build up, kill it while it works
        await pause(js, STREAM, stage)
    kills = {}
    with Services(cfg, tmp_path / "svc", ["watcher", *stages]) as services:
        kills["convert"] = await kill_mid_delivery(js, services, "convert")
        for stage in downstream:
            if stage in ("register", "upload"):  # inputs: every mosaic / every product

                async def stitched() -> bool:
                    return len(await events(js, "slice_stitched")) >= manifest.lattice.slices

                await wait_for(stitched, timeout=240)
            await resume(js, STREAM, stage)
            kills[stage] = await kill_mid_delivery(js, services, stage)

        async def all_done() -> bool:
            registered = len(await events(js, "slice_registered"))
            uploaded = len(await events(js, "artifact_uploaded"))
            if registered != manifest.lattice.slices or uploaded < (
                manifest.tiles + 2 * manifest.lattice.slices
            ):
                return False
            # a mosaic also sends its NIfTI copies and previews: done when upload is drained
            info = await js.consumer_info(STREAM, "upload")
            return info.num_pending == 0 and info.num_ack_pending == 0

        await wait_for(all_done, timeout=240, interval=0.5)
        for stage in stages:  # drained: nothing left unacknowledged or waiting
            info = await js.consumer_info(STREAM, stage)
            assert info.num_pending == 0 and info.num_ack_pending == 0, (stage, info)
        attempts = {stage: handled_attempts(services, stage) for stage in stages}
        restarts = list(services.messages)
    for stage in stages:  # the killed delivery came back to the restarted process
        assert max(attempts[stage]) >= 2, (stage, attempts[stage])
    assert len(restarts) == sum(kills.values()), restarts

    tiles = manifest.tiles
    for kind in ("tile_arrived", "tile_converted", "tile_processed"):
        counts = await per_subject(js, f"tp.{kind}.kill.>")
        assert len(counts) == tiles and set(counts.values()) == {1}, (kind, counts)
    for kind in ("slice_stitched", "slice_registered"):
        counts = await per_subject(js, f"tp.{kind}.kill.>")
        assert len(counts) == manifest.lattice.slices and set(counts.values()) == {1}, counts
    uploaded = await events(js, "artifact_uploaded")
    announced = [e.msg_id() for e in uploaded]  # subject and product
    exports = sum(len(e.exports) for e in await events(js, "slice_stitched"))
    assert exports > 0  # each mosaic's NIfTI copies and previews go up too
    expected = tiles + 2 * manifest.lattice.slices + exports
    assert len(announced) == len(set(announced)) == expected
    assert await events(js, "stage_failed") == []

    assert_tile_outputs_complete(config, manifest)
    for s in range(manifest.lattice.slices):
        assert_mosaic_valid(config, "kill", s)
    volume = Volume(config.roots.output / volume_path("kill"))
    assert sorted(volume.planes()) == list(range(manifest.lattice.slices))
    for z in range(manifest.lattice.slices):
        assert np.isfinite(volume.read_plane(z)).any()
    for e in uploaded:  # every uploaded store is complete in the bucket (its marker last)
        target = Path(e.key.removeprefix("file://"))
        assert target.is_relative_to(bucket), e.key
        assert target.exists(), e.key
        if target.is_dir():
            assert (target / ".tilepipe-complete.json").exists(), e.key


# --------------------------------------------------------------------------- helpers
def write_tiles(manifest_path: Path, manifest: Manifest, coords, rate: float = 0.0) -> None:
    """Write the raw files of `coords` in the given order (the simulator's data), at `rate`."""
    from services.io.rawio import encode_tile
    from services.local.simulate import Simulator

    sim = Simulator(manifest, PARAMS)
    for i, coord in enumerate(coords):
        if rate and i:
            time.sleep(1.0 / rate)
        payload = encode_tile(sim.tile_raw(sim.truth.tile(coord)), manifest.raw)
        write_tile_file(manifest_path.parent / manifest.path_of(coord), payload)


async def count_kind(js, kind: str, acq: str = "*") -> int:
    counts = await per_subject(js, f"tp.{kind}.{acq}.>")
    return sum(counts.values())


async def assert_each_tile_once(js, acq: str, tiles: int, kinds=TILE_KINDS) -> None:
    for kind in kinds:
        counts = await per_subject(js, f"tp.{kind}.{acq}.>")
        assert len(counts) == tiles and set(counts.values()) == {1}, (kind, counts)


# ------------------------------------------------------------------- server restarted
async def test_nats_server_killed_and_restarted_mid_acquisition(config, js, nats_server, tmp_path):
    """kill -9 of nats-server while the microscope writes and every service works: after it
    comes back every tile still reaches the end, once, and every service reconnected."""
    names = ["watcher", *TILE_STAGES]
    cfg = fault_config(config, TILE_STAGES, backoff_s=[1.0, 2.0, 4.0])
    manifest = tiny_acquisition("srv", slices=2)
    path = write_manifest(manifest, config.roots.raw / "srv")
    await provision(cfg)
    with Services(cfg, tmp_path / "svc", names) as services:

        async def fetching() -> bool:  # every stage connected and waiting on its consumer
            infos = [await js.consumer_info(STREAM, name) for name in TILE_STAGES]
            return all((info.num_waiting or 0) >= 1 for info in infos)

        await wait_for(fetching, timeout=120, interval=0.5)
        writer = asyncio.create_task(
            asyncio.to_thread(simulate, path, manifest, 1.0, params=PARAMS)
        )
        # the first tile announced: the acquisition is under way (8 tiles take >= 7 s to write;
        # waiting for a processed tile instead made the kill land after the last write on a
        # loaded 2-core CI machine)
        await wait_for(lambda: count_kind(js, "tile_arrived"), timeout=120)
        assert not writer.done()  # mid-acquisition
        nats_server.kill()
        await asyncio.sleep(1.0)  # tiles keep landing while the server is down
        nats_server.start()
        await writer

        async def stitched() -> bool:
            return await count_kind(js, "slice_stitched") == manifest.lattice.slices

        await wait_for(stitched, timeout=240, interval=0.5)
        reconnects = {
            name: services.metric(
                name, "tilepipe_nats_reconnects_total", service=f"tilepipe-{name}"
            )
            for name in names
        }
        assert all(services.alive(name) for name in names), services.messages
    assert all(n >= 1 for n in reconnects.values()), reconnects
    await assert_each_tile_once(js, "srv", manifest.tiles)
    assert await events(js, "stage_failed") == []
    assert_tile_outputs_complete(config, manifest)
    for s in range(manifest.lattice.slices):
        assert_mosaic_valid(config, "srv", s)


# ------------------------------------------------------------------------- disk full
@contextlib.contextmanager
def small_filesystem(mountpoint: Path, size_mb: int = 4):
    """A small real filesystem mounted at `mountpoint`: tmpfs, else a loop-mounted ext4 image;
    skips (with the reasons) where this process may not mount."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    tmpfs = ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(mountpoint)]
    proc = subprocess.run(tmpfs, capture_output=True, text=True)
    tried = [f"`{' '.join(tmpfs)}`: {proc.stderr.strip() or proc.returncode}"]
    if proc.returncode != 0 and shutil.which("mkfs.ext4"):
        image = mountpoint.with_suffix(".img")
        with open(image, "wb") as fh:
            fh.truncate(size_mb << 20)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], capture_output=True, check=True)
        loop = ["mount", "-o", "loop", str(image), str(mountpoint)]
        proc = subprocess.run(loop, capture_output=True, text=True)
        tried.append(f"`{' '.join(loop)}`: {proc.stderr.strip() or proc.returncode}")
    if proc.returncode != 0:
        pytest.skip("cannot mount a small filesystem here (needs root): " + "; ".join(tried))
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


def fill(root: Path) -> Path:
    """Write a filler file until the filesystem is full (ENOSPC)."""
    filler = root / "filler.bin"
    block = b"\xff" * 65536
    with open(filler, "wb") as fh:
        try:
            while True:
                fh.write(block)
                fh.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    with contextlib.suppress(OSError):
        while True:  # the last few bytes
            with open(filler, "ab") as fh:
                fh.write(b"\xff" * 512)
    return filler


async def test_output_root_full_delays_and_retries_then_recovers(config, js, tmp_path):
    """The output root (a 4 MiB tmpfs) is full when the mosaic is due: stitch keeps the input
    and calls its handler again after a pause (counted, without using up the input's
    deliveries: with `max_deliver = 2` it would otherwise give up), never leaves a partial
    mosaic, the free space gauge shows the root full (TilepipeDataRootFull), and once space is
    freed the mosaic is written."""
    with small_filesystem(config.roots.output) as output:
        filler = fill(output)
        cfg = fault_config(
            config, TILE_STAGES, per_stage={"stitch": {"max_deliver": 2, "backoff_s": [0.5]}}
        )
        manifest = tiny_acquisition("full", slices=1)
        path = write_manifest(manifest, config.roots.raw / "full")
        await provision(cfg)
        with Services(cfg, tmp_path / "svc", ["watcher", *TILE_STAGES]) as services:
            await asyncio.to_thread(simulate, path, manifest, 0, params=PARAMS)

            def retries() -> float:
                return services.metric("stitch", "tilepipe_no_space_waits_total", stage="stitch")

            await wait_for(lambda: retries() >= 3, timeout=180, interval=0.5)
            labels = {"root": "output", "path": str(output)}
            free = services.metric("stitch", "tilepipe_data_root_free_bytes", **labels)
            size = services.metric("stitch", "tilepipe_data_root_size_bytes", **labels)
            assert size > 0 and free / size < 0.03  # the TilepipeDataRootFull condition
            log = services.log("stitch")
            errors = [r["error"] for r in log if r.get("event") == "no_space_waiting"]
            assert errors and all("No space left on device" in e for e in errors), errors
            assert await count_kind(js, "slice_stitched") == 0
            assert await events(js, "stage_failed") == []
            mosaic = output / mosaic_path("full", 0, 0)
            assert not mosaic.exists() and hidden_leftovers(output) == []

            filler.unlink()  # the operator makes room
            await wait_for(lambda: count_kind(js, "slice_stitched"), timeout=120, interval=0.5)
            assert retries() >= 3
        assert_mosaic_valid(config, "full", 0)
        assert hidden_leftovers(output) == []
        assert await events(js, "stage_failed") == []
        await assert_each_tile_once(js, "full", manifest.tiles)


# ---------------------------------------------------------------- corrupt / truncated
def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_corrupt_and_truncated_raw_tiles_fail_visibly_and_the_slice_goes_on(
    config, js, tmp_path
):
    """A tile of the right size with garbage in it fails convert at once (a RawFormatError is
    permanent: one attempt, no retries), visible in status and history; a truncated tile (the
    microscope died mid-write) is never announced and is declared missing by `tilepipe
    finish`. Raw files stay untouched, the rest of the slice is processed and stitched with
    both holes marked."""
    manifest = tiny_acquisition("bad", slices=1, rows=2, cols=3)
    path = write_manifest(manifest, config.roots.raw / "bad")
    coords = list(manifest.coords())
    corrupt, truncated = coords[1], coords[4]
    good = [c for c in coords if c not in (corrupt, truncated)]
    await asyncio.to_thread(write_tiles, path, manifest, good)
    acq_dir = path.parent
    (acq_dir / manifest.path_of(corrupt)).write_bytes(os.urandom(manifest.raw.expected_bytes))
    whole = (acq_dir / manifest.path_of(good[0])).read_bytes()
    (acq_dir / manifest.path_of(truncated)).write_bytes(whole[: len(whole) // 2])
    raw_files = sorted(acq_dir.rglob("tile_*"))
    before = {p: sha(p) for p in raw_files}
    cfg = fault_config(config, TILE_STAGES, max_deliver=3, backoff_s=[0.5, 1.0])
    await provision(cfg)
    with Services(cfg, tmp_path / "svc", ["watcher", *TILE_STAGES]) as services:

        async def settled() -> bool:
            failed = await count_kind(js, "stage_failed")
            return failed == 1 and await count_kind(js, "tile_processed") == len(good)

        await wait_for(settled, timeout=180, interval=0.5)
        assert services.metric("watcher", "tilepipe_watcher_pending_files") >= 1
        assert await count_kind(js, "slice_stitched") == 0  # the slice waits for its tiles
        finish = await asyncio.to_thread(tilepipe, "finish", "bad", config=config)
        assert finish.returncode == 0 and "1 missing" in finish.stdout, finish.stderr
        stitched = await wait_for(lambda: events(js, "slice_stitched"), timeout=120)
    (failed,) = await events(js, "stage_failed")
    assert failed.stage == "convert" and failed.tile == corrupt and failed.attempts == 1
    assert "NIfTI" in failed.error
    assert {(t.row, t.col) for t in stitched[0].missing} == {
        (corrupt.row, corrupt.col),
        (truncated.row, truncated.col),
    }
    history = await asyncio.to_thread(
        tilepipe, "history", "bad", "0", corrupt.token(), config=config
    )
    assert history.returncode == 0 and "failed" in history.stdout and "convert" in history.stdout
    assert "retry" not in history.stdout, history.stdout  # failed on its first attempt
    status = await asyncio.to_thread(tilepipe, "status", "bad", "--json", config=config)
    report = json.loads(status.stdout)
    assert report["failed_tiles"] == [f"0.{corrupt.token()}"]
    assert report["tiles"]["tile_processed"] == len(good)
    assert report["stages"]["convert"]["failed"] == 1
    assert {p: sha(p) for p in raw_files} == before  # raw data untouched
    assert not (config.roots.work / converted_path("bad", corrupt)).exists()
    assert_mosaic_valid(config, "bad", 0)


# ------------------------------------------------------------------------- the watcher
async def test_watcher_killed_during_a_burst_announces_every_tile_once(config, js, tmp_path):
    """kill -9 of the watcher process while 400 files land; the restarted watcher catches up
    and every tile is announced exactly once, the acquisition finished once."""
    from tests.test_watcher import payload, tiny_manifest

    manifest = tiny_manifest("burst", 20, 20, settle_s=0.2)
    acq_dir = config.roots.raw / "burst"
    write_manifest(manifest, acq_dir)
    data = payload(manifest)

    def write_all() -> None:
        for coord in manifest.coords():
            write_tile_file(acq_dir / manifest.path_of(coord), data)
            time.sleep(0.01)

    await provision(config)
    with Services(config, tmp_path / "svc", ["watcher"]) as services:
        writer = asyncio.create_task(asyncio.to_thread(write_all))
        await wait_for(lambda: _at_least(js, "tile_arrived", 20), timeout=60, interval=0.02)
        assert not writer.done()
        services.kill9("watcher")
        services.restart_crashed()
        await writer
        await wait_for(lambda: count_kind(js, "acq_finished"), timeout=120, interval=0.5)
        assert services.messages and "restarting" in services.messages[0]
    await assert_each_tile_once(js, "burst", 400, kinds=("tile_arrived",))
    for kind in ("acq_started", "acq_finished"):
        assert await count_kind(js, kind) == 1


async def _at_least(js, kind: str, n: int) -> bool:
    return await count_kind(js, kind) >= n


async def test_same_file_written_twice_is_announced_once(config, js, tmp_path):
    """A tile rewritten before it settled is announced once, with its final write time; a
    tile rewritten after its event (same or different bytes) is not announced again: the
    rewrite is logged and counted as `duplicate` (reprocessing is `tilepipe replay`)."""
    from tests.test_watcher import payload, tiny_manifest

    manifest = tiny_manifest("twice", 1, 2, settle_s=1.0)
    acq_dir = config.roots.raw / "twice"
    write_manifest(manifest, acq_dir)
    first, second = (acq_dir / manifest.path_of(c) for c in manifest.coords())
    data = payload(manifest)
    await provision(config)
    with Services(config, tmp_path / "svc", ["watcher"]) as services:
        await wait_for(lambda: services.metrics("watcher"), timeout=30)
        write_tile_file(first, data)
        await wait_for(lambda: count_kind(js, "tile_arrived"), timeout=30)
        write_tile_file(second, data)
        write_tile_file(second, payload(manifest))  # rewritten within the settle interval
        final_mtime = second.stat().st_mtime
        await wait_for(lambda: _at_least(js, "tile_arrived", 2), timeout=30)
        before = services.metric("watcher", "tilepipe_watcher_files_total", outcome="duplicate")
        write_tile_file(first, data)  # same bytes again
        write_tile_file(second, payload(manifest))  # new content
        rewritten = {str(p.relative_to(config.roots.raw)) for p in (first, second)}

        def both_skipped() -> bool:  # each rewrite considered and dropped (logged once a path)
            log = services.log("watcher")
            return {r["path"] for r in log if r.get("event") == "file_skipped"} == rewritten

        await wait_for(both_skipped, timeout=30)
        duplicates = services.metric("watcher", "tilepipe_watcher_files_total", outcome="duplicate")
    assert duplicates >= before + 2
    await assert_each_tile_once(js, "twice", 2, kinds=("tile_arrived",))
    late = next(e for e in await events(js, "tile_arrived") if e.tile.col == 1)
    assert abs(late.completed_at.timestamp() - final_mtime) < 0.01
    skipped = [r for r in services.log("watcher") if r.get("event") == "file_skipped"]
    assert {r["outcome"] for r in skipped} == {"duplicate"}


# ------------------------------------------------- out of order, and a tile after finish
async def test_tiles_out_of_order_and_a_tile_after_finish(config, js, tmp_path):
    """Tiles land in reverse order (slice 1 before slice 0); one tile of slice 0 is late: the
    operator declares the acquisition finished, slice 0 is stitched with a hole and
    registered; then the tile arrives, is processed, and slice 0 is stitched again without
    the hole and registered again; a replay of stitch (the operator's acq_finished among its
    inputs) keeps the tile."""
    manifest = tiny_acquisition("late", slices=2)
    path = write_manifest(manifest, config.roots.raw / "late")
    coords = list(reversed(list(manifest.coords())))
    late = next(c for c in coords if c.slice == 0 and (c.row, c.col) == (1, 0))
    cfg = fault_config(config, ALL_STAGES)
    await provision(cfg)
    with Services(cfg, tmp_path / "svc", ["watcher", *ALL_STAGES]):
        await asyncio.to_thread(write_tiles, path, manifest, [c for c in coords if c != late])

        async def one_slice_waits() -> bool:
            processed = await count_kind(js, "tile_processed") == manifest.tiles - 1
            return processed and await count_kind(js, "slice_stitched") == 1

        await wait_for(one_slice_waits, timeout=180, interval=0.5)
        assert [e.slice for e in await events(js, "slice_stitched")] == [1]
        finish = await asyncio.to_thread(tilepipe, "finish", "late", config=config)
        assert finish.returncode == 0, finish.stderr
        await wait_for(lambda: _at_least(js, "slice_registered", 2), timeout=120, interval=0.5)
        holed = next(e for e in await events(js, "slice_stitched") if e.slice == 0)
        assert [(t.row, t.col) for t in holed.missing] == [(late.row, late.col)]

        await asyncio.to_thread(write_tiles, path, manifest, [late])

        volume = Volume(config.roots.output / volume_path("late"))

        async def restitched() -> list:
            again = [e for e in await events(js, "slice_stitched", "late") if e.slice == 0]
            if len(again) < 2:
                return []
            plane = volume.planes().get(0, {})  # registered again from the new mosaic
            return again if plane.get("inputs", {}).get("inputs") == again[-1].inputs else []

        again = await wait_for(restitched, timeout=180, interval=0.5)

        async def registered_again() -> list:  # announced again: upload re-sends the plane
            found = [e for e in await events(js, "slice_registered", "late") if e.slice == 0]
            return found if len(found) == 2 else []

        reference = await wait_for(registered_again, timeout=60, interval=0.5)
        assert reference[0].basis != reference[1].basis

        # stitch handles the acquisition's inputs again, the operator's acq_finished last: its
        # declaration of the late tile as missing must not undo the tile
        replay = await asyncio.to_thread(
            tilepipe, "replay", "stitch", "--acq", "late", config=config
        )
        assert replay.returncode == 0, replay.stdout + replay.stderr

        async def replayed() -> list:
            info = await js.consumer_info(STREAM, "stitch")
            found = [e for e in await events(js, "slice_stitched", "late") if e.slice == 0]
            drained = info.num_pending == 0 and info.num_ack_pending == 0
            return found if drained and len(found) > len(again) else []

        restitched = await wait_for(replayed, timeout=120, interval=0.5)
        assert restitched[-1].missing == [], restitched[-1].missing
    finished = (await events(js, "acq_finished"))[0]
    arrived = next(e for e in await events(js, "tile_arrived") if e.tile == late)
    assert arrived.emitted_at > finished.emitted_at
    assert len(again) == 2 and again[-1].missing == [] and len(again[-1].positions) == 4
    await assert_each_tile_once(js, "late", manifest.tiles)
    attrs = zarr.open_group(str(config.roots.output / again[-1].path), mode="r").attrs
    assert attrs["tilepipe"]["missing_tiles"] == []
    assert np.isfinite(volume.read_plane(0)).any()
    assert await events(js, "stage_failed") == []


# ------------------------------------------------------------------ no failure loops
async def test_a_failure_never_triggers_a_failure(config, js, tmp_path):
    """One `tile_arrived` of an acquisition that does not exist ("ghost"): convert gives up
    on it (`stage_failed`); stitch, which consumes convert's failures, cannot act on one of
    an unknown acquisition and ignores it instead of failing in turn (its own failure would
    come back to it, and so on without end). Over the next seconds the log holds convert's
    failure and nothing else, and stitch has nothing left to do."""
    stages = ("convert", "stitch")
    cfg = fault_config(config, stages, max_deliver=2, backoff_s=[0.2])
    ghost = TileArrived(
        acq="ghost",
        tile=TileCoord(slice=0, row=1, col=0),
        path="ghost/tile.nii",
        manifest="ghost/manifest.toml",
        size_bytes=1,
        completed_at=utcnow(),
    )
    await provision(cfg)
    with Services(cfg, tmp_path / "svc", list(stages)) as services:
        await publish_event(js, ghost)
        await wait_for(lambda: count_kind(js, "stage_failed", "ghost"), timeout=120)

        async def stitch_got_it() -> bool:  # convert's failure, the stream's second event
            return (await js.consumer_info(STREAM, "stitch")).delivered.stream_seq >= 2

        await wait_for(stitch_got_it, timeout=120, interval=0.2)
        await asyncio.sleep(5.0)  # a loop publishes a failure every ~0.3 s
        failed = await events(js, "stage_failed", "ghost")
        info = await js.consumer_info(STREAM, "stitch")
        stitch_log = services.log("stitch")
    assert [(f.stage, f.input_type) for f in failed] == [("convert", "tile_arrived")]
    assert info.num_pending == 0 and info.num_ack_pending == 0
    assert not [r for r in stitch_log if r.get("event") in ("stage_failed", "handler_failed_final")]


# ------------------------------------------------------------------------------- soak
async def test_soak_short_run_backlog_bounded_every_tile_done(tmp_path):
    """`bench/soak.py` for under a minute at a rate well below capacity: every tile reaches
    the end, nothing fails or restarts, and the backlog does not grow (it drains to zero).
    Speed and memory figures are the benchmark's (docs/reliability.md), not asserted here."""
    from bench.soak import STAGES, soak

    report = await soak(
        0.75, 0.5, tmp_path / "soak", sample_s=2.0, drain_timeout_s=120, progress=lambda _: None
    )
    assert report.processed == report.tiles and report.registered == report.slices
    assert report.failed == 0 and report.restarts == []
    per_slice = report.tiles // report.slices
    half = len(report.samples) // 2
    for stage in STAGES:
        series = [s.backlog[stage] for s in report.samples]
        assert max(series[half:]) <= max(series[:half]) + per_slice, (stage, series)
    assert all(v > 0 for v in report.samples[-1].rss.values())
