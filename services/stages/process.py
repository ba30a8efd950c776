"""process: a converted tile -> PS-OCT volumes and en-face images (GPU when present)."""

from __future__ import annotations

import time
from typing import Any, ClassVar

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from kernels.backend import device_name, get_xp
from kernels.calibration import SpectrometerCalibration
from kernels.pipeline import ProcessingParams, process_tile
from messages.events import TileConverted, TileProcessed, utcnow
from services.atomic import COMPLETE_ATTR, atomic_directory, is_complete, zarr_attrs
from services.layout import products_path
from services.metrics import TILES_BY_DEVICE
from services.stage import Context, Result, Stage

COMPRESSOR = BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")
VOLUMES = ("db", "retardance", "orientation")
ENFACE = {
    "aip": "aip",
    "mip": "mip",
    "enface_retardance": "retardance_enface",
    "enface_orientation": "orientation_enface",
    "birefringence": "birefringence",
    "surface": "surface",
}


def processing_params(options: dict) -> ProcessingParams:
    """Kernel parameters from the stage's `options` (unknown keys are an error)."""
    fields = set(ProcessingParams.__dataclass_fields__)
    given = {k: v for k, v in options.items() if k != "device"}
    unknown = set(given) - fields
    if unknown:
        raise ValueError(f"unknown process options {sorted(unknown)}; known: {sorted(fields)}")
    return ProcessingParams(**given)


class Process(Stage):
    """Run the kernel chain and store products as one Zarr group per tile."""

    name = "process"
    consumes = (TileConverted,)
    produces = (TileProcessed,)
    defaults: ClassVar[dict[str, Any]] = {"concurrency": 1, "ack_wait_s": 120}

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.params = processing_params(self.settings.options)
        self.xp = get_xp(self.settings.options.get("device", "auto"))
        self.device = device_name(self.xp)

    def handle(self, event: TileConverted, ctx: Context) -> Result:
        roots = self.config.roots
        source_dir = roots.resolve("work", event.path)
        source_attrs = zarr_attrs(source_dir)
        if not source_attrs.get(COMPLETE_ATTR):
            raise FileNotFoundError(f"converted tile {event.path} is missing or incomplete")
        rel = products_path(event.acq, event.tile)
        target = roots.resolve("work", rel)
        source = {"source_path": event.path, "source_mtime_ns": source_attrs["raw_mtime_ns"]}
        started = time.perf_counter()
        device = self.device
        read = written = 0
        if not ctx.force and is_complete(target, **source):
            device = zarr_attrs(target).get("device", device)
        else:
            raw = zarr.open_array(str(source_dir), mode="r")[:]
            read = raw.nbytes
            cal = SpectrometerCalibration(**source_attrs["calibration"])
            data = raw if self.xp is np else self.xp.asarray(raw)
            products = process_tile(data, cal, self.params, xp=self.xp)
            device = products.device
            written = self._write(target, products, event, source)
        seconds = time.perf_counter() - started
        TILES_BY_DEVICE.labels(device).inc()
        names = {**{v: f"{rel}/{v}" for v in VOLUMES}, **{v: f"{rel}/{v}" for v in ENFACE.values()}}
        return Result(
            events=[
                TileProcessed(
                    acq=event.acq,
                    tile=event.tile,
                    products=names,
                    device=device,
                    seconds=seconds,
                    completed_at=utcnow(),
                    producer=self.name,
                )
            ],
            bytes_read=read,
            bytes_written=written,
        )

    def _write(self, target, products, event: TileConverted, source: dict) -> int:
        with atomic_directory(target) as tmp:
            group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
            for name in VOLUMES:
                vol = getattr(products, name)
                group.create_array(
                    name,
                    data=vol.astype(np.float32),
                    chunks=(min(16, vol.shape[0]), *vol.shape[1:]),
                    compressors=COMPRESSOR,
                    dimension_names=("bline", "aline", "depth"),
                )
            for attr, name in ENFACE.items():
                img = np.asarray(getattr(products, attr))
                group.create_array(
                    name,
                    data=img,
                    chunks=img.shape,
                    compressors=COMPRESSOR,
                    dimension_names=("bline", "aline"),
                )
            group.attrs.update(
                {
                    "acq": event.acq,
                    "tile": event.tile.model_dump(),
                    "device": products.device,
                    "params": self.params.__dict__,
                    **source,
                }
            )
            group.attrs[COMPLETE_ATTR] = True
        return sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
