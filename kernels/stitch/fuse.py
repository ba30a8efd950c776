"""Fuse tiles into a mosaic with feathered blending (linear, or circular for axial angles).

Each tile pixel ``[i, j]`` at position ``p`` lands at global ``p + (i, j)`` (conventions of
:mod:`kernels.stitch.phasecorr`). Positions are sub-pixel: with ``subpixel=True`` (default)
every tile is splatted bilinearly onto the integer mosaic grid (its fractional offset spread
over 2x2 pixels, so values and weights are interpolated consistently and edges never
extrapolate); with ``subpixel=False`` positions are rounded to the nearest integer.

Blending weight of a tile pixel: its distance to the nearest tile edge (``+0.5`` so edge
pixels count), to the power ``feather_power``, times 0 where the value is NaN. Scalars
blend as ``sum(w v) / sum(w)``; axial angles (degrees, period 180) as half the argument of
``sum(w exp(2i theta))``, returned in ``[-90, 90)``. Only the accumulators (weighted sums and
weights, ``accum_dtype``) are mosaic-sized; tiles are processed one at a time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kernels.backend import ArrayModule, resolve_xp, to_host

__all__ = ["Mosaic", "feather_weights", "fuse", "fuse_products", "mosaic_frame"]


@dataclass
class Mosaic:
    """A fused image: ``image[k, l]`` is at global ``(origin_yx[0] + k, origin_yx[1] + l)``."""

    image: Any  # (H, W) float32, NaN where no tile contributes
    mask: Any  # (H, W) bool, True where at least one tile contributes
    origin_yx: tuple[int, int]


def mosaic_frame(
    positions_yx: Any, tile_shape: Any, present: Any = None
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Integer ``(origin_yx, shape)`` of a mosaic holding every present tile (sub-pixel safe).

    ``tile_shape``: one ``(h, w)`` for all tiles, or an (n, 2) array of per-tile shapes.
    """
    p = np.asarray(to_host(positions_yx), dtype=np.float64)
    shapes = np.broadcast_to(np.asarray(tile_shape, dtype=np.int64), p.shape)
    if present is not None:
        sel = np.asarray(present, bool)
        p, shapes = p[sel], shapes[sel]
    if len(p) == 0:
        raise ValueError("no tiles to frame")
    lo = np.floor(p.min(axis=0)).astype(int)
    hi = (np.floor(p).astype(int) + shapes + 1).max(axis=0)
    return (int(lo[0]), int(lo[1])), (int(hi[0] - lo[0]), int(hi[1] - lo[1]))


def feather_weights(shape: tuple[int, int], power: float = 1.0, xp: ArrayModule = np) -> Any:
    """Distance of each pixel to the nearest tile edge (+0.5), to the power ``power``."""
    dy = xp.minimum(xp.arange(shape[0]) + 0.5, shape[0] - 0.5 - xp.arange(shape[0]))
    dx = xp.minimum(xp.arange(shape[1]) + 0.5, shape[1] - 0.5 - xp.arange(shape[1]))
    w = xp.minimum(dy[:, None], dx[None, :])
    return w**power if power != 1.0 else w


