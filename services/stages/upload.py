"""upload: tile products, mosaics, the registered volume (optionally raw tiles) -> object storage.

Consumes `tile_processed` (the tile's product group under the work root; with `include_raw`
also its raw file, found through the products' `source_path` and the converted store's
`raw_path`), `slice_stitched` (the en-face mosaic; the 3-D volume mosaics it lists, dBI, R3D
and O3D, as product `mosaicvolume`), `slice_registered` and `slice_axis` (paths under the
output root; `slice_registered` and `slice_axis` also send the stacked axis volume once register has
written it: product `axisvolume`; a slice's axis products are product `axis`). Each
artifact is uploaded by `services.storage.Storage` (checksums, verification, completeness
marker, retries: see that module) and announced by one `artifact_uploaded` event whose `key`
is the artifact's full URL.

Off until configured (`enabled = true` and a `url`):

    [stages.upload]
    enabled = true
    concurrency = 4                  # events handled at once
    options = { url = "s3://bucket/prefix", region = "eu-west-1", concurrency = 8,
                part_size_mb = 8, include_raw = false, delete_after_upload = false }

Credentials come from the environment (`AWS_*`, `GOOGLE_*`, `AZURE_*`) or `credentials_file`.
`delete_after_upload` removes tile product groups from the work root once uploaded and
verified, never raw data nor the output root. With `delete_when = "stitched"` (default) that
happens on the mosaic's `slice_stitched` (stitch reads the products until then): each tile it
lists is uploaded again, which verifies it and sends nothing, then deleted. With
`delete_when = "uploaded"` right after the tile's own upload (when nothing on this host
stitches). A replay after deletion republishes the event from the stored completeness marker.
"""

from __future__ import annotations

import asyncio
import shutil
import string
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationError, model_validator

from messages.events import (
    ArtifactUploaded,
    Event,
    SliceAxis,
    SliceRegistered,
    SliceStitched,
    TileCoord,
    TileProcessed,
)
from messages.paths import PathEscapeError
from services.atomic import zarr_attrs
from services.config import ConfigError, format_validation_error
from services.layout import axis_volume_path, products_path
from services.metrics import UPLOAD_ARTIFACTS, UPLOAD_SECONDS
from services.stage import Context, PermanentError, Result, Stage
from services.storage import (
    Storage,
    StorageAccessError,
    StorageConfigError,
    StorageSettings,
    UploadReport,
    check_key,
)

PRODUCTS = ("psoct", "raw", "mosaic", "volume", "axis", "axisvolume", "mosaicvolume")
_TILE_KEY = "sample-slice{slice:04d}_acq-m{mosaic}_chunk-r{row:03d}c{col:03d}_{product}{ext}"
DEFAULT_KEYS: dict[str, str] = {
    "psoct": "sub-{acq}/micr/tiles/slice{slice:04d}/sub-{acq}_" + _TILE_KEY,
    "raw": "sub-{acq}/micr/raw/slice{slice:04d}/sub-{acq}_" + _TILE_KEY,
    "mosaic": "sub-{acq}/micr/sub-{acq}_sample-slice{slice:04d}_acq-m{mosaic}_{product}{ext}",
    "volume": "sub-{acq}/micr/sub-{acq}_acq-m{mosaic}_{product}{ext}",
    "axis": "sub-{acq}/micr/sub-{acq}_sample-slice{slice:04d}_acq-m{mosaic}_{product}{ext}",
    "axisvolume": "sub-{acq}/micr/sub-{acq}_acq-m{mosaic}_{product}{ext}",
    "mosaicvolume": "sub-{acq}/micr/volumes/sub-{acq}_{name}",
}
COMMON_FIELDS = ("acq", "slice", "mosaic", "product", "name", "stem", "ext")
TILE_FIELDS = (*COMMON_FIELDS, "row", "col", "tile")
EXTENSIONS = (".ome.zarr", ".zarr", ".nii.gz", ".nii", ".tiff", ".tif", ".raw", ".bin")


def split_name(name: str) -> tuple[str, str]:
    """`slice0001-m0.ome.zarr` -> (`slice0001-m0`, `.ome.zarr`)."""
    for ext in EXTENSIONS:
        if name.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)], ext
    suffix = PurePosixPath(name).suffix
    return name[: len(name) - len(suffix)], suffix


