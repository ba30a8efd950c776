"""convert: a raw tile (read-only) checked against its manifest, and its processing recipe.

Checks what can be checked before any processing (a regular file, its size, its NIfTI header,
the tile inside the lattice) and records, in a small Zarr group under the work root (no data),
the raw file (path, size, mtime, format and layout), the calibration and the processing
conventions the acquisition's manifest resolves to at that moment, so `process` computes exactly
what the manifest said. It does not copy or re-encode the tile: `process` streams the raw file
itself. Cost per tile: a stat, the 352-byte header, the manifest's calibration (cached), a few
kilobytes written; milliseconds for a 1 GB tile.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, ClassVar

import zarr

from messages.events import TileArrived, TileConverted, utcnow
from services.core.errors import PermanentError
from services.core.manifest import NIFTI_HEADER_BYTES
from services.io.atomic import (
    BASIS_ATTR,
    COMPLETE_ATTR,
    atomic_directory,
    basis_digest,
    is_complete,
)
from services.io.layout import converted_path
from services.io.rawio import open_tile
from services.runtime.stage import Context, Result, Stage
from services.state.acquisitions import manifest_at


class Convert(Stage):
    """Check a raw tile against its manifest and record how to process it."""

    name = "convert"
    consumes = (TileArrived,)
    produces = (TileConverted,)
    defaults: ClassVar[dict[str, Any]] = {"concurrency": 2, "ack_wait_s": 60}

    def handle(self, event: TileArrived, ctx: Context) -> Result:
        roots = self.config.roots
        manifest = manifest_at(roots.raw, event.manifest)  # InvalidManifest: fails at once
        outside = manifest.outside(event.tile)
        if outside is not None:  # no output, no work downstream for a tile nobody expects
            raise PermanentError(outside)
        layout = manifest.geometry(event.tile.mosaic).raw
        raw_file = roots.resolve("raw", event.path)
        stat = raw_file.stat()
        rel = converted_path(event.acq, event.tile)
        target = roots.resolve("work", rel)
        source = {
            "raw_path": event.path,
            "raw_size": stat.st_size,
            "raw_mtime_ns": stat.st_mtime_ns,
        }
        cal = _jsonable(dataclasses.asdict(manifest.spectrometer()))
        params = _jsonable(dataclasses.asdict(manifest.processing_params()))
        recipe = {
            "layout": layout.model_dump(mode="json"),
            "calibration": cal,
            "processing": params,
        }
        basis = basis_digest([source, recipe])  # a calibration fix changes it: recomputed
        written = 0
        unchanged = not ctx.force and is_complete(target, **{BASIS_ATTR: basis})
        if not unchanged:
            started = time.perf_counter()
            with open_tile(raw_file, layout):  # a FIFO, a corrupt or truncated tile: fails at once
                pass
            with atomic_directory(target) as tmp:
                group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
                group.attrs.update(
                    {
                        "acq": event.acq,
                        "tile": event.tile.model_dump(),
                        "raw_format": layout.format,
                        **recipe,
                        **source,
                        BASIS_ATTR: basis,
                    }
                )
                group.attrs[COMPLETE_ATTR] = True
            written = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
            ctx.log.info(
                "tile_converted",
                seconds=round(time.perf_counter() - started, 3),
                bytes_written=written,
            )
        return Result(
            events=[
                TileConverted(
                    acq=event.acq,
                    tile=event.tile,
                    path=rel,
                    raw_path=event.path,
                    shape=_shape(layout),
                    dtype="complex64" if layout.complex else "uint16",
                    completed_at=utcnow(),
                    basis=basis,
                    producer=self.name,
                )
            ],
            unchanged=unchanged,
            bytes_read=NIFTI_HEADER_BYTES if written and layout.format != "raw12" else 0,
            bytes_written=written,
        )


def _shape(layout) -> list[int]:
    last = layout.complex_depth if layout.complex else layout.samples
    return [layout.bscans, 2, layout.alines, last]


def _jsonable(value):
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value
