"""lambda -> k resampling as precomputed gather tables (index + weight per tap).

For every output sample j on the linear-k grid the table holds ``taps`` source pixel indices and
weights, so resampling a whole batch of spectra is ``sum_t w[t] * x[..., idx[t]]``: a few gathers
and multiply-adds over all A-lines at once, identical on NumPy and CuPy.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from .backend import ArrayModule, device_key
from .calibration import SpectrometerCalibration

__all__ = ["ResamplingTable", "fractional_pixels", "resample", "resampling_table", "tap_weights"]

_CACHE: OrderedDict[tuple[Any, ...], ResamplingTable] = OrderedDict()
_CACHE_SIZE = 16
_LOCK = threading.Lock()


@dataclass(frozen=True)
class ResamplingTable:
    """Per-channel gather tables and the per-sample post factor, resident on one device.

    Attributes:
        indices: intp [2, taps, S] source pixel of each tap, per channel.
        weights: float32 [2, taps, S] tap weights, per channel.
        post: [S] window * exp(-i*dispersion): complex64, or float32 when it is real.
        real_post: True when ``post`` is real (no dispersion), so rfft is valid.
    """

    indices: Any
    weights: Any
    post: Any
    real_post: bool

    @property
    def taps(self) -> int:
        return int(self.indices.shape[1])


def fractional_pixels(cal: SpectrometerCalibration, channel: int) -> np.ndarray:
    """Fractional pixel position of each k-grid sample for ``channel`` (float64, host).

    Not clipped: a grid sample just outside the pixels (rounding at the ends of the band) gets a
    position below 0 or above n_samples - 1, which "linear" extrapolates and "cubic" clamps.
    """
    poly = np.asarray(cal.wavelength_poly(channel), dtype=np.float64)
    dpoly = np.polynomial.polynomial.polyder(poly)
    lam_pix = cal.wavelengths_nm(channel)
    lam_target = 2.0 * math.pi / cal.k_grid() * 1e3  # nm
    pix = np.arange(cal.n_samples, dtype=np.float64)
    order = np.argsort(lam_pix)
    p = np.interp(lam_target, lam_pix[order], pix[order])  # initial guess
    for _ in range(4):  # Newton refinement on the exact polynomial
        resid = np.polynomial.polynomial.polyval(p, poly) - lam_target
        p = p - resid / np.polynomial.polynomial.polyval(p, dpoly)
    return p


def _lagrange4(f: np.ndarray) -> np.ndarray:
    """4-point Lagrange weights [4, S] for taps at -1, 0, 1, 2 and fraction f in [0, 1)."""
    return np.stack(
        [
            -f * (f - 1) * (f - 2) / 6,
            (f + 1) * (f - 1) * (f - 2) / 2,
            -(f + 1) * f * (f - 2) / 2,
            (f + 1) * f * (f - 1) / 6,
        ]
    )


def tap_weights(pos: np.ndarray, n: int, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(indices [taps, S], weights [taps, S]) interpolating at fractional positions ``pos``.

    "linear": two taps, extrapolating the end segments for positions outside [0, n - 1];
    "cubic": four-point Lagrange (exact for cubics; lower leakage than Keys cubic convolution on
    near-Nyquist fringes), positions clamped to the pixels and indices edge-replicated.
    """
    if kind == "linear":
        i0 = np.clip(np.floor(pos).astype(np.intp), 0, n - 2)
        f = pos - i0
        return np.stack([i0, i0 + 1]), np.stack([1.0 - f, f])
    if kind == "cubic":
        pos = np.clip(pos, 0.0, n - 1.0)
        i0 = np.floor(pos).astype(np.intp)
        f = pos - i0
        idx = np.clip(i0[None, :] + np.arange(-1, 3)[:, None], 0, n - 1)
        return idx, _lagrange4(f)
    raise ValueError(f"interpolation must be 'linear' or 'cubic', got {kind!r}")


def _window(cal: SpectrometerCalibration) -> np.ndarray:
    if cal.window == "none":
        return np.ones(cal.n_samples)
    j = np.arange(cal.n_samples)
    return 0.5 - 0.5 * np.cos(2.0 * math.pi * j / cal.n_samples)  # periodic Hann


def _build(cal: SpectrometerCalibration, xp: ArrayModule) -> ResamplingTable:
    idx, wts = [], []
    for ch in (0, 1):
        i, w = tap_weights(fractional_pixels(cal, ch), cal.n_samples, cal.interpolation)
        idx.append(i)
        wts.append(w)
    post = _window(cal)
    real_post = not cal.has_dispersion
    if real_post:
        post_arr = xp.asarray(post.astype(np.float32))
    else:
        post_arr = xp.asarray(
            (post * np.exp(-1j * cal.dispersion_phase_rad())).astype(np.complex64)
        )
    return ResamplingTable(
        indices=xp.asarray(np.stack(idx)),
        weights=xp.asarray(np.stack(wts).astype(np.float32)),
        post=post_arr,
        real_post=real_post,
    )


def resampling_table(
    cal: SpectrometerCalibration, xp: ArrayModule | None = None
) -> ResamplingTable:
    """The (cached) resampling table of ``cal`` on backend ``xp`` (NumPy when None)."""
    xp = np if xp is None else xp
    key = (cal, device_key(xp))
    with _LOCK:
        table = _CACHE.get(key)
        if table is None:
            table = _build(cal, xp)
            _CACHE[key] = table
            while len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
        else:
            _CACHE.move_to_end(key)
    return table


def resample(x: Any, indices: Any, weights: Any, xp: ArrayModule) -> Any:
    """sum_t weights[t] * x[..., indices[t]] as float32 (x: any real dtype, [..., S])."""
    acc = xp.take(x, indices[0], axis=-1) * weights[0]
    for t in range(1, indices.shape[0]):
        acc += xp.take(x, indices[t], axis=-1) * weights[t]
    return acc
