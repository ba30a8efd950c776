"""Thru-plane registration of a slice: the tilted illumination's mosaic onto the normal one,
then the 3-D optic axis per pixel (the lab's ``thruplane`` step, vectorised).

What psoct-toolbox's ``thruplane.m`` / ``thruplane_registration.m`` do, and what this does:

1. **Masks** (:func:`tissue_mask`): each mosaic's AIP smoothed with a Gaussian (sigma 5 px,
   kernel +-2 sigma like ``imgaussfilt``) and thresholded (60 dB normal, 55 dB tilted by
   default; the manifest's ``mask_threshold_db``). The lab multiplies the orientation and
   birefringence maps by the masks (zeros outside); here masked pixels are NaN (no data), so
   neither the smoothing nor the registration nor the resampling drags zeros in from outside.
2. **Smoothing**: both birefringence maps with a Gaussian of sigma 3 px (NaN-aware:
   normalised convolution inside the mask).
3. **Registration** (:func:`kernels.register.register_slices`, model ``affine``): the tilted
   birefringence map (moving) onto the normal one (fixed), initialised from the stage geometry
   of the two mosaics (``init``). The lab uses MATLAB's ``imregtform`` (affine, Mattes mutual
   information, after resizing the tilted map to the normal one's size). Here the two mosaics
   share their pixel size and the match is on the log of the smoothed maps
   (:func:`log_birefringence`: the beams see delta-n times different smooth factors, which
   logs turn into an additive field the band-pass removes), band-passed and normalised, with
   a gain/bias fit per iteration. A registration below ``min_quality`` is not accepted and the
   stage geometry is used instead (flagged).
4. **Resampling** into the normal mosaic's frame: birefringence bilinearly, orientation as
   doubled-angle vectors (``cos 2o``, ``sin 2o``, like the lab's angle tensor), the mask too.
5. **Fit** (:func:`kernels.optic_axis.solve_optic_axis`) on the pixels inside both masks,
   with the orientations negated (the toolbox's ``-ori``, the model frame of
   :mod:`kernels.optic_axis`) and ``gamma`` = the tilted mosaic's ``tilt_deg``.
6. **Products** (NaN, or black for the previews, outside the fit mask; :data:`CHANNELS`).

Units and conventions: delta-n dimensionless (the units of the birefringence maps); angles in
degrees; azimuth in [-90, 90) from the model's +x towards +y (= minus the normal mosaic's
orientation for an axis in the section plane); inclination in [-90, 90], the elevation of the
axis out of the section plane towards the normal beam (+z), for the representative with
u_x >= 0; the axis (x, y, z) of unit length with u_x >= 0. The tilted beam is tilted by gamma
in the model's x-z plane (:mod:`kernels.optic_axis`), i.e. along the direction of orientation 0.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from .backend import ArrayModule, to_host
from .optic_axis import (
    DEFAULT_GAMMA_DEG,
    axis_weight,
    inplane_rgb,
    solve_optic_axis,
    through_plane_rgb,
)
from .register import Pyramid, RegisterParams, Registration, register_slices, warp_stack

__all__ = [
    "AXIAL_CHANNELS",
    "CHANNELS",
    "UNITS",
    "ThruPlane",
    "ThruPlaneParams",
    "gaussian_nan",
    "log_birefringence",
    "thruplane",
    "tissue_mask",
]

# the channels of a slice's axis products, in store order
CHANNELS = (
    "delta_n",
    "inclination",
    "azimuth",
    "axis_x",
    "axis_y",
    "axis_z",
    "vector_x",
    "vector_y",
    "vector_z",
    "residual",
    "inplane_r",
    "inplane_g",
    "inplane_b",
    "throughplane_r",
    "throughplane_g",
    "throughplane_b",
    "tilted_birefringence",
    "tilted_orientation",
    "mask",
)
AXIAL_CHANNELS = ("azimuth", "tilted_orientation")  # 180-degree periodic
UNITS = {
    "delta_n": "delta-n (dimensionless): true birefringence",
    "inclination": "degrees, [-90, 90]: elevation of the optic axis towards the normal beam (+z)",
    "azimuth": "degrees, [-90, 90): in-plane angle of the optic axis, model frame (+x to +y)",
    "axis_x": "unit optic axis, x (u_x >= 0)",
    "axis_y": "unit optic axis, y",
    "axis_z": "unit optic axis, z (towards the normal beam)",
    "vector_x": "axis x birefringence weight (the lab's oct_vec_3d brightness), 0..1",
    "vector_y": "axis y birefringence weight, 0..1",
    "vector_z": "axis z birefringence weight, 0..1",
    "residual": "fit residual sqrt(cost / (b_n^2 + b_t^2)), 0 = perfect",
    "inplane_r": "in-plane preview RGB: hue = azimuth, value = delta-n (0..1)",
    "inplane_g": "in-plane preview RGB (0..1)",
    "inplane_b": "in-plane preview RGB (0..1)",
    "throughplane_r": "through-plane preview RGB: hue = inclination, value = delta-n (0..1)",
    "throughplane_g": "through-plane preview RGB (0..1)",
    "throughplane_b": "through-plane preview RGB (0..1)",
    "tilted_birefringence": "delta-n: the tilted beam's (smoothed) apparent birefringence, "
    "registered into the normal mosaic's frame",
    "tilted_orientation": "degrees, [-90, 90): the tilted beam's apparent orientation "
    "(the mosaic's convention), registered into the normal mosaic's frame",
    "mask": "1 where the axis was fitted (inside both masks), 0 elsewhere, NaN without data",
}


@dataclass(frozen=True)
class ThruPlaneParams:
    """Settings of :func:`thruplane` (lengths in pixels of the normal mosaic)."""

    gamma_deg: float = DEFAULT_GAMMA_DEG  # the tilted beam's tilt (the mosaic's tilt_deg)
    smooth_sigma_px: float = 3.0  # Gaussian on both birefringence maps (the lab's)
    register: RegisterParams = field(
        default_factory=lambda: RegisterParams(
            model="affine", max_rotation_deg=5.0, max_scale_change=0.1
        )
    )
    iterations: int = 10  # solve_optic_axis
    polish_iterations: int = 40
    dn_range: tuple[float, float] | None = None  # previews' value range; None: P1..P99
    threads: int | None = None  # resampling threads (None: every CPU)


@dataclass
class ThruPlane:
    """What :func:`thruplane` computed: the registration, the tilted -> normal matrix used
    (the registration's, or ``init`` when it was not accepted), the products (:data:`CHANNELS`,
    float32 maps of the normal mosaic's shape) and figures (quality, fit statistics, seconds)."""

    registration: Registration
    matrix: np.ndarray
    products: dict[str, np.ndarray]  # views into `stack`
    figures: dict[str, Any]
    stack: np.ndarray | None = None  # (c, y, x) float32, channels in CHANNELS order


def gaussian_nan(image: np.ndarray, sigma: float, truncate: float = 2.0) -> np.ndarray:
    """Gaussian smoothing ignoring NaN (normalised convolution); NaN stays NaN. ``truncate``
    2 sigma is MATLAB ``imgaussfilt``'s kernel (2 ceil(2 sigma) + 1 taps). float32."""
    img = np.asarray(image, dtype=np.float32)
    valid = np.isfinite(img)
    if sigma <= 0:
        return img.copy()
    num = ndimage.gaussian_filter(np.where(valid, img, 0.0), sigma, truncate=truncate)
    den = ndimage.gaussian_filter(valid.astype(np.float32), sigma, truncate=truncate)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = num / den
    return np.where(valid, out, np.nan).astype(np.float32)


def tissue_mask(aip_db: np.ndarray, threshold_db: float, sigma_px: float = 5.0) -> np.ndarray:
    """The lab's mask of a mosaic: its AIP [dB] smoothed (Gaussian ``sigma_px``, NaN-aware)
    above ``threshold_db``. float32: 1 tissue, 0 not, NaN where the mosaic has no data."""
    smooth = gaussian_nan(aip_db, sigma_px)
    mask = np.where(smooth > threshold_db, 1.0, 0.0).astype(np.float32)
    mask[~np.isfinite(smooth)] = np.nan
    return mask


def log_birefringence(biref: np.ndarray) -> np.ndarray:
    """What the registration matches: log of the apparent birefringence (floored at 5 % of
    its median). Each beam sees delta-n times a smooth factor of the axis direction
    (1 - (u.k)^2), so in logs the two maps differ by a smooth additive field, which the
    registration's band-pass removes; their texture (delta-n's) is the same."""
    b = np.asarray(biref, dtype=np.float32)
    positive = b[np.isfinite(b) & (b > 0)]
    if positive.size == 0:
        return np.full(b.shape, np.nan, np.float32)
    floor = np.float32(0.05 * float(np.median(positive)))
    with np.errstate(invalid="ignore"):
        return np.where(np.isfinite(b), np.log(np.maximum(b, floor)), np.nan).astype(np.float32)


def _inside(mask: np.ndarray | None, like: np.ndarray) -> np.ndarray:
    if mask is None:
        return np.isfinite(like)
    return np.nan_to_num(np.asarray(mask, dtype=np.float32), nan=0.0) >= 0.5


def thruplane(
    normal: Mapping[str, np.ndarray],
    tilted: Mapping[str, np.ndarray],
    init: np.ndarray | None = None,
    params: ThruPlaneParams | None = None,
    xp: ArrayModule | None = None,
) -> ThruPlane:
    """Register ``tilted`` onto ``normal`` and fit the 3-D optic axis (module docstring).

    ``normal``/``tilted``: en-face maps of each mosaic, ``birefringence`` (delta-n),
    ``orientation`` (degrees, the toolbox's convention) and optionally ``mask`` (1/0/NaN,
    :func:`tissue_mask`). ``init``: tilted pixel -> normal pixel from the stage geometry
    (3x3, ``(y, x, 1)``, conventions of :mod:`kernels.register`). ``xp``: the array module
    of the axis fit (NumPy or CuPy); registration and resampling run on the host.
    """
    p = params or ThruPlaneParams()
    init = np.eye(3) if init is None else np.asarray(init, dtype=float)
    figures: dict[str, Any] = {}
    started = time.perf_counter()
    raw_n = np.asarray(normal["birefringence"], dtype=np.float32)
    raw_t = np.asarray(tilted["birefringence"], dtype=np.float32)
    data_n = np.isfinite(raw_n)  # where the normal mosaic has data
    in_n = _inside(normal.get("mask"), raw_n) & data_n
    in_t = _inside(tilted.get("mask"), raw_t)
    raw_n = np.where(in_n, raw_n, np.nan)
    raw_t = np.where(in_t, raw_t, np.nan)
    figures["smooth_s"] = 0.0

    t0 = time.perf_counter()
    sigma = p.smooth_sigma_px
    reg = register_slices(
        Pyramid.of(log_birefringence(gaussian_nan(raw_n, sigma))),
        Pyramid.of(log_birefringence(gaussian_nan(raw_t, sigma))),
        init=init,
        params=p.register,
    )
    matrix = reg.matrix if reg.accepted else init
    figures["register_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    o_t = np.where(in_t, np.asarray(tilted["orientation"], dtype=np.float32), np.nan)
    stack = np.stack([raw_t, o_t, in_t.astype(np.float32)])
    warped = warp_stack(stack, matrix, raw_n.shape, axial=[False, True, False], threads=p.threads)
    bt_w, ot_w, mt_w = warped
    figures["resample_s"] = time.perf_counter() - t0

    # both birefringence maps smoothed over the same support (inside both masks), so that
    # near a mask's edge the two beams' maps average the same pixels
    t0 = time.perf_counter()
    o_n = np.asarray(normal["orientation"], dtype=np.float32)
    fit_mask = in_n & (np.nan_to_num(mt_w, nan=0.0) >= 0.5)
    fit_mask &= np.isfinite(raw_n) & np.isfinite(bt_w) & np.isfinite(o_n) & np.isfinite(ot_w)
    b_n = gaussian_nan(np.where(fit_mask, raw_n, np.nan), sigma)
    b_t = gaussian_nan(np.where(fit_mask, bt_w, np.nan), sigma)
    figures["smooth_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    fit = solve_optic_axis(
        b_n,
        -o_n,  # the toolbox passes -ori: the model frame
        b_t,
        -ot_w,
        gamma_deg=p.gamma_deg,
        mask=fit_mask,
        iterations=p.iterations,
        polish_iterations=p.polish_iterations,
        xp=xp,
    )
    theta, alpha, dn = (to_host(a) for a in (fit.theta_deg, fit.alpha_deg, fit.delta_n))
    axis, residual, branch = to_host(fit.axis), to_host(fit.residual), to_host(fit.branch)
    figures["fit_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    del fit, raw_t, o_t, stack, warped, mt_w
    fitted = dn[np.isfinite(dn)]
    if p.dn_range is not None:
        lo, hi = (float(v) for v in p.dn_range)
    elif fitted.size:
        lo, hi = (float(v) for v in np.percentile(fitted, [1.0, 99.0]))
    else:
        lo, hi = 0.0, 1.0
    hi = hi if hi > lo else lo + 1e-12
    # every product in one (c, y, x) stack (what the store is written from), row block by
    # row block so that the previews' float64 temporaries stay small
    out = np.empty((len(CHANNELS), *raw_n.shape), dtype=np.float32)
    at = {name: k for k, name in enumerate(CHANNELS)}
    weight = axis_weight(dn)
    for r0 in range(0, raw_n.shape[0], 512):
        r = slice(r0, min(r0 + 512, raw_n.shape[0]))
        inside = fit_mask[r]
        out[at["delta_n"], r] = dn[r]
        out[at["inclination"], r] = alpha[r]
        out[at["azimuth"], r] = theta[r]
        for k, c in enumerate("xyz"):
            out[at[f"axis_{c}"], r] = axis[r, :, k]
            out[at[f"vector_{c}"], r] = np.where(inside, axis[r, :, k] * weight[r], np.nan)
        out[at["residual"], r] = residual[r]
        inplane = inplane_rgb(theta[r], dn[r], lo, hi)
        through = through_plane_rgb(alpha[r], dn[r], lo, hi)
        for k, c in enumerate("rgb"):
            out[at[f"inplane_{c}"], r] = inplane[..., k]
            out[at[f"throughplane_{c}"], r] = through[..., k]
        out[at["tilted_birefringence"], r] = np.where(inside, b_t[r], np.nan)
        out[at["tilted_orientation"], r] = np.where(in_n[r], ot_w[r], np.nan)
        out[at["mask"], r] = np.where(data_n[r], inside.astype(np.float32), np.nan)
    products = {name: out[k] for k, name in enumerate(CHANNELS)}
    figures["products_s"] = time.perf_counter() - t0
    figures["total_s"] = time.perf_counter() - started

    n_fit = int(fit_mask.sum())
    res = residual[fit_mask] if n_fit else np.zeros(0, np.float32)
    figures.update(
        fitted_px=n_fit,
        normal_mask_px=int(in_n.sum()),
        fitted_fraction=n_fit / max(1, int(in_n.sum())),
        residual_median=float(np.median(res)) if n_fit else math.nan,
        residual_p95=float(np.percentile(res, 95)) if n_fit else math.nan,
        delta_n_median=float(np.median(fitted)) if fitted.size else math.nan,
        branch2_fraction=float(np.mean(branch[fit_mask] == 2)) if n_fit else 0.0,
        preview_dn_range=[lo, hi],
        gamma_deg=float(p.gamma_deg),
    )
    return ThruPlane(
        registration=reg,
        matrix=np.asarray(matrix, float),
        products=products,
        figures=figures,
        stack=out,
    )