def key_fields(
    acq: str, product: str, source: str, tile: TileCoord | None, slice_index: int, mosaic: int
) -> dict[str, Any]:
    """Template fields of one artifact."""
    name = PurePosixPath(source).name
    stem, ext = split_name(name)
    fields: dict[str, Any] = {
        "acq": acq,
        "slice": slice_index,
        "mosaic": mosaic,
        "product": product,
        "name": name,
        "stem": stem,
        "ext": ext,
    }
    if tile is not None:
        fields.update(row=tile.row, col=tile.col, tile=tile.token())
    return fields


def render_key(template: str, fields: dict[str, Any]) -> str:
    """The object key of an artifact (relative to the destination URL)."""
    return check_key(template.format(**fields))


class UploadOptions(StorageSettings):
    """`[stages.upload] options`: the destination (see `StorageSettings`) plus the layout."""

    key_template: str | dict[str, str] = Field(
        default_factory=dict,
        description="one template for every product, or {psoct, raw, mosaic, volume} overrides",
    )
    include_raw: bool = False
    delete_after_upload: bool = False
    delete_when: Literal["stitched", "uploaded"] = "stitched"

    @model_validator(mode="after")
    def _templates_render(self) -> UploadOptions:
        given = self.key_template
        if isinstance(given, dict) and set(given) - set(PRODUCTS):
            unknown = sorted(set(given) - set(PRODUCTS))
            raise ValueError(f"key_template: unknown products {unknown}; known: {PRODUCTS}")
        tile = TileCoord(slice=1, mosaic=0, row=2, col=3)
        for product, template in self.templates().items():
            allowed = TILE_FIELDS if product in ("psoct", "raw") else COMMON_FIELDS
            used = {
                f.split(".")[0].split("[")[0]
                for _, f, _, _ in string.Formatter().parse(template)
                if f is not None
            }
            if "" in used or used - set(allowed):
                bad = sorted(used - set(allowed)) or ["{} (positional)"]
                raise ValueError(
                    f"key_template for {product}: unknown fields {bad}; allowed: {allowed}"
                )
            sample = key_fields("acq", product, "x/name.zarr", tile, 1, 0)
            try:
                render_key(template, sample)
            except (ValueError, KeyError, IndexError) as exc:
                raise ValueError(f"key_template for {product} does not render: {exc}") from None
        return self

    def templates(self) -> dict[str, str]:
        if isinstance(self.key_template, str):
            return dict.fromkeys(PRODUCTS, self.key_template)
        return {**DEFAULT_KEYS, **self.key_template}


def parse_options(options: dict[str, Any]) -> UploadOptions:
    """Validated options; a `ConfigError` naming each bad field otherwise."""
    try:
        return UploadOptions.model_validate(options)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, "[stages.upload] options")) from None


@dataclass
class Artifact:
    """One thing to upload, resolved from an event."""

    product: str
    root: str  # "raw", "work" or "output"
    source: str  # root-relative path
    key: str
    tile: TileCoord | None = None
    slice: int | None = None
    deletable: bool = False
    local: Path = field(default_factory=Path)


