"""upload: tile products, mosaics, the registered volume (optionally raw tiles) -> object storage.

Consumes `tile_processed` (the tile's product group under the work root; with `include_raw`
also its raw file, found through the products' `source_path` and the converted store's
`raw_path`), `slice_stitched`, `slice_registered` and `slice_axis` (paths under the output
root; `slice_registered` and `slice_axis` also send the stacked axis volume once register has
written it: product `axisvolume`; a slice's axis products are product `axis`; the NIfTI copies
and previews a `slice_stitched` or `slice_axis` lists in `exports` are products
`mosaic_nifti`, `mosaic_preview`, `axis_nifti`, `axis_preview`, unless
`include_exports = false`; the 3-D volume mosaics (dBI, R3D, O3D) a `slice_stitched` lists in
`volumes` are product `mosaicvolume`, named by `[names] mosaic_volume` in the DANDI layout). Each
artifact is uploaded by `services.io.storage.Storage` (checksums, verification, completeness
marker, retries: see that module) and announced by one `artifact_uploaded` event whose `key`
is the artifact's full URL.

Off until configured (`enabled = true` and a `url`):

    [stages.upload]
    enabled = true
    concurrency = 4                  # events handled at once

    [stages.upload.options]          # UploadOptions (docs/options.md)
    url = "s3://bucket/prefix"
    region = "eu-west-1"
    concurrency = 8                  # files uploaded at once
    layout = "tilepipe"

Keys: `layout = "tilepipe"` renders `key_template` (defaults `DEFAULT_KEYS`); `layout =
"dandi"` names each artifact with the acquisition's manifest `[names]` (services/core/names.py,
read through `tp-acquisitions`) under `rawdata/sub-<id>/micr/` (raw archives) or
`derivatives/tilepipe/sub-<id>/micr/` (products), plus the dataset_description.json files.
`archive_raw` adds product `rawarchive` per tile: a .nii.gz archival copy of its raw file with
the raw file's SHA-256 in the event (services/stages/upload_raw.py, which also owns the
opt-in `delete_raw_after_verified_upload`, the only deletion of raw data in tilepipe).

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
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, model_validator

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
from services.core.errors import ConfigError, PermanentError, StorageAccessError, StorageConfigError
from services.core.manifest import Manifest
from services.core.metrics import UPLOAD_ARTIFACTS, UPLOAD_SECONDS
from services.core.names import KINDS, dandi_key, dataset_descriptions
from services.io.atomic import atomic_file
from services.io.layout import archive_path, axis_volume_path, products_path
from services.io.raw_archive import COMPRESS_LEVEL
from services.io.storage import Storage, StorageSettings, UploadReport, check_key
from services.runtime.options import StageOptions
from services.runtime.stage import Context, Result, Stage
from services.stages.upload_raw import RawArchiver, RawSource, raw_source
from services.state.acquisitions import manifest_at

PRODUCTS = (
    "psoct",
    "raw",
    "rawarchive",
    "mosaic",
    "volume",
    "axis",
    "axisvolume",
    "mosaicvolume",
    "mosaic_nifti",
    "mosaic_preview",
    "axis_nifti",
    "axis_preview",
)
# product -> its [names] template in the DANDI layout
NAME_KINDS = {
    "psoct": "tile_products",
    "rawarchive": "raw_archive",
    "mosaic": "mosaic",
    "volume": "volume",
    "axis": "axis",
    "axisvolume": "axis_volume",
    "mosaicvolume": "mosaic_volume",
}
EXPORT_PRODUCTS = ("mosaic_nifti", "mosaic_preview", "axis_nifti", "axis_preview")
NIFTI_EXT, PREVIEW_EXT = ".nii.gz", ".png"
AXIS_PRIMARY = "vector"  # the lab's 3-D axis file (oct_vec_3d); the other axis maps add a suffix


def export_key(manifest: Manifest, product: str, source: str, sl: int, mos: int) -> str:
    """DANDI key of a NIfTI copy or preview (services/io/exports.py) from the manifest's [names]:
    a mosaic's maps by `mosaic_enface` (modality = the toolbox key) and its mask by
    `mosaic_mask`; a slice's axis field by `slice_axis`, its other maps by the same name with
    `_<key>` before the extension; previews are named like their NIfTI with `.png`, under
    `previews/`."""
    key = split_name(PurePosixPath(source).name)[0]
    if product.startswith("mosaic_"):
        if key == "mask":
            kind, name = (
                "mosaic_mask",
                manifest.published_name("mosaic_mask", slice_index=sl, mosaic=mos),
            )
        else:
            kind, name = (
                "mosaic_enface",
                manifest.published_name("mosaic_enface", slice_index=sl, mosaic=mos, modality=key),
            )
    else:
        kind, name = "slice_axis", manifest.published_name("slice_axis", slice_index=sl)
        if key != AXIS_PRIMARY:
            name = name.removesuffix(NIFTI_EXT) + f"_{key}{NIFTI_EXT}"
    if product.endswith("_preview"):
        name = "previews/" + name.removesuffix(NIFTI_EXT) + PREVIEW_EXT
    return dandi_key(kind, manifest.subject, name)


_TILE_KEY = "sample-slice{slice:04d}_acq-m{mosaic}_chunk-r{row:03d}c{col:03d}_{product}{ext}"
DEFAULT_KEYS: dict[str, str] = {
    "psoct": "sub-{acq}/micr/tiles/slice{slice:04d}/sub-{acq}_" + _TILE_KEY,
    "raw": "sub-{acq}/micr/raw/slice{slice:04d}/sub-{acq}_" + _TILE_KEY,
    "rawarchive": "sub-{acq}/micr/raw/slice{slice:04d}/sub-{acq}_" + _TILE_KEY,
    "mosaic": "sub-{acq}/micr/sub-{acq}_sample-slice{slice:04d}_acq-m{mosaic}_{product}{ext}",
    "volume": "sub-{acq}/micr/sub-{acq}_acq-m{mosaic}_{product}{ext}",
    "axis": "sub-{acq}/micr/sub-{acq}_sample-slice{slice:04d}_acq-m{mosaic}_{product}{ext}",
    "axisvolume": "sub-{acq}/micr/sub-{acq}_acq-m{mosaic}_{product}{ext}",
    "mosaicvolume": "sub-{acq}/micr/volumes/sub-{acq}_{name}",
    # NIfTI copies and previews (services/io/exports.py): stem = the product key (aip, ori, ...)
    "mosaic_nifti": "sub-{acq}/micr/sub-{acq}_sample-slice{slice:04d}_acq-m{mosaic}_proc-{stem}"
    "{ext}",
    "mosaic_preview": "sub-{acq}/micr/previews/sub-{acq}_sample-slice{slice:04d}_acq-m{mosaic}"
    "_proc-{stem}{ext}",
    "axis_nifti": "sub-{acq}/micr/sub-{acq}_sample-slice{slice:04d}_proc-3daxis-{stem}{ext}",
    "axis_preview": "sub-{acq}/micr/previews/sub-{acq}_sample-slice{slice:04d}_proc-3daxis-{stem}"
    "{ext}",
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


class UploadOptions(StorageSettings, StageOptions):
    """`[stages.upload] options`: the destination (see `StorageSettings`) plus the layout."""

    key_template: str | dict[str, str] = Field(
        default_factory=dict,
        description="one template for every product, or {psoct, raw, mosaic, volume} overrides",
    )
    include_raw: bool = Field(default=False, description="also upload each tile's raw file")
    include_exports: bool = Field(
        default=True, description="the NIfTI copies and previews a slice event lists"
    )
    delete_after_upload: bool = Field(
        default=False, description="remove tile product groups from the work root once verified"
    )
    delete_when: Literal["stitched", "uploaded"] = Field(
        default="stitched",
        description="on the mosaic's slice_stitched, or right after the tile's upload",
    )
    layout: Literal["tilepipe", "dandi"] = Field(
        default="tilepipe",
        description="tilepipe: keys from key_template; dandi: rawdata/ and derivatives/ with "
        "the manifest's [names]",
    )
    archive_raw: bool = Field(
        default=False, description="upload a .nii.gz archival copy of every raw tile"
    )
    archive_level: Annotated[int, Field(ge=1, le=9)] = Field(
        default=COMPRESS_LEVEL, description="gzip level of the archival copies"
    )
    archive_threads: Annotated[int, Field(ge=1, le=64)] = Field(
        default=1,
        description="threads compressing one archive (> 1: one gzip member per 16 MiB block)",
    )
    delete_raw_after_verified_upload: bool = Field(
        default=False,
        description="delete the local raw file once its archive is uploaded and read back",
    )

    @model_validator(mode="after")
    def _templates_render(self) -> UploadOptions:
        if self.delete_raw_after_verified_upload and not self.archive_raw:
            raise ValueError("delete_raw_after_verified_upload needs archive_raw = true")
        if self.layout == "dandi" and (self.key_template or self.include_raw):
            raise ValueError(
                "layout = 'dandi' takes its names from the manifest's [names]: no key_template, "
                "no include_raw (archive_raw uploads the raw tiles)"
            )
        given = self.key_template
        if isinstance(given, dict) and set(given) - set(PRODUCTS):
            unknown = sorted(set(given) - set(PRODUCTS))
            raise ValueError(f"key_template: unknown products {unknown}; known: {PRODUCTS}")
        tile = TileCoord(slice=1, mosaic=0, row=2, col=3)
        for product, template in self.templates().items():
            allowed = TILE_FIELDS if product in ("psoct", "raw", "rawarchive") else COMMON_FIELDS
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
    raw_source: RawSource | None = None  # rawarchive: the raw tile it is made from


class Upload(Stage):
    """Upload each artifact an event names; publish `artifact_uploaded` per artifact."""

    name = "upload"
    consumes = (TileProcessed, SliceStitched, SliceRegistered, SliceAxis)
    produces = (ArtifactUploaded,)
    defaults: ClassVar[dict[str, Any]] = {"enabled": False, "concurrency": 4, "ack_wait_s": 60}
    options_model = UploadOptions
    options: UploadOptions

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.templates = self.options.templates()
        try:
            self.storage = Storage(self.options)
        except StorageConfigError as exc:
            raise ConfigError(f"stages.{self.name}.options: {exc}") from None
        self.archiver = RawArchiver(
            self.config.roots,
            self.storage,
            self.options.archive_level,
            self.options.delete_raw_after_verified_upload,
            self.options.archive_threads,
        )
        self._described: set[str] = set()

    async def handle(self, event: Event, ctx: Context) -> Result:
        manifest = None
        if self.options.layout == "dandi":
            manifest = await self._manifest(event.acq, ctx)
            await self._describe_dataset(manifest, ctx)
        try:
            artifacts = self._artifacts(event, manifest)
        except (PathEscapeError, StorageConfigError) as exc:
            raise PermanentError(str(exc)) from None
        events: list[ArtifactUploaded] = []
        hashed = sent = 0
        for artifact in artifacts:
            raw = None
            try:
                if artifact.product == "rawarchive":
                    outcome = await self.archiver.run(
                        artifact.raw_source, artifact.source, artifact.key, ctx.log, ctx.force
                    )
                    report, raw = outcome.report, outcome.raw
                    self._log_upload(artifact, report, ctx)
                else:
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
                    raw=raw,
                    producer=self.name,
                )
            )
        for artifact in artifacts:
            if artifact.deletable and artifact.local.is_dir():
                await asyncio.to_thread(shutil.rmtree, artifact.local)
                ctx.log.info("local_artifact_deleted", source=artifact.source)
        return Result(events=events, bytes_read=hashed, bytes_written=sent)

    async def _manifest(self, acq: str, ctx: Context) -> Manifest:
        record = await ctx.acquisition(acq)
        if record is None:
            raise RuntimeError(f"acquisition {acq} is not registered yet (its names are unknown)")
        return manifest_at(self.config.roots.raw, record["manifest"])

    async def _describe_dataset(self, manifest: Manifest, ctx: Context) -> None:
        """The DANDI/BIDS dataset-level files, once per acquisition and process."""
        if manifest.id in self._described:
            return

        try:
            ours = version("tilepipe")
        except PackageNotFoundError:
            ours = "unknown"
        for key, body in dataset_descriptions(manifest.project, ours).items():
            local = self.config.roots.resolve("work", f"{manifest.id}/dandi/{key}")
            local.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(local) as tmp:
                tmp.write_bytes(body)
            report = await self.storage.upload(key, local, "dataset")
            ctx.log.info("dataset_description_uploaded", key=report.url)
        self._described.add(manifest.id)

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
        self._log_upload(artifact, report, ctx)
        return report

    def _log_upload(self, artifact: Artifact, report: UploadReport, ctx: Context) -> None:
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

    def _key(
        self,
        manifest: Manifest | None,
        acq: str,
        product: str,
        source: str,
        tile: TileCoord | None,
        sl: int,
        mos: int,
    ) -> str:
        """An artifact's object key: key_template, or the DANDI layout's path for its
        [names] template."""
        if manifest is None:
            fields = key_fields(acq, product, source, tile, sl, mos)
            return render_key(self.templates[product], fields)
        if product in EXPORT_PRODUCTS:
            return check_key(export_key(manifest, product, source, sl, mos))
        if product == "mosaicvolume":  # `...-dBI.ome.zarr`: the modality ends the stem
            modality = split_name(PurePosixPath(source).name)[0].rsplit("-", 1)[-1]
            name = manifest.published_name(
                "mosaic_volume", slice_index=sl, mosaic=mos, modality=modality
            )
            return check_key(dandi_key("mosaic_volume", manifest.subject, name))
        kind = NAME_KINDS[product]
        spec = KINDS[kind]
        name = manifest.published_name(
            kind,
            tile=tile if "tile" in spec.fields else None,
            slice_index=sl if "slice" in spec.fields and tile is None else None,
            mosaic=mos if "acq" in spec.fields and tile is None else None,
        )
        return check_key(dandi_key(kind, manifest.subject, name))

    def _artifacts(self, event: Event, manifest: Manifest | None = None) -> list[Artifact]:
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
        ) -> Artifact:
            key = self._key(manifest, event.acq, product, source, tile, sl, mos)
            local = roots.resolve(root, source)
            found.append(
                Artifact(product, root, source, key, tile, None if tile else sl, deletable, local)
            )
            return found[-1]

        delete = self.options.delete_after_upload
        if isinstance(event, TileProcessed):
            tile = event.tile
            groups = sorted({str(PurePosixPath(p).parent) for p in event.products.values()})
            now = delete and self.options.delete_when == "uploaded"
            for group in groups:
                add("psoct", "work", group, tile, tile.slice, tile.mosaic, deletable=now)
            if self.options.include_raw:
                add("raw", "raw", raw_source(roots, groups[0]).path, tile, tile.slice, tile.mosaic)
            if self.options.archive_raw:
                archive = add(
                    "rawarchive",
                    "work",
                    archive_path(event.acq, tile),
                    tile,
                    tile.slice,
                    tile.mosaic,
                )
                archive.raw_source = raw_source(roots, groups[0])
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
        if isinstance(event, SliceStitched | SliceAxis) and self.options.include_exports:
            origin = "mosaic" if isinstance(event, SliceStitched) else "axis"
            for name, source in sorted(event.exports.items()):
                kind = "nifti" if name.startswith("nifti.") else "preview"
                add(f"{origin}_{kind}", "output", source, None, event.slice, event.mosaic)
        if isinstance(event, SliceRegistered | SliceAxis):
            # the stacked axis products, when register has written (a plane of) them
            stacked = axis_volume_path(event.acq)
            if (roots.resolve("output", stacked) / "zarr.json").is_file():
                add("axisvolume", "output", stacked, None, event.slice, event.mosaic)
        if len({a.key for a in found}) != len(found):
            raise StorageConfigError("key_template maps two artifacts of one event to one key")
        return found
