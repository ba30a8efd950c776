"""Fusing a mosaic's 3-D volumes (dBI, R3D, O3D) out of core, one output block at a time.

The output ``(z, y, x)`` is cut into blocks of all depths x ``block_yx`` pixels (also its
storage chunks in y and x). For each block, only the parts of the tiles that overlap it are
read from their products groups (placed at their rounded solved positions, the frame of the
en-face mosaic), cropped in depth, feathered like the en-face mosaic (weight = distance to the
tile edge + 0.5), normalised, masked and written; nothing mosaic-sized is ever in memory.
Memory: one block's accumulators plus the rows of the tiles that overlap it (read once per
band of blocks, kept while the band's blocks cross them).

Depth crop (the lab's focus-plane crop): output sample ``k`` of tile A-line ``(b, a)`` is
tile sample ``offset + round(plane[b, a]) + k``, ``k < depth`` (plane: the illumination's
focus plane, minimum 0; None = flat). Output depth = ``min(depth, tile depth - offset)``;
samples past the tile's last one are NaN.

O3D is an axial angle in degrees: blended as doubled-angle vectors
``sum(w cos 2θ), sum(w sin 2θ)`` and converted back, ``θ = atan2(S, C) / 2`` in [-90, 90).
Masking: voxels whose mosaic ``mask`` pixel is not 1 (0: no tissue, NaN: no tile) are NaN.

Each product is one single-scale NGFF 0.5 image ``(z, y, x)`` in micrometres, written under a
temporary name and renamed into place (:func:`services.io.atomic.atomic_directory`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from kernels.focus_plane import crop_indices
from kernels.stitch import feather_weights, mosaic_frame
from services.io.atomic import COMPLETE_ATTR, atomic_directory
from services.io.omezarr import open_level, read_multiscale

TILE_ARRAYS = {"dBI": "db", "R3D": "retardance", "O3D": "orientation"}
UNITS = {
    "dBI": "dB, 10*log10(|J1|^2 + |J2|^2)",
    "R3D": "degrees, 0..90",
    "O3D": "degrees, optic-axis orientation, axial (blended on doubled angles), [-90, 90)",
}
ANGLES = frozenset({"O3D"})
BLOCK_YX = (64, 256)
Z_CHUNK = 128
COMPRESSOR = BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")


@dataclass(frozen=True)
class DepthCrop:
    """Which depth samples of each tile A-line are kept (the lab's defaults: 500 from 30)."""

    offset: int = 30
    depth: int = 500
    plane: np.ndarray | None = None  # (B, A) depth samples, minimum 0


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
    product: str = "dBI",
    crop: DepthCrop | None = None,
    mask: MosaicMask | None = None,
    block_yx: tuple[int, int] = BLOCK_YX,
    attributes: dict | None = None,
) -> tuple[int, int, int]:
    """Fuse `product` of each tile's products group (path, solved (y, x)) into `target`;
    returns the output shape (z, y, x). ``crop=None`` keeps every depth sample."""
    if not tiles:
        raise ValueError("no tiles to fuse")
    array = TILE_ARRAYS[product]
    b, a, tile_depth = zarr.open_group(str(tiles[0][0]), mode="r")[array].shape
    positions = np.array([p for _, p in tiles], dtype=np.float64)
    origin, (height, width) = mosaic_frame(positions, (b, a))
    starts = [
        (
            min(max(round(float(y)) - origin[0], 0), height - b),
            min(max(round(float(x)) - origin[1], 0), width - a),
        )
        for y, x in positions
    ]
    if crop is None:
        crop = DepthCrop(offset=0, depth=tile_depth)
    plane = np.zeros((b, a)) if crop.plane is None else np.asarray(crop.plane)
    if plane.shape != (b, a):
        raise ValueError(f"focus plane {plane.shape} for tiles {(b, a)}")
    first = crop_indices(plane, crop.offset)
    depth = max(1, min(crop.depth, tile_depth - crop.offset))
    if mask is not None and mask.shape != (height, width):
        raise ValueError(f"mask {mask.shape} is not the mosaic's frame {(height, width)}")
    by, bx = block_yx
    feather = feather_weights((b, a)).astype(np.float32)
    with atomic_directory(target) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        out = root.create_array(
            "0",
            shape=(depth, height, width),
            chunks=(min(Z_CHUNK, depth), min(by, height), min(bx, width)),
            dtype="float32",
            fill_value=float("nan"),
            compressors=COMPRESSOR,
            dimension_names=("z", "y", "x"),
        )
        for y0 in range(0, height, by):
            y1 = min(height, y0 + by)
            band = _Band(array, first, depth, tile_depth)  # the band's tile rows, read once
            for x0 in range(0, width, bx):
                x1 = min(width, x0 + bx)
                parts = [
                    (k, path, ty, tx)
                    for k, ((path, _), (ty, tx)) in enumerate(zip(tiles, starts, strict=True))
                    if ty < y1 and ty + b > y0 and tx < x1 and tx + a > x0
                ]
                band.keep({k for k, *_ in parts})
                if not parts:
                    continue  # a hole: the fill value (NaN)
                block = _fuse_block(
                    parts, band, (y0, y1, x0, x1), (b, a), first, depth, feather, product in ANGLES
                )
                if mask is not None:
                    keep = np.asarray(mask(y0, y1, x0, x1)) == 1
                    block[:, ~keep] = np.nan
                out[:, y0:y1, x0:x1] = block
        root.attrs["ome"] = volume_metadata(
            target.name,
            (axial_um, pixel_um, pixel_um),
            (crop.offset * axial_um, origin[0] * pixel_um, origin[1] * pixel_um),
        )
        root.attrs["tilepipe"] = {
            **(attributes or {}),
            "product": product,
            "unit": UNITS[product],
            "axes": "z = depth sample below the crop start, y = B-line, x = A-line",
            "crop": {
                "offset": crop.offset,
                "depth": depth,
                "focus_plane": crop.plane is not None,
            },
            "masked": mask is not None,
        }
        root.attrs[COMPLETE_ATTR] = True
    return depth, height, width


