"""upload's raw archival (`archive_raw = true`): per processed tile, a .nii.gz archival copy
of its raw file (services/io/raw_archive.py: one streaming read for the SHA-256 and the
compression), uploaded, verified, announced by `artifact_uploaded` of product `rawarchive`
with the raw file's path, size and SHA-256 in its `raw` field (the archive's size and
SHA-256 in `bytes` and `checksum`); optionally the local raw file deleted.

It runs in the upload stage on `tile_processed`, so never before process is done with the
tile and never on the processing path. The archive is written to the work root
(`layout.archive_path`), removed once uploaded and verified; its record
(`<archive>.json`: sizes, digests) stays, so a redelivery after the raw file was deleted
republishes the same event after reading the stored archive back.

Deleting raw data (`delete_raw_after_verified_upload = true`, off by default) happens here
and nowhere else in tilepipe, only after the stored archive was read back in full and its
SHA-256 equals the one computed while writing it, only for the raw file that archive was made
from (unchanged size and mtime since), and is logged (`raw_deleted`, warning level). A
failure to delete is logged (`raw_delete_failed`) and changes nothing else.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from pathlib import Path

from messages.events import RawArchival
from services.core.config import Roots
from services.core.errors import RawDeletionRefused, VerificationError
from services.core.manifest import RawLayout
from services.core.metrics import RAW_ARCHIVE_BYTES, RAW_DELETED
from services.io.atomic import atomic_file, zarr_attrs
from services.io.raw_archive import ArchiveReport, archive_tile
from services.io.storage import Storage, UploadReport


@dataclass(frozen=True)
class RawSource:
    """The raw tile behind a product group, as convert recorded it."""

    path: str  # raw-root-relative
    layout: RawLayout
    size: int | None
    mtime_ns: int | None


def raw_source(roots: Roots, products: str) -> RawSource:
    """The raw tile behind a product group (products -> converted store -> raw file)."""
    converted = zarr_attrs(roots.resolve("work", products)).get("source_path")
    attrs = zarr_attrs(roots.resolve("work", converted)) if converted else {}
    if not attrs.get("raw_path"):
        where = converted or products
        raise FileNotFoundError(f"no raw_path recorded in {where}/zarr.json")
    layout = attrs.get("layout")
    return RawSource(
        attrs["raw_path"],
        RawLayout.model_validate(layout) if layout else RawLayout(),
        attrs.get("raw_size"),
        attrs.get("raw_mtime_ns"),
    )


@dataclass
class ArchiveOutcome:
    report: UploadReport
    raw: RawArchival


class RawArchiver:
    """Archive, upload, verify and (optionally) delete one raw tile; see the module doc."""

    def __init__(
        self, roots: Roots, storage: Storage, level: int, delete_raw: bool, threads: int = 1
    ) -> None:
        self.roots, self.storage, self.level, self.delete_raw = roots, storage, level, delete_raw
        self.threads = threads

    async def run(
        self, source: RawSource, archive_rel: str, key: str, log, force: bool = False
    ) -> ArchiveOutcome:
        raw_file = self.roots.resolve("raw", source.path)
        local = self.roots.resolve("work", archive_rel)
        record_file = local.with_name(local.name + ".json")
        before = _stat(raw_file)
        record = _read_record(record_file)
        if record is not None and not force and not local.is_file():
            stamp = (record.get("raw_bytes"), record.get("raw_mtime_ns"))
            if before is not None and stamp != before:
                record = None  # a different raw file than the one archived: archive again
        elif before is not None:
            record = None
        if record is None and before is not None:
            made = await asyncio.to_thread(
                archive_tile, raw_file, source.layout, local, level=self.level, threads=self.threads
            )
            record = {**_record(source.path, made), "raw_mtime_ns": before[1]}
            RAW_ARCHIVE_BYTES.labels("raw").inc(made.raw_bytes)
            RAW_ARCHIVE_BYTES.labels("archive").inc(made.archive_bytes)
            with atomic_file(record_file) as tmp:
                tmp.write_text(json.dumps(record, indent=1))
            log.info(
                "raw_archived",
                raw=source.path,
                raw_bytes=made.raw_bytes,
                archive_bytes=made.archive_bytes,
                ratio=round(made.archive_bytes / max(made.raw_bytes, 1), 3),
                seconds=round(made.seconds, 3),
                mb_per_s=round(made.raw_bytes / max(made.seconds, 1e-9) / 1e6, 1),
            )
        elif record is None:
            raise FileNotFoundError(
                f"{source.path} is missing under the raw root and was never archived"
            )
        if local.is_file():
            report = await self.storage.upload(key, local, "rawarchive")
        else:
            report = UploadReport(
                key, self.storage.url_of(key), record["archive_bytes"], record["archive_sha256"], 0
            )
        if report.checksum != record["archive_sha256"]:
            raise VerificationError(f"{key}: the archive changed since its record was written")
        verified = self.storage.verify
        if self.delete_raw or not local.is_file():
            stored = await self.storage.read_back(key)
            expected = (record["archive_bytes"], record["archive_sha256"])
            if stored != expected:
                if before is not None:  # the raw file is here: archive it again next attempt
                    record_file.unlink(missing_ok=True)
                raise VerificationError(
                    f"{key}: read back {stored}, expected {expected}: archive not verified"
                )
            verified = "read-back"
        deleted = False
        if self.delete_raw and before is not None:
            deleted = delete_raw_file(raw_file, source.path, verified, before, key, record, log)
        elif self.delete_raw:
            deleted = True  # an earlier delivery deleted it after the same verification
        if local.is_file():
            local.unlink()
        return ArchiveOutcome(
            report,
            RawArchival(
                path=source.path,
                bytes=record["raw_bytes"],
                sha256=record["raw_sha256"],
                shape=record["shape"],
                dtype=record["dtype"],
                verified=verified,
                raw_deleted=deleted,
            ),
        )


def delete_raw_file(
    raw_file: Path,
    rel: str,
    verified: str,
    before: tuple[int, int],
    key: str,
    record: dict,
    log,
) -> bool:
    """The one place tilepipe deletes raw data: only after a read-back verification of its
    archive, only the unchanged file the archive was made from. True when deleted."""
    if verified != "read-back":
        raise RawDeletionRefused(f"{rel}: not deleted: its archive at {key} was not read back")
    now = _stat(raw_file)
    if now != before or now[0] != record["raw_bytes"]:
        log.error("raw_delete_failed", raw=rel, reason="the raw file changed since it was archived")
        RAW_DELETED.labels("failed").inc()
        return False
    try:
        os.unlink(raw_file)
    except OSError as exc:
        log.error("raw_delete_failed", raw=rel, reason=str(exc))
        RAW_DELETED.labels("failed").inc()
        return False
    RAW_DELETED.labels("deleted").inc()
    log.warning(
        "raw_deleted",
        raw=rel,
        raw_bytes=record["raw_bytes"],
        raw_sha256=record["raw_sha256"],
        archive=key,
        archive_sha256=record["archive_sha256"],
    )
    return True


def _read_record(path: Path) -> dict | None:
    """An archive's record (None if absent or unreadable: the tile is archived again)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "archive_sha256" in record else None


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_size, st.st_mtime_ns


def _record(raw_rel: str, made: ArchiveReport) -> dict:
    return {
        "raw_path": raw_rel,
        "raw_bytes": made.raw_bytes,
        "raw_sha256": made.raw_sha256,
        "archive_bytes": made.archive_bytes,
        "archive_sha256": made.archive_sha256,
        "shape": list(made.shape),
        "dtype": made.dtype,
        "format": "tilepipe-raw-archive/1",
    }
