"""The watcher against real files and a real nats-server."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from messages import decode_event
from services.local.simulate import write_manifest, write_tile_file
from tests.conftest import events, stream_messages, tilepipe, wait_for
from tests.watching import payload, tiny_manifest, watching

REPO = Path(__file__).resolve().parents[1]


def files_metric(outcome: str) -> float:
    return REGISTRY.get_sample_value("tilepipe_watcher_files_total", {"outcome": outcome}) or 0.0


async def arrived(js) -> list:
    return await events(js, "tile_arrived")


async def test_chunked_slow_write_emitted_once_after_completion(config, js):
    manifest = tiny_manifest("slow", 1, 2, settle_s=0.4)
    acq_dir = config.roots.raw / "slow"
    write_manifest(manifest, acq_dir)
    data = payload(manifest)
    async with watching(config, js):
        path = acq_dir / manifest.pattern.format(slice=0, index=0)
        writer = asyncio.create_task(
            asyncio.to_thread(
                write_tile_file, path, data, chunk_bytes=len(data) // 6 + 1, chunk_delay_s=0.3
            )
        )
        await asyncio.sleep(1.0)  # mid-write: partial file on disk, settle long passed for parts
        assert path.exists() and path.stat().st_size < len(data)
        assert await arrived(js) == []
        await writer
        done_at = path.stat().st_mtime
        events = await wait_for(lambda: arrived(js))
        await asyncio.sleep(1.0)
        events = await arrived(js)
    assert len(events) == 1
    event = events[0]
    assert event.path == "slow/slice000/tile_0000.nii" and event.size_bytes == len(data)
    assert event.manifest == "slow/manifest.toml"
    assert abs(event.completed_at.timestamp() - done_at) < 0.01
    assert (event.tile.row, event.tile.col) == (0, 0)


async def test_burst_of_2000_files_emitted_exactly_once(config, js):
    manifest = tiny_manifest("burst", 40, 50, settle_s=0.2)
    acq_dir = config.roots.raw / "burst"
    write_manifest(manifest, acq_dir)
    data = payload(manifest)

    def write_all() -> None:
        for coord in manifest.coords():
            write_tile_file(acq_dir / manifest.path_of(coord), data)

    async with watching(config, js):
        await asyncio.to_thread(write_all)

        async def finished():
            return await stream_messages(js, "tp.acq_finished.burst.>")

        await wait_for(finished, timeout=120)
        await asyncio.sleep(0.5)
    info = await js.stream_info("TILEPIPE", subjects_filter="tp.tile_arrived.burst.>")
    assert len(info.state.subjects) == 2000
    assert set(info.state.subjects.values()) == {1}
    done = [decode_event(m.data) for m in await stream_messages(js, "tp.acq_finished.>")]
    assert len(done) == 1 and done[0].complete and done[0].tiles_arrived == 2000


async def test_restart_mid_acquisition_reemits_nothing(config, js):
    manifest = tiny_manifest("restart", 4, 5, settle_s=0.1)
    acq_dir = config.roots.raw / "restart"
    write_manifest(manifest, acq_dir)
    data = payload(manifest)
    coords = list(manifest.coords())
    for coord in coords[:10]:
        write_tile_file(acq_dir / manifest.path_of(coord), data)
    async with watching(config, js):
        await wait_for(lambda: asyncio.create_task(_count(js, 10)))
    for coord in coords[10:]:
        write_tile_file(acq_dir / manifest.path_of(coord), data)
    emitted_before = files_metric("emitted")
    async with watching(config, js):
        await wait_for(lambda: stream_messages(js, "tp.acq_finished.restart.>"))
    assert files_metric("emitted") - emitted_before == 10
    info = await js.stream_info("TILEPIPE", subjects_filter="tp.tile_arrived.restart.>")
    assert len(info.state.subjects) == 20 and set(info.state.subjects.values()) == {1}
    started = await stream_messages(js, "tp.acq_started.restart.>")
    assert len(started) == 1


async def _count(js, n: int) -> bool:
    return len(await arrived(js)) == n


async def test_bad_names_counted_and_skipped(config, js):
    manifest = tiny_manifest("bad", 2, 2, settle_s=0.1)
    acq_dir = config.roots.raw / "bad"
    write_manifest(manifest, acq_dir)
    data = payload(manifest)
    before = {o: files_metric(o) for o in ("unmatched", "outside_lattice", "temporary", "sidecar")}
    async with watching(config, js):
        write_tile_file(acq_dir / "slice000" / "garbage.nii", data)
        write_tile_file(acq_dir / "slice000" / "tile_0099.nii", data)  # index outside 2x2
        write_tile_file(acq_dir / "slice005" / "tile_0000.nii", data)  # slice outside
        write_tile_file(config.roots.raw / "elsewhere" / "x.nii", data)  # no manifest
        write_tile_file(acq_dir / "slice000" / ".tile_0001.nii.part", data)
        write_tile_file(acq_dir / "notes.txt", b"operator notes")
        write_tile_file(acq_dir / "slice000" / "tile_0002.nii", data)
        events = await wait_for(lambda: arrived(js))
        await asyncio.sleep(0.5)
    assert [e.path for e in events] == ["bad/slice000/tile_0002.nii"]
    assert files_metric("unmatched") - before["unmatched"] >= 2
    assert files_metric("outside_lattice") - before["outside_lattice"] >= 2
    assert files_metric("temporary") - before["temporary"] >= 1
    assert files_metric("sidecar") - before["sidecar"] >= 1


async def test_rename_into_place_does_not_wait_for_settle(config, js):
    manifest = tiny_manifest("renamed", 1, 1, settle_s=30.0)
    acq_dir = config.roots.raw / "renamed"
    write_manifest(manifest, acq_dir)
    async with watching(config, js):
        t0 = time.monotonic()
        write_tile_file(
            acq_dir / manifest.path_of(next(manifest.coords())),
            payload(manifest),
            rename=True,
        )
        events = await wait_for(lambda: arrived(js), timeout=10)
        latency = time.monotonic() - t0
    assert len(events) == 1 and latency < 5.0


async def test_finish_declares_missing_tiles(config, js):
    manifest = tiny_manifest("part", 2, 2, settle_s=0.1)
    acq_dir = config.roots.raw / "part"
    write_manifest(manifest, acq_dir)
    data = payload(manifest)
    for coord in list(manifest.coords())[:3]:
        write_tile_file(acq_dir / manifest.path_of(coord), data)
    async with watching(config, js):
        await wait_for(lambda: _count(js, 3))
    proc = await asyncio.to_thread(tilepipe, "finish", "part", config=config)
    assert proc.returncode == 0, proc.stderr
    assert "3 tiles, 1 missing" in proc.stdout
    done = [decode_event(m.data) for m in await stream_messages(js, "tp.acq_finished.part.>")]
    assert len(done) == 1 and not done[0].complete
    assert [(t.row, t.col) for t in done[0].missing] == [(1, 0)]  # serpentine: index 3


@pytest.mark.parametrize("broken", [None, "manifest", "output"])
def test_check_preflight(config, tmp_path, broken):
    manifest = tiny_manifest("pre", 2, 2)
    path = write_manifest(manifest, config.roots.raw / "pre")
    if broken == "manifest":
        path.write_text(path.read_text().replace("rows = 2", "rows = -2"))
    if broken == "output":
        config.roots.output.rmdir()
    proc = tilepipe("check", str(path), config=config)
    if broken is None:
        assert proc.returncode == 0, proc.stdout
        assert "0 failed" in proc.stdout and "[ok] free space on work root" in proc.stdout
    else:
        assert proc.returncode == 1
        assert "[FAIL]" in proc.stdout
        assert ("lattice.rows" if broken == "manifest" else "output root writable") in proc.stdout