class _Band:
    """The rows of the tiles that one band of output blocks needs (all their A-lines, the
    depths the crop can reach), each read once and dropped when the blocks have passed it:
    tiles cross a band's blocks left to right, so it holds only the tiles of one block."""

    def __init__(self, array: str, first: np.ndarray, depth: int, tile_depth: int) -> None:
        self.array, self.first, self.depth, self.tile_depth = array, first, depth, tile_depth
        self.rows: dict[int, tuple[int, np.ndarray | None]] = {}  # by tile index

    def keep(self, tiles: set[int]) -> None:
        for k in [k for k in self.rows if k not in tiles]:
            del self.rows[k]

    def get(self, k: int, path: Path, r0: int, r1: int) -> tuple[int, np.ndarray | None]:
        """(zlo, tile[r0:r1, :, zlo:zhi]) with every depth the crop reads in those rows."""
        if k not in self.rows:
            starts = self.first[r0:r1]
            zlo = min(int(starts.min()), self.tile_depth)
            zhi = min(self.tile_depth, int(starts.max()) + self.depth)
            src = zarr.open_group(str(path), mode="r")[self.array]
            rows = np.asarray(src[r0:r1, :, zlo:zhi], dtype=np.float32) if zhi > zlo else None
            self.rows[k] = (zlo, rows)
        return self.rows[k]


def _fuse_block(
    parts: Sequence[tuple[int, Path, int, int]],
    band: _Band,
    box: tuple[int, int, int, int],
    tile_shape: tuple[int, int],
    first: np.ndarray,
    depth: int,
    feather: np.ndarray,
    angle: bool,
) -> np.ndarray:
    """One output block ``(depth, y1 - y0, x1 - x0)``: the feathered blend of its tiles."""
    y0, y1, x0, x1 = box
    b, a = tile_shape
    num = np.zeros((2 if angle else 1, depth, y1 - y0, x1 - x0), np.float32)
    den = np.zeros((depth, y1 - y0, x1 - x0), np.float32)
    steps = np.arange(depth, dtype=np.int32)
    for k, path, ty, tx in parts:
        ya, yb, xa, xb = max(y0, ty), min(y1, ty + b), max(x0, tx), min(x1, tx + a)
        r0, r1, c0, c1 = ya - ty, yb - ty, xa - tx, xb - tx
        zlo, rows = band.get(k, path, r0, r1)
        if rows is None:
            continue  # the crop starts past the tile's last sample
        sub = rows[:, c0:c1]
        idx = (first[r0:r1, c0:c1] - zlo).astype(np.int32)[..., None] + steps  # (h, w, depth)
        inside = idx < sub.shape[2]
        vals = np.take_along_axis(sub, np.minimum(idx, sub.shape[2] - 1), axis=2)
        del idx
        vals[~inside] = np.nan
        vals = np.moveaxis(vals, 2, 0)  # (depth, h, w)
        ok = np.isfinite(vals)
        w = np.where(ok, feather[r0:r1, c0:c1][None], np.float32(0.0))
        vals = np.where(ok, vals, np.float32(0.0))
        region = (slice(None), slice(ya - y0, yb - y0), slice(xa - x0, xb - x0))
        if angle:
            two = np.deg2rad(2.0 * vals)
            num[0][region] += w * np.cos(two)
            num[1][region] += w * np.sin(two)
        else:
            num[0][region] += w * vals
        den[region] += w
    with np.errstate(invalid="ignore", divide="ignore"):
        if angle:
            theta = 0.5 * np.rad2deg(np.arctan2(num[1], num[0]))
            out = np.mod(theta + 90.0, 180.0) - 90.0
        else:
            out = num[0] / den
    out = out.astype(np.float32)
    out[den <= 0] = np.nan
    return out


class MosaicMask:
    """The ``mask`` channel of an en-face mosaic (level 0), read block by block."""

    def __init__(self, store: Path) -> None:
        self.store = Path(store)
        names = read_multiscale(self.store)["channel_names"]
        if "mask" not in names:
            raise ValueError(f"{self.store}: no mask channel (channels {names})")
        self.channel = names.index("mask")
        self.level = open_level(self.store, 0)
        _, height, width = self.level.shape
        self.shape = (int(height), int(width))

    def __call__(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return np.asarray(self.level[self.channel, y0:y1, x0:x1])
