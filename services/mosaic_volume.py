"""Fusing a slice's 3-D dB volume out of core: one tile in memory at a time.

Each tile's `[B, A, Z]` volume is splatted at its (rounded) solved position into two on-disk
accumulators (weighted sum and feather weight, chunked `(64, 256, 256)` as `(z, y, x)`), then
normalised chunk by chunk into the output array. Memory: one tile plus one output chunk row,
never the slice. The result is a single-scale NGFF 0.5 image `(z, y, x)` in micrometres,
written under a temporary name and renamed into place.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import zarr

from kernels.stitch import feather_weights, mosaic_frame
from services.atomic import COMPLETE_ATTR, atomic_directory

CHUNK = (64, 256, 256)


def volume_metadata(name: str, scale_zyx: Sequence[float], origin_zyx: Sequence[float]) -> dict:
    """NGFF 0.5 `ome` attributes of a single-scale (z, y, x) image."""
    return {
        "version": "0.5",
        "multiscales": [
            {
                "name": name,
                "axes": [{"name": axis, "type": "space", "unit": "micrometer"} for axis in "zyx"],
                "datasets": [
                    {
                        "path": "0",
                        "coordinateTransformations": [
                            {"type": "scale", "scale": [float(v) for v in scale_zyx]},
                            {"type": "translation", "translation": [float(v) for v in origin_zyx]},
                        ],
                    }
                ],
            }
        ],
    }


def fuse_volume(
    tiles: Sequence[tuple[Path, tuple[float, float]]],
    target: Path,
    pixel_um: float,
    axial_um: float,
    array: str = "db",
    attributes: dict | None = None,
) -> tuple[int, int, int]:
    """Fuse `array` of each tile's Zarr group (path, solved (y, x)) into `target`."""
    if not tiles:
        raise ValueError("no tiles to fuse")
    first = zarr.open_group(str(tiles[0][0]), mode="r")[array]
    b, a, depth = first.shape
    positions = np.array([p for _, p in tiles], dtype=np.float64)
    origin, (height, width) = mosaic_frame(positions, (b, a))
    shape = (depth, height, width)
    chunks = tuple(min(c, s) for c, s in zip(CHUNK, shape, strict=True))
    weight = feather_weights((b, a)).astype(np.float32)
    with atomic_directory(target) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        num = root.create_array("_sum", shape=shape, chunks=chunks, dtype="float32", fill_value=0.0)
        den = root.create_array(
            "_weight", shape=shape, chunks=chunks, dtype="float32", fill_value=0.0
        )
        for path, (y, x) in tiles:
            vol = np.asarray(zarr.open_group(str(path), mode="r")[array][:], dtype=np.float32)
            if vol.shape != (b, a, depth):
                raise ValueError(f"{path}: {array} shape {vol.shape}, expected {(b, a, depth)}")
            y0, x0 = round(float(y)) - origin[0], round(float(x)) - origin[1]
            y0, x0 = min(max(y0, 0), height - b), min(max(x0, 0), width - a)
            zyx = np.moveaxis(vol, 2, 0)  # [Z, B, A]
            valid = np.isfinite(zyx)
            w = np.where(valid, weight[None], 0.0).astype(np.float32)
            region = (slice(None), slice(y0, y0 + b), slice(x0, x0 + a))
            num[region] = num[region] + np.where(valid, zyx, 0.0) * w
            den[region] = den[region] + w
        out = root.create_array(
            "0",
            shape=shape,
            chunks=chunks,
            dtype="float32",
            fill_value=float("nan"),
            dimension_names=("z", "y", "x"),
        )
        for y0 in range(0, height, chunks[1]):
            band = (slice(None), slice(y0, min(height, y0 + chunks[1])), slice(None))
            s, w = num[band], den[band]
            with np.errstate(invalid="ignore", divide="ignore"):
                out[band] = np.where(w > 0, s / w, np.nan).astype(np.float32)
        del root["_sum"], root["_weight"]
        root.attrs["ome"] = volume_metadata(
            target.name,
            (axial_um, pixel_um, pixel_um),
            (0.0, origin[0] * pixel_um, origin[1] * pixel_um),
        )
        root.attrs["tilepipe"] = {**(attributes or {}), "product": array}
        root.attrs[COMPLETE_ATTR] = True
    return shape
