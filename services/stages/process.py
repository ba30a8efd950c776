"""process: a converted tile -> PS-OCT volumes and en-face images (GPU when present).

The tile is streamed through the kernels in B-line blocks (`kernels.streaming`): read block by
block, volumes written into the products group as each block is done, en-face maps at the end,
so a worker's memory is set by the block size, not the tile size.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Literal

import numpy as np
import zarr
from pydantic import Field, model_validator
from zarr.codecs import BloscCodec

from kernels.backend import device_name, get_xp
from kernels.calibration import SpectrometerCalibration
from kernels.pipeline import ProcessingParams
from kernels.spectral import output_depth, validate_input
from kernels.streaming import CPU_BLOCK_BSCANS, stream_tile
from messages.events import TileConverted, TileProcessed, utcnow
from services.core.errors import PermanentError
from services.core.manifest import RawLayout
from services.core.metrics import TILES_BY_DEVICE
from services.io.atomic import (
    BASIS_ATTR,
    COMPLETE_ATTR,
    atomic_directory,
    basis_digest,
    is_complete,
    zarr_attrs,
)
from services.io.layout import products_path
from services.io.rawio import open_tile
from services.runtime.options import StageOptions
from services.runtime.stage import Context, Result, Stage

# The products' codec (`[stages.process] options.compression`): lz4 by default, the cheapest
# Blosc codec (about 2 s less CPU than zstd per 1 GB tile, ~4% larger stores on cheap content),
# since on a small host the write competes with the kernels for the cores; zstd for scarce
# disk, none for a fast disk and no spare core.
CODECS = {
    "lz4": BloscCodec(cname="lz4", clevel=1, shuffle="shuffle"),
    "zstd": BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"),
    "none": None,
}
PRODUCT_UNITS = {
    "db": "dB, 10*log10(|J1|^2 + |J2|^2)",
    "retardance": "degrees, atan(|J1|/|J2|), 0..90",
    "orientation": "degrees, optic-axis orientation (see params)",
    "aip": "dB, mean over the en-face window",
    "mip": "dB, max over the en-face window",
    "retardance_enface": "degrees, mean over the en-face window",
    "orientation_enface": "degrees, doubled-angle circular mean over the en-face window",
    "birefringence": "delta-n (dimensionless), retardance slope * wavelength / (360 * dz)",
    "surface": "depth index, 0-based",
    "surface_raw": "depth index, 0-based, before the lateral median (focus plane)",
    "axes": "volumes [bline, aline, depth], maps [bline, aline]; depth 0 is the shallowest "
    "kept FFT bin (the deepest with calibration.flip_z)",
}
VOLUMES = ("db", "retardance", "orientation")
ENFACE = {
    "aip": "aip",
    "mip": "mip",
    "enface_retardance": "retardance_enface",
    "enface_orientation": "orientation_enface",
    "birefringence": "birefringence",
    "surface": "surface",
    "surface_raw": "surface_raw",
}


RUNTIME_OPTIONS = ("batch_bscans", "gpu_memory_budget_bytes", "cpu_threads")
# Part of every product's basis: bump it when a change of the kernels changes their results,
# and a replay (`tilepipe replay process --from-seq N`) recomputes the tiles made before.
KERNELS_VERSION = 1
_PARAMS = ProcessingParams()


class ProcessOptions(StageOptions):
    """`[stages.process] options`: the stage's runtime knobs (the science is each
    acquisition's manifest's `[processing]`: a convention set here is an error naming it)."""

    device: Literal["auto", "cpu", "gpu"] = Field(
        default="auto", description="gpu: CuPy or fail; auto: the GPU when one is usable"
    )
    compression: Literal[tuple(CODECS)] = Field(  # type: ignore[valid-type]
        default="lz4", description="codec of the product volumes (zstd: scarce disk)"
    )
    batch_bscans: int | None = Field(
        default=_PARAMS.batch_bscans,
        description="B-lines per block; none picks one (CPU: 16, GPU: from the memory budget)",
    )
    gpu_memory_budget_bytes: int = Field(
        default=_PARAMS.gpu_memory_budget_bytes, description="device memory the GPU path may use"
    )
    cpu_threads: int | None = Field(
        default=_PARAMS.cpu_threads, description="threads on the CPU path; none: every core"
    )

    @model_validator(mode="before")
    @classmethod
    def _no_science(cls, data: Any) -> Any:
        conventions = set(ProcessingParams.__dataclass_fields__) - set(RUNTIME_OPTIONS)
        science = sorted(set(data) & conventions) if isinstance(data, dict) else []
        if science:
            raise ValueError(
                f"{science} are processing conventions: set them per acquisition in the "
                "manifest's [processing] table"
            )
        return data

    def runtime(self) -> dict[str, Any]:
        """The runtime knobs given (over the manifest's processing parameters)."""
        return self.model_dump(include=set(RUNTIME_OPTIONS), exclude_unset=True)


class Process(Stage):
    """Run the kernel chain and store products as one Zarr group per tile."""

    name = "process"
    consumes = (TileConverted,)
    produces = (TileProcessed,)
    defaults: ClassVar[dict[str, Any]] = {"concurrency": 1, "ack_wait_s": 120}
    options_model = ProcessOptions
    options: ProcessOptions

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.runtime = self.options.runtime()
        self.xp = get_xp(self.options.device)
        self.device = device_name(self.xp)
        self.codec = CODECS[self.options.compression]

    def handle(self, event: TileConverted, ctx: Context) -> Result:
        roots = self.config.roots
        source_dir = roots.resolve("work", event.path)
        source_attrs = zarr_attrs(source_dir)
        if not source_attrs.get(COMPLETE_ATTR):
            raise FileNotFoundError(f"converted tile {event.path} is missing or incomplete")
        rel = products_path(event.acq, event.tile)
        target = roots.resolve("work", rel)
        source = {"source_path": event.path, "source_mtime_ns": source_attrs["raw_mtime_ns"]}
        recipe = source_attrs.get(BASIS_ATTR) or [source, source_attrs.get("calibration")]
        basis = basis_digest([recipe, KERNELS_VERSION])  # runtime options change no result
        started = time.perf_counter()
        device = self.device
        read = written = 0
        unchanged = not ctx.force and is_complete(target, **source, **{BASIS_ATTR: basis})
        if unchanged:
            device = zarr_attrs(target).get("device", device)
        else:
            cal = SpectrometerCalibration(**source_attrs["calibration"])
            params = ProcessingParams(**{**source_attrs.get("processing", {}), **self.runtime})
            layout = RawLayout(**source_attrs["layout"])
            raw_file = roots.resolve("raw", source_attrs["raw_path"])
            st = raw_file.stat()
            if (st.st_size, st.st_mtime_ns) != (
                source_attrs["raw_size"],
                source_attrs["raw_mtime_ns"],
            ):
                raise PermanentError(
                    f"{source_attrs['raw_path']} changed since it was converted "
                    "(replay convert for this tile)"
                )
            with open_tile(raw_file, layout) as raw:  # streamed block by block, read once
                validate_input(raw, cal)
                attrs = {
                    "acq": event.acq,
                    "tile": event.tile.model_dump(),
                    "params": params.__dict__,
                    "units": PRODUCT_UNITS,
                    **source,
                    BASIS_ATTR: basis,
                    "kernels_version": KERNELS_VERSION,
                    "raw_path": source_attrs["raw_path"],
                    "calibration": source_attrs["calibration"],
                }
                device, written = self._stream(target, raw, cal, params, attrs)
                read = st.st_size
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
                    basis=basis,
                    producer=self.name,
                )
            ],
            unchanged=unchanged,
            bytes_read=read,
            bytes_written=written,
        )

    def _stream(self, target, raw, cal, params: ProcessingParams, attrs: dict) -> tuple[str, int]:
        """Stream the tile through the kernels into a new products group: the volumes are
        written block by block as they come, the en-face maps at the end; returns (device,
        bytes written)."""
        n_b, _, n_a, _ = raw.shape
        shape = (n_b, n_a, output_depth(raw, cal))
        block = params.batch_bscans or CPU_BLOCK_BSCANS
        with atomic_directory(target) as tmp:
            group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
            arrays = {
                name: group.create_array(
                    name,
                    shape=shape,
                    dtype=np.float32,
                    chunks=(min(block, n_b), *shape[1:]),
                    compressors=self.codec,
                    dimension_names=("bline", "aline", "depth"),
                )
                for name in VOLUMES
            }

            def write(b0: int, b1: int, volumes) -> None:
                for name, values in volumes.items():
                    arrays[name][b0:b1] = values

            maps = stream_tile(raw, cal, params, write, xp=self.xp, block_bscans=block)
            for attr, name in ENFACE.items():
                img = np.asarray(getattr(maps, attr))
                group.create_array(
                    name,
                    data=img,
                    chunks=img.shape,
                    compressors=self.codec,
                    dimension_names=("bline", "aline"),
                )
            group.attrs.update({**attrs, "device": maps.device, "raw_sha256": raw.sha256})
            group.attrs[COMPLETE_ATTR] = True
        return maps.device, sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
