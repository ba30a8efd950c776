"""upload stage against a real S3-compatible server (moto_server on loopback) and file://.

Every test drives the real `Upload` stage under the real `StageRunner` on the real nats-server
fixture, exactly as in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import zarr

from messages import SliceStitched, TileCoord, TileProcessed
from messages.events import TilePosition
from services.core.config import StageSettings
from services.core.errors import ConfigError
from services.core.metrics import EVENTS_HANDLED, UPLOAD_FAILURES
from services.io.storage import MARKER, digest_file, upload_phases
from services.runtime.bus import publish_event
from services.runtime.options import parse_options
from services.runtime.runner import StageRunner
from services.stages.upload import Upload, UploadOptions
from services.state.status import snapshot
from tests.conftest import events, wait_for
from tests.s3server import BUCKET, PART, MotoServer, s3_options, s3_tree

TILE = TileCoord(slice=0, mosaic=0, row=1, col=2)
PSOCT_KEY = (
    "sub-acq1/micr/tiles/slice0000/sub-acq1_sample-slice0000_acq-m0_chunk-r001c002_psoct.zarr"
)


class PausingProxy:
    """TCP relay to a server; after `pause_after` request bytes it holds all traffic.

    `resume()` drops every held connection and relays new ones again: to the client this looks
    like a server that went away mid-request.
    """

    def __init__(self, upstream_port: int, pause_after: int) -> None:
        self.upstream_port = upstream_port
        self.pause_after: int | None = pause_after
        self.sent = 0
        self.paused = asyncio.Event()
        self.gate = asyncio.Event()
        self.gate.set()
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> PausingProxy:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _client(self, reader, writer) -> None:
        await self.gate.wait()
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        self.writers |= {writer, up_writer}
        await asyncio.gather(
            self._pump(reader, up_writer, count=True),
            self._pump(up_reader, writer),
            return_exceptions=True,
        )
        for w in (writer, up_writer):
            w.close()
            self.writers.discard(w)

    async def _pump(self, reader, writer, count: bool = False) -> None:
        while data := await reader.read(65536):
            if count:
                await self.gate.wait()
                self.sent += len(data)
                if self.pause_after is not None and self.sent >= self.pause_after:
                    self.pause_after = None
                    self.gate.clear()
                    self.paused.set()
                    await self.gate.wait()
            writer.write(data)
            await writer.drain()
        writer.close()

    def resume(self) -> None:
        for w in list(self.writers):
            w.close()
        self.writers.clear()
        self.gate.set()

    async def close(self) -> None:
        self.resume()
        self.server.close()


@contextlib.asynccontextmanager
async def upload_stage(config, options: dict, **settings):
    """The real stage under the real runner, until the block ends."""
    merged = {
        **Upload.defaults,
        "enabled": True,
        "max_deliver": 3,
        "backoff_s": [0.2, 0.5],
        **settings,
        "options": options,
    }
    stage = Upload(config, StageSettings(**merged))
    runner = StageRunner(stage, config)
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    await wait_for(lambda: runner.ready.is_set())
    try:
        yield stage
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        stage.storage.close()


def write_tile(config, big_bytes: int, acq: str = "acq1") -> TileProcessed:
    """A products group like process writes (one big chunk), its converted store and raw."""
    raw_rel = f"{acq}/slice000/tile_0001.nii"
    conv_rel = f"{acq}/converted/slice0000/{TILE.token()}.zarr"
    prod_rel = f"{acq}/products/slice0000/{TILE.token()}.zarr"
    raw = config.roots.raw / raw_rel
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_bytes(os.urandom(300_000))
    conv = zarr.open_group(str(config.roots.work / conv_rel), mode="w", zarr_format=3)
    conv.attrs["raw_path"] = raw_rel
    group = zarr.open_group(str(config.roots.work / prod_rel), mode="w", zarr_format=3)
    rng = np.random.default_rng(0)
    db = rng.random((big_bytes // 1024, 256), dtype=np.float32)
    group.create_array("db", data=db, chunks=db.shape, compressors=None)
    group.create_array("aip", data=db[:16, :16].copy(), chunks=(16, 16))
    group.attrs.update({"source_path": conv_rel, "tilepipe_complete": True})
    return TileProcessed(
        acq=acq,
        tile=TILE,
        products={"db": f"{prod_rel}/db", "aip": f"{prod_rel}/aip"},
        device="cpu",
        seconds=0.1,
    )


def write_mosaic(config, acq: str = "acq1") -> SliceStitched:
    rel = f"{acq}/mosaics/slice0000-m0.ome.zarr"
    group = zarr.open_group(str(config.roots.output / rel), mode="w", zarr_format=3)
    group.create_array("0", data=np.arange(64 * 64, dtype=np.uint16).reshape(64, 64))
    return SliceStitched(acq=acq, slice=0, mosaic=0, path=rel)


def local_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def handled_ok() -> float:
    return EVENTS_HANDLED.labels("upload", "ok")._value.get()


async def test_s3_multipart_verified_then_replay_skipped(config, js, moto, aws_env):
    s3 = moto.client()
    s3.create_bucket(Bucket=BUCKET)
    s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
    tile = write_tile(config, big_bytes=6 * PART + 1024)  # 7 parts
    mosaic = write_mosaic(config)
    async with upload_stage(config, s3_options(moto.url, include_raw=True)):
        await publish_event(js, tile)
        await publish_event(js, mosaic)

        async def three():
            return len(await events(js, "artifact_uploaded")) == 3

        await wait_for(three, timeout=30)
        done = {e.product: e for e in await events(js, "artifact_uploaded")}
        assert await events(js, "stage_failed") == []
        status = await snapshot(js, "TILEPIPE", tile.acq, ["upload"])  # `tilepipe status`
        assert status.stages["upload"].done == 3

        # the tile's Zarr group: every file stored byte for byte, the big chunk as 7 parts
        psoct = done["psoct"]
        assert psoct.key == f"s3://{BUCKET}/run1/{PSOCT_KEY}"
        local = local_files(config.roots.work / psoct.source)
        stored = s3_tree(s3, f"run1/{PSOCT_KEY}")
        assert set(stored) == {*local, MARKER}
        for rel, data in local.items():
            body = s3.get_object(Bucket=BUCKET, Key=f"run1/{PSOCT_KEY}/{rel}")["Body"].read()
            assert body == data, rel
        assert stored["db/c/0/0"]["ETag"].strip('"').endswith("-7")
        marker = json.loads(
            s3.get_object(Bucket=BUCKET, Key=f"run1/{PSOCT_KEY}/{MARKER}")["Body"].read()
        )
        assert marker["checksum"] == psoct.checksum and psoct.checksum.startswith("sha256-tree:")
        assert psoct.bytes == sum(len(d) for d in local.values()) == marker["bytes"]

        raw = done["raw"]
        raw_bytes = (config.roots.raw / raw.source).read_bytes()
        assert raw.checksum == "sha256:" + hashlib.sha256(raw_bytes).hexdigest()
        raw_key = raw.key.removeprefix(f"s3://{BUCKET}/")
        head = s3.head_object(Bucket=BUCKET, Key=raw_key)
        assert head["ContentLength"] == len(raw_bytes) and head["ETag"].endswith('-2"')
        assert head["Metadata"]["tilepipe-sha256"] == raw.checksum.removeprefix("sha256:")
        assert done["mosaic"].key.endswith("sub-acq1_sample-slice0000_acq-m0_mosaic.ome.zarr")

        # a replay PUTs nothing (versioning on: any PUT would add a version) and republishes
        versions = s3.list_object_versions(Bucket=BUCKET)["Versions"]
        before = handled_ok()
        await publish_event(js, tile, replay="again")
        await publish_event(js, mosaic, replay="again")
        await wait_for(lambda: handled_ok() >= before + 2, timeout=20)
        assert s3.list_object_versions(Bucket=BUCKET)["Versions"] == versions
        again = await events(js, "artifact_uploaded")
        assert len(again) == 6
        assert {(e.product, e.checksum) for e in again[3:]} == {
            (e.product, e.checksum) for e in done.values()
        }


async def test_s3_server_restart_mid_upload_retried(config, js, moto, aws_env):
    moto.client().create_bucket(Bucket=BUCKET)
    proxy = await PausingProxy(moto.port, pause_after=6 * PART).start()
    tile = write_tile(config, big_bytes=24 * PART)
    retries_before = sum(s.value for m in UPLOAD_FAILURES.collect() for s in m.samples)
    options = s3_options(f"http://127.0.0.1:{proxy.port}", part_concurrency=2)
    try:
        async with upload_stage(config, options):
            await publish_event(js, tile)
            await asyncio.wait_for(proxy.paused.wait(), 20)  # mid-way through the upload
            await asyncio.to_thread(moto.stop)
            await asyncio.to_thread(moto.start)  # same port, empty: no bucket, no upload
            await asyncio.to_thread(moto.client().create_bucket, Bucket=BUCKET)
            proxy.resume()

            async def uploaded():
                return await events(js, "artifact_uploaded")

            (event,) = await wait_for(uploaded, timeout=40)
    finally:
        await proxy.close()
    assert await events(js, "stage_failed") == []
    retries = sum(s.value for m in UPLOAD_FAILURES.collect() for s in m.samples)
    assert retries > retries_before  # the cut-off upload failed and was retried
    s3 = moto.client()
    local = local_files(config.roots.work / event.source)
    stored = s3_tree(s3, f"run1/{PSOCT_KEY}")
    assert set(stored) == {*local, MARKER}  # everything re-sent to the emptied server
    big = config.roots.work / event.source / "db/c/0/0"
    assert stored["db/c/0/0"]["ETag"].strip('"') == digest_file(big, PART).etag
    body = s3.get_object(Bucket=BUCKET, Key=f"run1/{PSOCT_KEY}/db/c/0/0")["Body"].read()
    assert body == big.read_bytes()


async def test_s3_wrong_credentials_fail_clearly(config, js, tmp_path, aws_env):
    server = MotoServer(INITIAL_NO_AUTH_ACTION_COUNT="1").start()  # then keys are checked
    try:
        server.client().create_bucket(Bucket=BUCKET)  # the one unauthenticated action
        creds = tmp_path / "credentials"
        creds.write_text("[default]\naws_access_key_id = AKIAWRONG\naws_secret_access_key = x\n")
        tile = write_tile(config, big_bytes=PART)
        options = s3_options(server.url, credentials_file=str(creds))
        async with upload_stage(config, options):
            await publish_event(js, tile)

            async def failed():
                return await events(js, "stage_failed")

            (failure,) = await wait_for(failed, timeout=20)
    finally:
        server.stop()
    assert failure.stage == "upload" and failure.attempts == 1  # not retried
    assert "refused access" in failure.error and "InvalidAccessKeyId" in failure.error
    assert "check the credentials" in failure.error
    assert await events(js, "artifact_uploaded") == []


@pytest.mark.parametrize("delete_when", ["stitched", "uploaded"])
async def test_file_destination_delete_after_upload_and_replay(config, js, tmp_path, delete_when):
    dest = tmp_path / "dest"
    tile = write_tile(config, big_bytes=2 * PART)
    mosaic = write_mosaic(config).model_copy(
        update={"positions": [TilePosition(row=TILE.row, col=TILE.col, y=0.0, x=0.0)]}
    )
    source = config.roots.work / tile.products["db"].rsplit("/", 1)[0]
    local = local_files(source)
    options = {
        "url": f"file://{dest}",
        "delete_after_upload": True,
        "delete_when": delete_when,
        "part_size_mb": 0.25,
    }

    async def uploaded(n: int):
        async def check():
            found = await events(js, "artifact_uploaded")
            return found if len(found) == n else None

        return await wait_for(check, timeout=20)

    async with upload_stage(config, options):
        await publish_event(js, tile)
        (event,) = await uploaded(1)
        assert event.key == f"file://{dest}/{PSOCT_KEY}"
        stored = local_files(dest / PSOCT_KEY)
        assert stored == {**local, MARKER: stored[MARKER]}
        assert json.loads(stored[MARKER])["checksum"] == event.checksum
        assert not [p for p in dest.rglob("*") if "#" in p.name]  # no staging files left
        # stitch still needs the products until the mosaic is stitched
        assert source.exists() == (delete_when == "stitched")
        await publish_event(js, mosaic)
        await uploaded(2)  # the mosaic (the tile's own event again is a dropped duplicate)
        await wait_for(lambda: not source.exists())

        # replayed after the local copy is gone: republished from the completeness marker
        await publish_event(js, tile, replay="again")
        third = (await uploaded(3))[2]
    assert (third.product, third.checksum, third.bytes) == ("psoct", event.checksum, event.bytes)
    assert await events(js, "stage_failed") == []


async def test_volume_mosaics_listed_by_slice_stitched_go_up(config, js, tmp_path):
    """The 3-D volume mosaics a `slice_stitched` lists (dBI, R3D, O3D) are uploaded beside
    the en-face mosaic, each under its own key, byte for byte."""
    dest = tmp_path / "dest"
    mosaic = write_mosaic(config, acq="acqv")
    volumes = {}
    for product in ("dBI", "R3D", "O3D"):
        rel = mosaic.path.replace(".ome.zarr", f"-{product}.ome.zarr")
        group = zarr.open_group(str(config.roots.output / rel), mode="w", zarr_format=3)
        group.create_array("0", data=np.full((4, 8, 8), len(product), np.float32))
        volumes[product] = rel
    mosaic = mosaic.model_copy(update={"volumes": volumes})
    async with upload_stage(config, {"url": f"file://{dest}"}):
        await publish_event(js, mosaic)

        async def four():
            found = await events(js, "artifact_uploaded")
            return found if len(found) == 4 else None

        done = await wait_for(four, timeout=20)
    assert sorted(e.product for e in done) == ["mosaic", *["mosaicvolume"] * 3]
    for e in done:
        if e.product == "mosaicvolume":
            name = e.source.rsplit("/", 1)[1]
            assert e.key == f"file://{dest}/sub-acqv/micr/volumes/sub-acqv_{name}"
            local = local_files(config.roots.output / e.source)
            stored = local_files(dest / e.key.removeprefix(f"file://{dest}/"))
            assert stored == {**local, MARKER: stored[MARKER]}
    assert {e.source for e in done if e.product == "mosaicvolume"} == set(volumes.values())
    assert await events(js, "stage_failed") == []


async def test_nifti_and_previews_listed_by_a_mosaic_are_uploaded_with_checksums(
    config, js, tmp_path
):
    """A stitched mosaic's exports (services/io/exports.py) go to their own keys; S3-style
    checksums are verified like every artifact's; `include_exports = false` leaves them."""
    from services.io.exports import export_mosaic
    from services.io.omezarr import write_omezarr

    rel = "acq1/mosaics/slice0002-m1.ome.zarr"
    maps = {c: np.full((20, 30), 50.0, np.float32) for c in ("aip", "retardance", "orientation")}
    write_omezarr(config.roots.output / rel, maps, pixel_size_um=(10.0, 10.0))
    exports = export_mosaic(config.roots.output, rel, 2, 1, 200.0)
    assert sorted(exports) == ["nifti.aip", "nifti.ori", "nifti.ret", "preview.aip",
                               "preview.ori", "preview.ret"]  # fmt: skip
    event = SliceStitched(acq="acq1", slice=2, mosaic=1, path=rel, exports=exports)
    dest = tmp_path / "dest"
    async with upload_stage(config, {"url": f"file://{dest}"}):
        await publish_event(js, event)
        found = await wait_for(lambda: _uploaded(js, 1 + len(exports)), timeout=20)
    by_product = sorted((e.product, e.key.removeprefix(f"file://{dest}/")) for e in found)
    stem = "sub-acq1/micr/sub-acq1_sample-slice0002_acq-m1"
    assert by_product[:4] == [
        ("mosaic", f"{stem}_mosaic.ome.zarr"),
        ("mosaic_nifti", f"{stem}_proc-aip.nii.gz"),
        ("mosaic_nifti", f"{stem}_proc-ori.nii.gz"),
        ("mosaic_nifti", f"{stem}_proc-ret.nii.gz"),
    ]
    assert (
        "mosaic_preview",
        "sub-acq1/micr/previews/sub-acq1_sample-slice0002_acq-m1_proc-ori.png",
    ) in by_product
    for e in found:
        if e.product != "mosaic":
            local = config.roots.output / e.source
            assert e.checksum == "sha256:" + hashlib.sha256(local.read_bytes()).hexdigest()
            assert (dest / e.key.removeprefix(f"file://{dest}/")).read_bytes() == local.read_bytes()
    opts = {"url": f"file://{dest}", "include_exports": False}
    without = Upload(config, StageSettings(**{**Upload.defaults, "options": opts}))
    assert [a.product for a in without._artifacts(event)] == ["mosaic"]


