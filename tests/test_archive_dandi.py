"""Raw archival and the DANDI layout: a simulated two-illumination acquisition run through
the real watcher, convert, process and upload stages to the S3 test server (moto_server on
loopback), the archives read back with nibabel."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import zarr

from messages import SliceStitched
from services.core.errors import RawDeletionRefused
from services.core.manifest import load_manifest
from services.core.metrics import RAW_DELETED
from services.core.names import Names
from services.io.rawio import read_tile
from services.local.simulate import simulate, small_manifest, write_manifest
from services.runtime.bus import publish_event
from services.runtime.stage import REPAIR_PREFIX
from services.stages.convert import Convert
from services.stages.process import Process
from services.stages.upload import Upload
from services.stages.upload_raw import delete_raw_file
from tests.conftest import events, pipeline, wait_for
from tests.s3server import BUCKET, s3_options, s3_tree

ACQ = "sim"
TILES = 4  # one slice, 1 x 2 tiles, normal and tilted


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def acquisition(config) -> tuple[Path, list[Path]]:
    manifest = small_manifest(
        ACQ, slices=1, rows=1, cols=2, alines=16, bscans=16, samples=256, mosaics=2, settle_s=0.2
    )
    path = write_manifest(manifest, config.roots.raw / ACQ)
    simulate(path, manifest, 0)
    return path, sorted((config.roots.raw / ACQ).glob("mosaic_*.nii"))


def expected_raw_name(raw: Path) -> str:
    """The lab's archive name of an instrument file, from its own name: mosaic_%03d counts
    through the acquisition (odd: normal, even: tilted), image_%04d is the tile number."""
    parts = raw.name.split("_")
    mosaic, image = int(parts[1]), int(parts[3])
    return Names().raw_archive.format(
        project=ACQ, slice=(mosaic + 1) // 2, tile=image, acq="normal" if mosaic % 2 else "tilted"
    )


async def run(config, js, s3, **options) -> list:
    s3.create_bucket(Bucket=BUCKET)
    opts = {Upload: s3_options(s3.endpoint, layout="dandi", archive_raw=True, **options)}
    async with pipeline(config, js, (Convert, Process, Upload), opts, enabled=True):

        async def archived():
            done = [e for e in await events(js, "artifact_uploaded") if e.product == "rawarchive"]
            return done if len(done) == TILES else None

        return await wait_for(archived, timeout=120)


@pytest.fixture
def s3(moto):
    client = moto.client()
    client.endpoint = moto.url
    return client


async def test_dandi_layout_and_raw_archives(config, js, s3, aws_env, tmp_path):
    manifest_path, raws = await asyncio.to_thread(acquisition, config)
    before = {p: p.read_bytes() for p in raws}
    archived = await run(config, js, s3)
    assert await events(js, "stage_failed") == []
    stored = s3_tree(s3, "run1")
    by_raw = {e.raw.path: e for e in archived}
    assert set(by_raw) == {p.relative_to(config.roots.raw).as_posix() for p in raws}
    for raw in raws:
        event = by_raw[raw.relative_to(config.roots.raw).as_posix()]
        key = f"rawdata/sub-{ACQ}/micr/{expected_raw_name(raw)}"
        assert event.key == f"s3://{BUCKET}/run1/{key}"
        body = s3.get_object(Bucket=BUCKET, Key=f"run1/{key}")["Body"].read()
        # the event log holds the raw file's and the archive's size and SHA-256
        assert event.raw.sha256 == sha256(before[raw]) and event.raw.bytes == len(before[raw])
        assert event.checksum == sha256(body) and event.bytes == len(body) < len(before[raw])
        assert event.raw.verified == "etag" and not event.raw.raw_deleted
        # the archive opens with nibabel and holds exactly the raw samples
        local = tmp_path / expected_raw_name(raw)
        local.write_bytes(body)
        image = nib.load(local)
        layout = load_manifest(manifest_path).geometry(event.tile.mosaic).raw
        samples = read_tile(raw, layout)  # [B, 2, A, S]
        assert image.shape == tuple(event.raw.shape) == samples.shape[::-1]
        assert image.get_data_dtype() == np.uint16
        assert np.array_equal(np.asarray(image.dataobj), samples.transpose(3, 2, 1, 0))
    assert {p: p.read_bytes() for p in raws} == before  # raw data untouched
    assert not list(config.roots.work.rglob("*.nii.gz"))  # local archives gone once uploaded

    # the tiles' products and the dataset-level files, as the templates say
    for event in await events(js, "artifact_uploaded"):
        if event.product == "psoct":
            tile = event.tile
            name = Names().tile_products.format(
                project=ACQ, slice=1, tile=tile.col + 1, acq=("normal", "tilted")[tile.mosaic]
            )
            assert event.key == f"s3://{BUCKET}/run1/derivatives/tilepipe/sub-{ACQ}/micr/{name}"
    body = s3.get_object(Bucket=BUCKET, Key="run1/dataset_description.json")["Body"].read()
    description = json.loads(body)
    assert description["Name"] == ACQ and description["DatasetType"] == "raw"
    assert "derivatives/tilepipe/dataset_description.json" in stored

    # a slice's tilted mosaic goes under derivatives/ with its [names] mosaic name
    rel = f"{ACQ}/mosaics/slice0000-m1.ome.zarr"
    group = zarr.open_group(str(config.roots.output / rel), mode="w", zarr_format=3)
    group.create_array("0", data=np.zeros((8, 8), np.float32))
    async with pipeline(
        config, js, (Upload,), {Upload: s3_options(s3.endpoint, layout="dandi")}, enabled=True
    ):
        await publish_event(js, SliceStitched(acq=ACQ, slice=0, mosaic=1, path=rel))

        async def mosaic():
            return [e for e in await events(js, "artifact_uploaded") if e.product == "mosaic"]

        (event,) = await wait_for(mosaic, timeout=30)
    name = Names().mosaic.format(project=ACQ, slice=1, acq="tilted")
    assert event.key == f"s3://{BUCKET}/run1/derivatives/tilepipe/sub-{ACQ}/micr/{name}"
    assert f"derivatives/tilepipe/sub-{ACQ}/micr/{name}/zarr.json" in s3_tree(s3, "run1")


async def test_raw_deleted_only_after_verified_upload(config, js, s3, aws_env):
    _, raws = await asyncio.to_thread(acquisition, config)

    # refused before anything: a destination that cannot store the archive keeps every raw file
    bad = {
        Upload: {
            **s3_options(s3.endpoint, layout="dandi", archive_raw=True),
            "url": "s3://no-such-bucket/run1",
            "delete_raw_after_verified_upload": True,
            "retries": 0,
        }
    }
    async with pipeline(
        config, js, (Convert, Process, Upload), bad, enabled=True, max_deliver=1, backoff_s=[0.1]
    ):

        async def failed():
            return len([e for e in await events(js, "stage_failed") if e.stage == "upload"])

        await wait_for(lambda: _count(failed, TILES), timeout=120)
    assert all(p.exists() for p in raws)
    assert await events(js, "artifact_uploaded") == []

    # without a read-back the one deleting function refuses
    with pytest.raises(RawDeletionRefused):
        st = raws[0].stat()
        delete_raw_file(raws[0], "x", "etag", (st.st_size, st.st_mtime_ns), "k", {}, None)
    assert raws[0].exists()


async def _count(fn, n: int) -> bool:
    return (await fn()) >= n


async def test_delete_after_read_back_and_redelivery(config, js, s3, aws_env):
    _, raws = await asyncio.to_thread(acquisition, config)
    digests = {p.relative_to(config.roots.raw).as_posix(): sha256(p.read_bytes()) for p in raws}
    deletions = RAW_DELETED.labels("deleted")._value.get()
    archived = await run(config, js, s3, delete_raw_after_verified_upload=True)
    assert RAW_DELETED.labels("deleted")._value.get() == deletions + TILES
    assert await events(js, "stage_failed") == []
    for event in archived:
        assert event.raw.verified == "read-back" and event.raw.raw_deleted
        assert event.raw.sha256 == digests[event.raw.path]
        key = event.key.removeprefix(f"s3://{BUCKET}/")
        body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        assert sha256(body) == event.checksum
    assert not any(p.exists() for p in raws)  # deleted, each after its archive was read back

    # a redelivery after the deletion reads the stored archive back and republishes
    processed = await events(js, "tile_processed")
    async with pipeline(
        config,
        js,
        (Upload,),
        {
            Upload: s3_options(
                s3.endpoint, layout="dandi", archive_raw=True, delete_raw_after_verified_upload=True
            )
        },
        enabled=True,
    ):
        await publish_event(js, processed[0], replay="again")

        async def again():
            done = [e for e in await events(js, "artifact_uploaded") if e.product == "rawarchive"]
            return done if len(done) > TILES else None

        done = await wait_for(again, timeout=30)
    first = next(e for e in archived if e.tile == processed[0].tile)
    assert (done[-1].raw, done[-1].checksum) == (first.raw, first.checksum)


async def test_archives_in_the_default_layout_to_a_file_store(config, js, tmp_path):
    _, raws = await asyncio.to_thread(acquisition, config)
    store = tmp_path / "store"
    opts = {Upload: {"url": f"file://{store}", "archive_raw": True}}
    async with pipeline(config, js, (Convert, Process, Upload), opts, enabled=True):

        async def archived():
            done = [e for e in await events(js, "artifact_uploaded") if e.product == "rawarchive"]
            return done if len(done) == TILES else None

        done = await wait_for(archived, timeout=120)
        # a redelivery (not a forced replay) reads the stored archive back instead of
        # reading and compressing the raw file again
        records = sorted(config.roots.work.rglob("*.nii.gz.json"))
        stamps = [p.stat().st_mtime_ns for p in records]
        processed = (await events(js, "tile_processed"))[0]
        await publish_event(js, processed, replay=REPAIR_PREFIX + "1")

        async def again():
            more = [e for e in await events(js, "artifact_uploaded") if e.product == "rawarchive"]
            return more[TILES:]

        (redone,) = await wait_for(again, timeout=30)
        first = next(e for e in done if e.tile == processed.tile)
        assert redone.raw.verified == "read-back" and redone.checksum == first.checksum
        assert [p.stat().st_mtime_ns for p in records] == stamps and len(records) == TILES
    for event in done:
        t = event.tile
        key = (
            f"sub-{ACQ}/micr/raw/slice{t.slice:04d}/sub-{ACQ}_sample-slice{t.slice:04d}_"
            f"acq-m{t.mosaic}_chunk-r{t.row:03d}c{t.col:03d}_rawarchive.nii.gz"
        )  # DEFAULT_KEYS["rawarchive"]: key_template's fields, extension of the archive
        assert event.key == f"file://{store}/{key}" and event.raw.verified == "read"
        image = nib.load(store / key)
        raw = config.roots.raw / event.raw.path
        assert sha256(raw.read_bytes()) == event.raw.sha256
        assert sha256((store / key).read_bytes()) == event.checksum
        assert image.shape == tuple(event.raw.shape)
    assert all(p.exists() for p in raws)


def test_parallel_archive_members_read_as_one_stream(tmp_path):
    """archive_threads > 1: one gzip member per block, compressed on threads; nibabel reads
    the samples exactly, for a 12-bit tile too, and the bytes do not depend on the timing."""
    from services.io.raw_archive import archive_tile

    manifest = small_manifest(
        "p", slices=1, rows=1, cols=1, alines=32, bscans=32, raw_format="raw12"
    )
    path = write_manifest(manifest, tmp_path / "p")
    simulate(path, manifest, 0)
    (raw,) = (tmp_path / "p").glob("mosaic_*.raw")
    layout = manifest.geometry(0).raw
    one = archive_tile(raw, layout, tmp_path / "one.nii.gz", threads=1)
    digests = set()
    for run in range(2):
        target = tmp_path / f"par{run}.nii.gz"
        report = archive_tile(raw, layout, target, threads=3, block_mb=0.05)
        data = target.read_bytes()
        assert data.count(b"\x1f\x8b\x08") >= 10  # several members (one per block)
        image = np.asarray(nib.load(target).dataobj)
        assert np.array_equal(image, read_tile(raw, layout).transpose(3, 2, 1, 0))
        assert report.raw_sha256 == one.raw_sha256 == sha256(raw.read_bytes())
        digests.add(report.archive_sha256)
    assert len(digests) == 1


async def test_a_stored_archive_that_does_not_read_back_keeps_the_raw_file(
    config,
    js,
    s3,
    aws_env,
):
    """Archived without deletion; then the stored archive is damaged. With deletion on, a
    redelivery reads it back, finds the mismatch, fails and keeps the raw file; the next one
    archives and uploads again, reads it back intact and only then deletes the raw file."""
    _, raws = await asyncio.to_thread(acquisition, config)
    archived = await run(config, js, s3)
    victim = archived[0]
    raw = config.roots.raw / victim.raw.path
    key = victim.key.removeprefix(f"s3://{BUCKET}/")
    s3.put_object(Bucket=BUCKET, Key=key, Body=b"damaged")
    (processed,) = [e for e in await events(js, "tile_processed") if e.tile == victim.tile]
    opts = {
        Upload: s3_options(
            s3.endpoint, layout="dandi", archive_raw=True, delete_raw_after_verified_upload=True
        )
    }
    async with pipeline(config, js, (Upload,), opts, enabled=True, max_deliver=1, backoff_s=[0.1]):
        await publish_event(js, processed, replay=REPAIR_PREFIX + "1")

        async def failed():
            return [e for e in await events(js, "stage_failed") if e.stage == "upload"]

        (failure,) = await wait_for(failed, timeout=30)
        assert "archive not verified" in failure.error
        assert raw.exists() and sha256(raw.read_bytes()) == victim.raw.sha256

        await publish_event(js, processed, replay=REPAIR_PREFIX + "2")

        async def deleted():
            done = [
                e
                for e in await events(js, "artifact_uploaded")
                if e.product == "rawarchive" and e.raw.raw_deleted
            ]
            return done

        (done,) = await wait_for(deleted, timeout=30)
    assert not raw.exists() and done.raw.verified == "read-back"
    assert (done.checksum, done.raw.sha256) == (victim.checksum, victim.raw.sha256)
    body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    assert sha256(body) == victim.checksum
    assert sum(p.exists() for p in raws) == TILES - 1  # the tiles not redelivered are kept
