"""Small preview images of en-face maps: PNG, 8-bit, at most ``MAX_SIDE_PX`` on the long side.

- intensity-like maps (aip, mip, retardance, birefringence, delta-n): grey, windowed linearly
  from the 1st to the 99th percentile of the finite pixels; NaN (no data) is black;
- orientation: HSV like the lab's previews, hue = (orientation + 90) / 180 wrapped into
  [-90, 90) (-90 deg red, -30 green, +30 blue; :func:`kernels.optic_axis.inplane_rgb`), full
  saturation, value = the weight map (retardance or birefringence) windowed like the grey maps;
- masks: 1 white, 0 grey, NaN black;
- RGB maps (the axis products' in-plane / thru-plane colours, |axis vector|): as given, [0, 1].

A large map is first shrunk by block means (:func:`block_mean`; angles on doubled angles) by
the integer factor that brings its long side under the bound, so rendering holds one
full-size plane at a time; what remains is shrunk by a box filter when encoding.

Row 0 of the image is row 0 of the mosaic (y down), column 0 its column 0 (x right): the
mosaic as the OME-Zarr stores it, not the NIfTI's transposed array.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from kernels.optic_axis import inplane_rgb
from services.io.atomic import atomic_file

MAX_SIDE_PX = 2048
PERCENTILES = (1.0, 99.0)


def shrink_factor(shape: tuple[int, ...], max_side_px: int = MAX_SIDE_PX) -> int:
    """The integer block size that brings the long side to `max_side_px` or below."""
    return max(1, -(-max(shape[:2]) // max_side_px))


def block_mean(plane: np.ndarray, factor: int, axial: bool = False) -> np.ndarray:
    """NaN-aware mean of `factor` x `factor` blocks (edges padded with NaN); an axial plane
    (degrees, 180-periodic: orientation, azimuth) is averaged on doubled angles."""
    plane = np.asarray(plane, dtype=np.float32)
    if factor == 1:
        return plane
    ny, nx = plane.shape
    py, px = -ny % factor, -nx % factor
    if py or px:
        plane = np.pad(plane, ((0, py), (0, px)), constant_values=np.nan)
    shape = (plane.shape[0] // factor, factor, plane.shape[1] // factor, factor)
    valid = np.isfinite(plane)
    count = valid.reshape(shape).sum(axis=(1, 3))

    def mean(values: np.ndarray) -> np.ndarray:
        total = np.where(valid, values, 0.0).reshape(shape).sum(axis=(1, 3), dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(count > 0, total / count, np.nan)

    if not axial:
        return mean(plane).astype(np.float32)
    doubled = np.deg2rad(2.0 * plane)
    angle = np.rad2deg(np.arctan2(mean(np.sin(doubled)), mean(np.cos(doubled)))) / 2.0
    return angle.astype(np.float32)


def window(image: np.ndarray, percentiles: tuple[float, float] = PERCENTILES) -> np.ndarray:
    """`image` scaled to [0, 1] between two percentiles of its finite pixels; NaN -> 0."""
    image = np.asarray(image, dtype=np.float64)
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return np.zeros(image.shape)
    lo, hi = np.percentile(finite, percentiles)
    scaled = (image - lo) / (hi - lo) if hi > lo else (image > lo).astype(np.float64)
    return np.clip(np.where(np.isfinite(scaled), scaled, 0.0), 0.0, 1.0)


def grey(image: np.ndarray) -> np.ndarray:
    """An intensity-like map, percentile-windowed."""
    return window(image)


def mask_image(mask: np.ndarray) -> np.ndarray:
    """1 -> white, 0 -> mid grey, NaN (no data) -> black."""
    mask = np.asarray(mask, dtype=np.float64)
    return np.where(np.isfinite(mask), np.where(mask > 0.5, 1.0, 0.5), 0.0)


def orientation_hsv(orientation_deg: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Orientation as hue, brightness from `weight` (retardance or birefringence)."""
    ori = np.asarray(orientation_deg, dtype=np.float64)
    wrapped = (ori + 90.0) % 180.0 - 90.0
    return np.asarray(inplane_rgb(wrapped, window(weight), 0.0, 1.0))


def to_uint8(image: np.ndarray) -> np.ndarray:
    """[0, 1] floats (grey ``(y, x)`` or RGB ``(y, x, 3)``) -> 8-bit."""
    image = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0)
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def png_bytes(image: np.ndarray, description: str = "", max_side_px: int = MAX_SIDE_PX) -> bytes:
    """A PNG of a [0, 1] grey or RGB image, shrunk (box filter) to `max_side_px` at most;
    `description` goes into its ``Description`` text chunk."""
    from PIL import Image, PngImagePlugin

    pil = Image.fromarray(to_uint8(image))
    if max(pil.size) > max_side_px:
        pil.thumbnail((max_side_px, max_side_px), Image.Resampling.BOX)
    info = PngImagePlugin.PngInfo()
    if description:
        info.add_text("Description", description)
    buf = io.BytesIO()
    pil.save(buf, format="PNG", compress_level=3, pnginfo=info)
    return buf.getvalue()


def write_png(
    path: Path, image: np.ndarray, description: str = "", max_side_px: int = MAX_SIDE_PX
) -> Path:
    """Write a preview atomically."""
    body = png_bytes(image, description, max_side_px)
    with atomic_file(Path(path)) as tmp:
        tmp.write_bytes(body)
    return Path(path)