class Upload(Stage):
    """Upload each artifact an event names; publish `artifact_uploaded` per artifact."""

    name = "upload"
    consumes = (TileProcessed, SliceStitched, SliceRegistered, SliceAxis)
    produces = (ArtifactUploaded,)
    defaults: ClassVar[dict[str, Any]] = {"enabled": False, "concurrency": 4, "ack_wait_s": 60}

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.options = parse_options(self.settings.options)
        self.templates = self.options.templates()
        try:
            self.storage = Storage(self.options)
        except StorageConfigError as exc:
            raise ConfigError(f"[stages.upload] options: {exc}") from None

    async def handle(self, event: Event, ctx: Context) -> Result:
        try:
            artifacts = self._artifacts(event)
        except (PathEscapeError, StorageConfigError) as exc:
            raise PermanentError(str(exc)) from None
        events: list[ArtifactUploaded] = []
        hashed = sent = 0
        for artifact in artifacts:
            try:
                report = await self._upload(artifact, ctx)
            except (StorageAccessError, StorageConfigError) as exc:
                UPLOAD_ARTIFACTS.labels(artifact.product, "failed").inc()
                raise PermanentError(str(exc)) from None
            except Exception:
                UPLOAD_ARTIFACTS.labels(artifact.product, "failed").inc()
                raise
            hashed += report.bytes_hashed
            sent += report.bytes_sent
            events.append(
                ArtifactUploaded(
                    acq=event.acq,
                    tile=artifact.tile,
                    slice=artifact.slice,
                    product=artifact.product,
                    source=artifact.source,
                    key=report.url,
                    bytes=report.bytes,
                    checksum=report.checksum,
                    seconds=round(report.seconds, 6),
                    producer=self.name,
                )
            )
        for artifact in artifacts:
            if artifact.deletable and artifact.local.is_dir():
                await asyncio.to_thread(shutil.rmtree, artifact.local)
                ctx.log.info("local_artifact_deleted", source=artifact.source)
        return Result(events=events, bytes_read=hashed, bytes_written=sent)

    async def _upload(self, artifact: Artifact, ctx: Context) -> UploadReport:
        if not artifact.local.exists():
            # deleted after an earlier upload: republish from the completeness marker
            listing = await self.storage.stored_listing(artifact.key)
            if listing is None:
                raise FileNotFoundError(
                    f"{artifact.source} is missing under the {artifact.root} root "
                    f"and not stored at {self.storage.url_of(artifact.key)}"
                )
            url = self.storage.url_of(artifact.key)
            report = UploadReport(artifact.key, url, listing.bytes, listing.checksum, 0.0)
            report.objects_skipped = len(listing.files)
        else:
            report = await self.storage.upload(artifact.key, artifact.local, artifact.product)
        outcome = "skipped" if report.skipped else "uploaded"
        UPLOAD_ARTIFACTS.labels(artifact.product, outcome).inc()
        UPLOAD_SECONDS.labels(artifact.product).observe(report.seconds)
        ctx.log.info(
            "artifact_" + outcome,
            product=artifact.product,
            key=report.url,
            bytes=report.bytes,
            bytes_sent=report.bytes_sent,
            objects_uploaded=report.objects_uploaded,
            objects_skipped=report.objects_skipped,
            seconds=round(report.seconds, 3),
            mb_per_s=round(report.bytes_sent / max(report.seconds, 1e-9) / 1e6, 1),
        )
        return report

    def _artifacts(self, event: Event) -> list[Artifact]:
        roots = self.config.roots
        found: list[Artifact] = []

        def add(
            product: str,
            root: str,
            source: str,
            tile: TileCoord | None,
            sl: int,
            mos: int,
            deletable: bool = False,
        ) -> None:
            fields = key_fields(event.acq, product, source, tile, sl, mos)
            key = render_key(self.templates[product], fields)
            local = roots.resolve(root, source)
            found.append(
                Artifact(product, root, source, key, tile, None if tile else sl, deletable, local)
            )

        delete = self.options.delete_after_upload
        if isinstance(event, TileProcessed):
            tile = event.tile
            groups = sorted({str(PurePosixPath(p).parent) for p in event.products.values()})
            now = delete and self.options.delete_when == "uploaded"
            for group in groups:
                add("psoct", "work", group, tile, tile.slice, tile.mosaic, deletable=now)
            if self.options.include_raw:
                add("raw", "raw", self._raw_path(groups[0]), tile, tile.slice, tile.mosaic)
        elif isinstance(event, SliceStitched):
            add("mosaic", "output", event.path, None, event.slice, event.mosaic)
            for volume in event.volumes.values():  # the 3-D volume mosaics (dBI, R3D, O3D)
                add("mosaicvolume", "output", volume, None, event.slice, event.mosaic)
            if delete and self.options.delete_when == "stitched":
                for pos in event.positions:  # the stitched tiles' products, if still here
                    tile = TileCoord(
                        slice=event.slice, mosaic=event.mosaic, row=pos.row, col=pos.col
                    )
                    group = products_path(event.acq, tile)
                    if roots.resolve("work", group).is_dir():
                        add("psoct", "work", group, tile, tile.slice, tile.mosaic, True)
        elif isinstance(event, SliceRegistered):
            add("volume", "output", event.path, None, event.slice, event.mosaic)
        elif isinstance(event, SliceAxis):
            add("axis", "output", event.path, None, event.slice, event.mosaic)
        if isinstance(event, SliceRegistered | SliceAxis):
            # the stacked axis products, when register has written (a plane of) them
            stacked = axis_volume_path(event.acq)
            if (roots.resolve("output", stacked) / "zarr.json").is_file():
                add("axisvolume", "output", stacked, None, event.slice, event.mosaic)
        if len({a.key for a in found}) != len(found):
            raise StorageConfigError("key_template maps two artifacts of one event to one key")
        return found

    def _raw_path(self, products: str) -> str:
        """The raw tile behind a product group (products -> converted store -> raw file)."""
        roots = self.config.roots
        converted = zarr_attrs(roots.resolve("work", products)).get("source_path")
        raw = zarr_attrs(roots.resolve("work", converted)).get("raw_path") if converted else None
        if not raw:
            where = converted or products
            raise FileNotFoundError(f"include_raw: no raw_path recorded in {where}/zarr.json")
        return raw
