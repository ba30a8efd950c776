"""Surface detection and en-face projections over a window below the surface.

Volumes are ``[..., A, Z]`` float32 (depth last); the surface is a 0-based int depth index per
A-line. Two surface finders: "threshold" (tilepipe's, :func:`surface_candidates`) and
"gradient" (psoct-toolbox's ``psoct.surface.gradient``, :func:`gradient_surface_candidates`).

En-face windows (``window``):

* "half-open" (tilepipe): [surface + offset, surface + offset + thickness), clipped to the
  volume; an A-line whose window is empty gets NaN, a birefringence fit with < 3 samples NaN.
* "inclusive" (psoct-toolbox's enfaceReduce): z1 = max(0, surface + offset) to
  z2 = min(nz - 1, z1 + thickness) inclusive, i.e. up to thickness + 1 samples; the
  birefringence fit stops at the first retardance that is exactly 0 and is 0 when it has < 3
  samples (the toolbox's fitLinear).

Birefringence is delta-n (dimensionless): the least-squares slope of retardance [deg] over depth
[bins] converted with the wavelength and axial pixel size, dn = slope / 360 * lambda / dz.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .backend import ArrayModule, resolve_xp

_EDGE_DROP_DB = 3.0
_GRADIENT_SIGMA = 5.0  # psoct.surface.gradient: imgaussfilt(line, 5), 21 taps, replicate edges
_GRADIENT_HALF = 5  # its step kernel: [-ones(1, 5)/5, ones(1, 5)/5]
_GRADIENT_VALID_DB = 0.01  # samples above this count towards an A-line's valid length

__all__ = [
    "EnfaceImages",
    "detect_surface",
    "enface_products",
    "gradient_surface_candidates",
    "median_filter_2d",
    "retardance_slope",
    "slope_to_delta_n",
    "surface_candidates",
    "window_samples",
]


@dataclass(frozen=True)
class EnfaceImages:
    """En-face maps ``[..., A]``: dB AIP/MIP, mean retardance [deg], circular-mean orientation
    [deg, -90..90), birefringence as delta-n (dimensionless)."""

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


def _gaussian_taps(sigma: float) -> list[float]:
    radius = math.ceil(2 * sigma)  # MATLAB imgaussfilt's default size 2*ceil(2*sigma)+1
    taps = [math.exp(-(t * t) / (2 * sigma * sigma)) for t in range(-radius, radius + 1)]
    total = sum(taps)
    return [t / total for t in taps]


def gradient_surface_candidates(
    db: Any, xp: ArrayModule | None = None, full_length: bool = False
) -> Any:
    """psoct-toolbox's gradient surface per A-line, 0-based ``int32[...]``, before the median.

    Per A-line: valid length n = number of samples above 0.01 dB; the first n samples smoothed
    by a Gaussian (sigma 5, 21 taps, edges replicated); grad[i] = mean(data[i+5 : i+10]) -
    mean(data[i : i+5]); surface = i + 5 at the first maximum of grad (the first sample of the
    brighter half of the steepest rise); 0 when n <= 10. ``full_length`` skips the valid-length
    count (every sample valid), as the count is n = Z for any volume above 0.01 dB.

    Every A-line is done at once, short ones too (no per-line loop, no host round trip): a line
    of valid length n < Z has its samples from n on replaced by sample n - 1 (what the edge
    replication of the first n samples would read there) and its gradient past n - 10 masked,
    so it gets exactly the result of the first n samples alone.
    """
    xp = resolve_xp(xp, db)
    n_z = db.shape[-1]
    w = _GRADIENT_HALF
    if n_z <= 2 * w:
        return xp.zeros(db.shape[:-1], dtype=xp.int32)
    taps = _gaussian_taps(_GRADIENT_SIGMA)
    radius = len(taps) // 2
    data = db.astype(xp.float32, copy=False)
    if not full_length:
        short = (db <= _GRADIENT_VALID_DB).any(axis=-1, keepdims=True)
        n = xp.where(short, (db > _GRADIENT_VALID_DB).sum(axis=-1, keepdims=True), n_z)
        last = xp.take_along_axis(data, xp.maximum(n - 1, 0), axis=-1)
        data = xp.where(xp.arange(n_z) < n, data, last)
    pad = [(0, 0)] * (db.ndim - 1) + [(radius, radius)]
    padded = xp.pad(data, pad, mode="edge")
    smooth = padded[..., 0:n_z] * taps[0]
    for t in range(1, len(taps)):
        smooth += padded[..., t : t + n_z] * taps[t]
    cs = xp.cumsum(smooth, axis=-1, dtype=xp.float32)
    box = _window_sums(cs, w)  # box[i] = sum(smooth[i : i + w])
    grad = box[..., w:] - box[..., :-w]
    if full_length:
        return (xp.argmax(grad, axis=-1) + w).astype(xp.int32)
    grad = xp.where(xp.arange(grad.shape[-1]) <= n - 2 * w, grad, -xp.inf)  # first n only
    surface = xp.argmax(grad, axis=-1) + w
    return xp.where(n[..., 0] > 2 * w, surface, 0).astype(xp.int32)


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


Window = str  # "half-open" or "inclusive" (see the module docstring)


def window_samples(
    vol: Any,
    surface: Any,
    offset: int,
    thickness: int,
    xp: ArrayModule | None = None,
    window: Window = "half-open",
) -> tuple[Any, Any]:
    """(values ``[..., A, T]``, valid mask) of the en-face window of every A-line."""
    xp = resolve_xp(xp, vol, surface)
    n_z = vol.shape[-1]
    start = surface[..., None].astype(xp.int64) + int(offset)
    if window == "inclusive":
        start = xp.maximum(start, 0)
        z = start + xp.arange(int(thickness) + 1)
    elif window == "half-open":
        z = start + xp.arange(int(thickness))
    else:
        raise ValueError(f"window must be 'half-open' or 'inclusive', got {window!r}")
    valid = (z >= 0) & (z < n_z)
    vals = xp.take_along_axis(vol, xp.clip(z, 0, n_z - 1), axis=-1)
    return vals, valid


def _masked_mean(vals: Any, valid: Any, count: Any, xp: ArrayModule) -> Any:
    total = xp.where(valid, vals, 0).sum(axis=-1)
    return xp.where(count > 0, total / xp.maximum(count, 1), math.nan).astype(xp.float32)


def _slope(vals: Any, valid: Any, count: Any, xp: ArrayModule, invalid: float = math.nan) -> Any:
    t = xp.arange(vals.shape[-1], dtype=xp.float32)
    w = valid.astype(xp.float32)
    n = xp.maximum(count, 1).astype(xp.float32)
    t_mean = (w * t).sum(axis=-1) / n
    tc = (t - t_mean[..., None]) * w
    v_mean = (w * vals).sum(axis=-1) / n
    num = (tc * (vals - v_mean[..., None])).sum(axis=-1)
    den = (tc * tc).sum(axis=-1)
    ok = (count >= 3) & (den > 0)
    return xp.where(ok, num / xp.where(ok, den, 1), invalid).astype(xp.float32)


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
    window: Window = "half-open",
    wavelength_um: float = 1.3,
    axial_pixel_um: float = 2.5,
) -> EnfaceImages:
    """AIP and MIP of dB, mean retardance, doubled-angle circular mean orientation and the
    birefringence (delta-n from the retardance slope) over each A-line's window; float32
    ``[..., A]``. ``window`` is "half-open" or "inclusive" (module docstring)."""
    xp = resolve_xp(xp, db, surface)
    vals, valid = window_samples(db, surface, offset, thickness, xp, window)
    count = valid.sum(axis=-1)
    aip = _masked_mean(vals, valid, count, xp)
    mip = xp.where(count > 0, xp.where(valid, vals, -xp.inf).max(axis=-1), math.nan)
    ret, _ = window_samples(retardance, surface, offset, thickness, xp, window)
    ori, _ = window_samples(orientation, surface, offset, thickness, xp, window)
    doubled = xp.deg2rad(ori) * 2.0
    c = xp.where(valid, xp.cos(doubled), 0).sum(axis=-1)
    s = xp.where(valid, xp.sin(doubled), 0).sum(axis=-1)
    mean_ori = xp.rad2deg(xp.arctan2(s, c)) * 0.5
    mean_ori = xp.where(mean_ori >= 90.0, mean_ori - 180.0, mean_ori)
    if window == "inclusive":  # fitLinear: stop at (and keep) the first exact zero
        zero_before = xp.cumsum((ret == 0) & valid, axis=-1) - ((ret == 0) & valid)
        fit_valid = valid & (zero_before == 0)
        slope = _slope(ret, fit_valid, fit_valid.sum(axis=-1), xp, invalid=0.0)
    else:
        slope = _slope(ret, valid, count, xp)
    return EnfaceImages(
        aip=aip,
        mip=mip.astype(xp.float32),
        retardance=_masked_mean(ret, valid, count, xp),
        orientation=xp.where(count > 0, mean_ori, math.nan).astype(xp.float32),
        birefringence=slope_to_delta_n(slope, wavelength_um, axial_pixel_um).astype(xp.float32),
    )