async def _uploaded(js, n: int):
    found = await events(js, "artifact_uploaded")
    return found if len(found) == n else None


def test_options_are_validated_with_clear_errors(tmp_path):
    cases = [
        ({}, "url: Field required"),
        ({"url": "ftp://x/y"}, "unsupported destination"),
        ({"url": "file://relative"}, "absolute path"),
        ({"url": "s3://b", "store_options": {"secret_access_key": "s"}}, "credentials_file"),
        ({"url": "s3://b", "key_template": "{acq}/{nope}"}, "unknown fields ['nope']"),
        ({"url": "s3://b", "key_template": {"mosaic": "{acq}/{row}"}}, "unknown fields ['row']"),
        ({"url": "s3://b", "key_template": "/{acq}"}, "invalid object key"),
        ({"url": "s3://b", "credentials_file": str(tmp_path / "none")}, "not a readable file"),
        ({"url": "gs://b", "verify": "etag"}, "needs an s3://"),
        ({"url": "s3://b", "part_sise_mb": 8}, "unknown key 'part_sise_mb'"),
    ]
    for options, message in cases:
        with pytest.raises(ConfigError) as info:
            parse_options(UploadOptions, options, "upload")
        assert message in str(info.value), (options, str(info.value))
        assert str(info.value).startswith("stages.upload.options")


