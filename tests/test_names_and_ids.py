"""Names and event ids an adversary or a held-out acquisition got wrong (issue 19, items 6 and
10), against a real watcher and a real nats-server."""

from __future__ import annotations

import os

from messages import ArtifactUploaded, decode_event
from services.core.manifest import Lattice, Manifest, RawLayout
from services.local.simulate import write_manifest, write_tile_file
from services.runtime.bus import publish_event
from tests.conftest import stream_messages, wait_for
from tests.watching import TINY_CAL, watching


async def test_unicode_digits_and_trailing_newlines_are_not_tile_names(config, js):
    """`tile_٠٠٠٠.nii` (Arabic-Indic digits) written first was announced as tile r0c0 and the
    real `tile_0000.nii` was skipped as a duplicate; a name ending in a newline matched too."""
    manifest = Manifest(
        id="uni",
        lattice=Lattice(slices=1, rows=1, cols=2),
        pattern="tile_{index:04d}.nii",
        raw=RawLayout(samples=64, alines=2, bscans=2),
        calibration=TINY_CAL,
        settle_s=0.2,
    )
    acq_dir = config.roots.raw / "uni"
    write_manifest(manifest, acq_dir)
    body = os.urandom(manifest.raw.expected_bytes)
    write_tile_file(acq_dir / "tile_\u0660\u0660\u0660\u0660.nii", body)
    write_tile_file(acq_dir / "tile_0001.nii\n", body)
    async with watching(config, js):
        write_tile_file(acq_dir / "tile_0000.nii", body)
        write_tile_file(acq_dir / "tile_0001.nii", body)

        async def both():
            return len(await stream_messages(js, "tp.tile_arrived.uni.>")) == 2

        await wait_for(both, timeout=20)
    arrived = [decode_event(m.data) for m in await stream_messages(js, "tp.tile_arrived.uni.>")]
    assert sorted(e.path for e in arrived) == ["uni/tile_0000.nii", "uni/tile_0001.nii"]


async def test_upload_events_of_a_slices_two_mosaics_and_of_a_reupload_are_kept(config, js):
    """JetStream de-duplicates by Nats-Msg-Id: the id must tell a slice's second mosaic and a
    re-upload of changed content apart, and only a repeat of the same object be a duplicate."""

    def uploaded(mosaic: int, checksum: str) -> ArtifactUploaded:
        key = f"acq/mosaics/slice0000-m{mosaic}.ome.zarr"
        return ArtifactUploaded(
            acq="acq",
            slice=0,
            product="mosaic",
            source=key,
            key=key,
            bytes=100,
            checksum=checksum,
            seconds=0.1,
        )

    acks = [
        await publish_event(js, uploaded(0, "sha256:aa")),
        await publish_event(js, uploaded(1, "sha256:aa")),  # the tilted mosaic
        await publish_event(js, uploaded(0, "sha256:bb")),  # re-uploaded after a re-stitch
        await publish_event(js, uploaded(0, "sha256:bb")),  # the same again: a duplicate
    ]
    assert [bool(a.duplicate) for a in acks] == [False, False, False, True]
    stored = await stream_messages(js, "tp.artifact_uploaded.acq.>")
    keys = sorted((e.key, e.checksum) for e in map(decode_event, (m.data for m in stored)))
    assert keys == [
        ("acq/mosaics/slice0000-m0.ome.zarr", "sha256:aa"),
        ("acq/mosaics/slice0000-m0.ome.zarr", "sha256:bb"),
        ("acq/mosaics/slice0000-m1.ome.zarr", "sha256:aa"),
    ]
