"""convert: a raw tile (read-only) -> a validated, chunked Zarr v3 store under the work root.

Spectral tiles are stored as `uint16[B, 2, A, S]`; complex tiles (`nifti-complex`) as
`complex64[B, 2, A, Z]` in tilepipe's convention. The store's attributes carry the calibration
and the processing conventions the acquisition's manifest resolves to, so `process` computes
exactly what the manifest said when the tile was converted.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, ClassVar

import zarr
from zarr.codecs import BloscCodec

from messages.events import TileArrived, TileConverted, utcnow
from services.acquisitions import manifest_at
from services.atomic import COMPLETE_ATTR, atomic_directory, is_complete
from services.layout import converted_path
from services.rawio import read_tile
from services.stage import Context, PermanentError, Result, Stage

COMPRESSOR = BloscCodec(cname="lz4", clevel=1, shuffle="bitshuffle")


class Convert(Stage):
    """Validate a raw tile against its manifest and store it chunked by B-line."""

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
        written = 0
        if ctx.force or not is_complete(target, **source):
            started = time.perf_counter()
            data = read_tile(raw_file, layout)  # a FIFO, a corrupt or truncated tile: fails at once
            cal = manifest.spectrometer()
            params = manifest.processing_params()
            with atomic_directory(target) as tmp:
                array = zarr.create_array(
                    store=str(tmp),
                    shape=data.shape,
                    dtype=data.dtype,
                    chunks=(1, *data.shape[1:]),
                    compressors=COMPRESSOR,
                    dimension_names=(
                        "bline",
                        "channel",
                        "aline",
                        "depth" if layout.complex else "sample",
                    ),
                    attributes={
                        "acq": event.acq,
                        "tile": event.tile.model_dump(),
                        "layout": f"{data.dtype.name}[B, 2, A, {'Z' if layout.complex else 'S'}]",
                        "raw_format": layout.format,
                        "calibration": _jsonable(dataclasses.asdict(cal)),
                        "processing": _jsonable(dataclasses.asdict(params)),
                        **source,
                    },
                )
                array[:] = data
                array.attrs[COMPLETE_ATTR] = True
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
                    producer=self.name,
                )
            ],
            bytes_read=stat.st_size if written else 0,
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