def fuse(
    tiles: Sequence[Any | None],
    positions_yx: Any,
    *,
    angle: bool = False,
    subpixel: bool = True,
    feather_power: float = 1.0,
    origin_yx: tuple[int, int] | None = None,
    shape: tuple[int, int] | None = None,
    accum_dtype: Any = np.float32,
    xp: ArrayModule | None = None,
) -> Mosaic:
    """Blend 2-D ``tiles`` (``None`` = missing) placed at ``positions_yx`` (n, 2).

    ``angle=True`` treats values as axial angles in degrees (circular blend via doubled
    angles). The frame defaults to :func:`mosaic_frame` of the present tiles; pass
    ``origin_yx``/``shape`` to share one frame between products (parts outside are cut).
    Holes (no tile) are NaN with ``mask`` False.
    """
    present = [t is not None for t in tiles]
    if not any(present):
        raise ValueError("no tiles to fuse")
    xp = resolve_xp(xp, *[t for t in tiles if t is not None])
    pos = np.asarray(to_host(positions_yx), dtype=np.float64)
    if pos.shape != (len(tiles), 2):
        raise ValueError(f"positions_yx must have shape ({len(tiles)}, 2), got {pos.shape}")
    if origin_yx is None or shape is None:
        shapes = [t.shape if t is not None else (0, 0) for t in tiles]
        o, s = mosaic_frame(pos, shapes, present)
        origin_yx = o if origin_yx is None else origin_yx
        shape = s if shape is None else shape
    k = 2 if angle else 1
    num = xp.zeros((k, *shape), dtype=accum_dtype)
    den = xp.zeros(shape, dtype=accum_dtype)
    feathers: dict[tuple[int, int], Any] = {}
    for t, p in zip(tiles, pos, strict=True):
        if t is None:
            continue
        t = xp.asarray(t, dtype=xp.float64)
        if t.shape not in feathers:
            feathers[t.shape] = feather_weights(t.shape, feather_power, xp)
        ok = xp.isfinite(t)
        w = xp.where(ok, feathers[t.shape], 0.0)
        v = xp.where(ok, t, 0.0)
        if angle:
            two = xp.deg2rad(2.0 * v)
            vals = xp.stack([w * xp.cos(two), w * xp.sin(two), w])
        else:
            vals = xp.stack([w * v, w])
        base = (p[0] - origin_yx[0], p[1] - origin_yx[1])
        if subpixel:
            iy, ix = math.floor(base[0]), math.floor(base[1])
            vals = _bilinear_splat(vals, base[0] - iy, base[1] - ix, xp)
        else:
            iy, ix = round(base[0]), round(base[1])
        _add_clipped(num, den, vals.astype(accum_dtype), iy, ix)
    mask = den > 0
    safe = xp.where(mask, den, 1)
    if angle:
        theta = 0.5 * xp.rad2deg(xp.arctan2(num[1] / safe, num[0] / safe))
        out = xp.mod(theta + 90.0, 180.0) - 90.0
    else:
        out = num[0] / safe
    image = xp.where(mask, out, xp.nan).astype(xp.float32)
    return Mosaic(image=image, mask=mask, origin_yx=(int(origin_yx[0]), int(origin_yx[1])))


def fuse_products(
    products: Mapping[str, Sequence[Any | None]],
    positions_yx: Any,
    *,
    angle_products: Sequence[str] = ("orientation",),
    **kwargs: Any,
) -> dict[str, Mosaic]:
    """:func:`fuse` each product (same tile order) into one shared frame.

    Products named in ``angle_products`` blend as axial angles.
    """
    if not products:
        return {}
    first = next(iter(products.values()))
    present = [t is not None for t in first]
    if kwargs.get("origin_yx") is None or kwargs.get("shape") is None:
        shapes = [t.shape if t is not None else (0, 0) for t in first]
        o, s = mosaic_frame(positions_yx, shapes, present)
        kwargs.setdefault("origin_yx", o)
        kwargs.setdefault("shape", s)
    return {
        name: fuse(tiles, positions_yx, angle=name in angle_products, **kwargs)
        for name, tiles in products.items()
    }


def _bilinear_splat(vals: Any, fy: float, fx: float, xp: ArrayModule) -> Any:
    """Spread (c, H, W) values over (c, H + 1, W + 1) pixels for a fractional offset."""
    c, h, w = vals.shape
    out = xp.zeros((c, h + 1, w + 1), dtype=vals.dtype)
    out[:, :h, :w] += (1 - fy) * (1 - fx) * vals
    out[:, :h, 1:] += (1 - fy) * fx * vals
    out[:, 1:, :w] += fy * (1 - fx) * vals
    out[:, 1:, 1:] += fy * fx * vals
    return out


def _add_clipped(num: Any, den: Any, vals: Any, y0: int, x0: int) -> None:
    """``num += vals[:-1]``, ``den += vals[-1]`` at offset (y0, x0), clipped to the frame."""
    h, w = vals.shape[1:]
    hm, wm = den.shape
    ya, yb = max(0, y0), min(hm, y0 + h)
    xa, xb = max(0, x0), min(wm, x0 + w)
    if ya >= yb or xa >= xb:
        return
    patch = vals[:, ya - y0 : yb - y0, xa - x0 : xb - x0]
    num[:, ya:yb, xa:xb] += patch[:-1]
    den[ya:yb, xa:xb] += patch[-1]
