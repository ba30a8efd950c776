"""Surface detection and en-face projections over a window below the surface.

Volumes are ``[..., A, Z]`` float32 (depth last); the surface is an int depth index per A-line.
The en-face window of an A-line is [surface + offset, surface + offset + thickness), clipped to
the volume; A-lines whose window is empty get NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .backend import ArrayModule, resolve_xp

_EDGE_DROP_DB = 3.0

__all__ = [
    "EnfaceImages",
    "detect_surface",
    "enface_products",
    "median_filter_2d",
    "retardance_slope",
    "slope_to_delta_n",
    "surface_candidates",
    "window_samples",
]


@dataclass(frozen=True)
class EnfaceImages:
    """En-face maps ``[..., A]``: dB AIP/MIP, mean retardance [deg], circular-mean orientation
    [deg, -90..90), birefringence as retardance slope [deg/bin]."""

    aip: Any
    mip: Any
    retardance: Any
    orientation: Any
    birefringence: Any


def _window_sums(cs: Any, width: int) -> Any:
    """'valid' moving sums of width ``width`` from a cumulative sum ``cs`` along the last axis
    (element i is the sum of samples i .. i + width - 1)."""
    out = cs[..., width - 1 :].copy()
    out[..., 1:] -= cs[..., :-width]
    return out


def surface_candidates(
    db: Any,
    threshold_db: float = 20.0,
    smoothing: int = 7,
    floor_window: int = 31,
    relative_level: float = 0.5,
    xp: ArrayModule | None = None,
) -> Any:
    """Per-A-line surface index ``int32[...]`` (before lateral filtering) from dB ``[..., Z]``.

    1. noise floor = minimum of the A-line's ``floor_window``-bin moving average, peak = maximum
       of its ``smoothing``-bin moving average;
    2. crossing = first ``smoothing``-bin window whose mean exceeds
       floor + max(``threshold_db``, ``relative_level`` * (peak - floor)), so PSF skirts of a
       bright sample (tens of dB below it) do not trigger early;
    3. edge = steepest step (mean of the next ``smoothing`` bins minus mean of the previous
       ``smoothing``) within 2 * ``smoothing`` bins after the crossing window starts;
    4. surface = first bin within ``smoothing`` bins of the edge whose dB is within 3 dB of
       the mean of the ``smoothing`` bins below the edge (undoes the early bias of the PSF
       skirt on a log scale). 0 when nothing crosses.
    """
    xp = resolve_xp(xp, db)
    n_z = db.shape[-1]
    w = max(1, min(int(smoothing), n_z // 3))
    floor_window = max(w, min(int(floor_window), n_z))
    cs = xp.cumsum(db, axis=-1, dtype=xp.float32)
    floor = _window_sums(cs, floor_window).min(axis=-1) * (1.0 / floor_window)
    box = _window_sums(cs, w)  # box[i] = sum(db[i : i + w])
    rise = xp.maximum(box.max(axis=-1) * (1.0 / w) - floor, 0) * relative_level
    level = (floor + xp.maximum(rise, threshold_db)) * w
    above = box > level[..., None]
    first = xp.argmax(above.view(xp.uint8), axis=-1)
    found = _pick(above, first, xp)
    steps = xp.arange(2 * w + 1)
    edge_score = box[..., w:] - box[..., :-w]  # edge_score[j]: step between bins j+w-1, j+w
    j = xp.clip(first[..., None] - w + steps, 0, edge_score.shape[-1] - 1)
    edge = _pick(j, xp.argmax(xp.take_along_axis(edge_score, j, axis=-1), axis=-1), xp) + w
    tissue = _pick(box, xp.minimum(edge, box.shape[-1] - 1), xp) * (1.0 / w)
    z = xp.clip(edge[..., None] - w + steps, 0, n_z - 1)
    near = xp.take_along_axis(db, z, axis=-1) >= (tissue - _EDGE_DROP_DB)[..., None]
    surface = _pick(z, xp.argmax(near.view(xp.uint8), axis=-1), xp)
    return xp.where(found, surface, 0).astype(xp.int32)


def _pick(a: Any, index: Any, xp: ArrayModule) -> Any:
    """a[..., index[...]] along the last axis."""
    return xp.take_along_axis(a, index[..., None], axis=-1)[..., 0]


def median_filter_2d(img: Any, size: int = 3, xp: ArrayModule | None = None) -> Any:
    """Median over ``size`` x ``size`` neighbourhoods of the last two axes, edges replicated."""
    xp = resolve_xp(xp, img)
    if size <= 1:
        return img
    r = size // 2
    pad = [(0, 0)] * (img.ndim - 2) + [(r, r), (r, r)]
    padded = xp.pad(img, pad, mode="edge")
    n0, n1 = img.shape[-2:]
    stack = xp.stack(
        [padded[..., i : i + n0, j : j + n1] for i in range(size) for j in range(size)]
    )
    return xp.median(stack, axis=0).astype(img.dtype)


def detect_surface(
    db: Any,
    threshold_db: float = 20.0,
    smoothing: int = 7,
    median_size: int = 3,
    xp: ArrayModule | None = None,
) -> Any:
    """Surface index ``int32[B, A]`` from a dB volume ``[B, A, Z]``: per-A-line threshold
    crossing, then a ``median_size`` x ``median_size`` median across the tile."""
    xp = resolve_xp(xp, db)
    return median_filter_2d(surface_candidates(db, threshold_db, smoothing, xp=xp), median_size, xp)


def window_samples(
    vol: Any, surface: Any, offset: int, thickness: int, xp: ArrayModule | None = None
) -> tuple[Any, Any]:
    """(values ``[..., A, T]``, valid mask) of the en-face window of every A-line."""
    xp = resolve_xp(xp, vol, surface)
    n_z = vol.shape[-1]
    z = surface[..., None].astype(xp.int64) + (int(offset) + xp.arange(int(thickness)))
    valid = (z >= 0) & (z < n_z)
    vals = xp.take_along_axis(vol, xp.clip(z, 0, n_z - 1), axis=-1)
    return vals, valid


def _masked_mean(vals: Any, valid: Any, count: Any, xp: ArrayModule) -> Any:
    total = xp.where(valid, vals, 0).sum(axis=-1)
    return xp.where(count > 0, total / xp.maximum(count, 1), math.nan).astype(xp.float32)


def _slope(vals: Any, valid: Any, count: Any, xp: ArrayModule) -> Any:
    t = xp.arange(vals.shape[-1], dtype=xp.float32)
    w = valid.astype(xp.float32)
    n = xp.maximum(count, 1).astype(xp.float32)
    t_mean = (w * t).sum(axis=-1) / n
    tc = (t - t_mean[..., None]) * w
    v_mean = (w * vals).sum(axis=-1) / n
    num = (tc * (vals - v_mean[..., None])).sum(axis=-1)
    den = (tc * tc).sum(axis=-1)
    ok = (count >= 3) & (den > 0)
    return xp.where(ok, num / xp.where(ok, den, 1), math.nan).astype(xp.float32)


def retardance_slope(
    retardance: Any, surface: Any, offset: int, thickness: int, xp: ArrayModule | None = None
) -> Any:
    """Least-squares slope of retardance vs depth in the window [deg/bin] (NaN if < 3 bins)."""
    xp = resolve_xp(xp, retardance, surface)
    vals, valid = window_samples(retardance, surface, offset, thickness, xp)
    return _slope(vals, valid, valid.sum(axis=-1), xp)


def slope_to_delta_n(
    slope_deg_per_bin: Any, wavelength_um: float, axial_pixel_um: float, round_trip: bool = False
) -> Any:
    """Birefringence delta-n from a retardance slope (psoct-toolbox's fitLinear convention).

    retardance delta = 2*pi*dn*z/lambda (single pass), so dn = slope/360 * lambda / dz.
    Set ``round_trip`` when the retardance accumulates over the double pass (halves dn).
    ``axial_pixel_um`` is the depth per bin in the sample (already divided by its index).
    """
    dn = slope_deg_per_bin / 360.0 * wavelength_um / axial_pixel_um
    return dn / 2.0 if round_trip else dn


def enface_products(
    db: Any,
    retardance: Any,
    orientation: Any,
    surface: Any,
    offset: int = 0,
    thickness: int = 70,
    xp: ArrayModule | None = None,
) -> EnfaceImages:
    """AIP and MIP of dB, mean retardance, doubled-angle circular mean orientation and the
    retardance slope over each A-line's window; float32 ``[..., A]``."""
    xp = resolve_xp(xp, db, surface)
    vals, valid = window_samples(db, surface, offset, thickness, xp)
    count = valid.sum(axis=-1)
    aip = _masked_mean(vals, valid, count, xp)
    mip = xp.where(count > 0, xp.where(valid, vals, -xp.inf).max(axis=-1), math.nan)
    ret, _ = window_samples(retardance, surface, offset, thickness, xp)
    ori, _ = window_samples(orientation, surface, offset, thickness, xp)
    doubled = xp.deg2rad(ori) * 2.0
    c = xp.where(valid, xp.cos(doubled), 0).sum(axis=-1)
    s = xp.where(valid, xp.sin(doubled), 0).sum(axis=-1)
    mean_ori = xp.rad2deg(xp.arctan2(s, c)) * 0.5
    mean_ori = xp.where(mean_ori >= 90.0, mean_ori - 180.0, mean_ori)
    return EnfaceImages(
        aip=aip,
        mip=mip.astype(xp.float32),
        retardance=_masked_mean(ret, valid, count, xp),
        orientation=xp.where(count > 0, mean_ori, math.nan).astype(xp.float32),
        birefringence=_slope(ret, valid, count, xp),
    )