def test_zarr_metadata_goes_last_root_very_last():
    paths = ["zarr.json", "db/zarr.json", "db/c/0/0", "aip/c/0", "aip/zarr.json", "a/b/zarr.json"]
    phases = upload_phases(paths)
    assert phases[0] == ["db/c/0/0", "aip/c/0"]
    assert phases[1] == ["a/b/zarr.json"]
    assert sorted(phases[2]) == ["aip/zarr.json", "db/zarr.json"]
    assert phases[-1] == ["zarr.json"]


def test_volume_mosaic_keys_in_the_dandi_layout(tmp_path):
    """In the DANDI layout a volume mosaic is named by `[names] mosaic_volume` with its
    modality (the product the file name ends with), under derivatives/."""
    from services.core.config import Config, Roots
    from services.local.simulate import small_manifest

    manifest = small_manifest("acqd", slices=2, rows=1, cols=1, mosaics=2)
    roots = Roots(raw=tmp_path / "raw", work=tmp_path / "work", output=tmp_path / "out")
    opts = {"url": f"file://{tmp_path}/dest", "layout": "dandi"}
    stage = Upload(Config(roots=roots), StageSettings(**{**Upload.defaults, "options": opts}))
    keys = {
        (sl, mos, p): stage._key(
            manifest,
            "acqd",
            "mosaicvolume",
            f"acqd/mosaics/slice{sl:04d}-m{mos}-{p}.ome.zarr",
            None,
            sl,
            mos,
        )
        for sl in (0, 1)
        for mos in (0, 1)
        for p in ("dBI", "R3D", "O3D")
    }
    assert len(set(keys.values())) == 12  # one key per slice, illumination and product
    for (sl, mos, p), key in keys.items():
        assert key.startswith(f"derivatives/tilepipe/sub-{manifest.subject}/micr/"), key
        assert key.endswith(f"_proc-{p}_OCT.ome.zarr"), key
        assert f"acq-{manifest.acq_label(mos)}" in key and f"slice{sl + 1:02d}" in key, key
