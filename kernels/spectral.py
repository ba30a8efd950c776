"""Raw spectra -> complex depth profiles (Jones components), batched over B-lines.

Raw layout (C-order view of the microscope's NIfTI file): ``uint16[B, 2, A, S]``
(B-lines, polarisation channels, A-lines per B-line, spectral samples).

Per channel: background subtraction -> lambda->k resampling (gather tables) -> optional median
over the A-lines subtracted per k sample (``cal.background_after``) -> dispersion compensation
exp(-i*phase) and optional Hann window -> FFT along samples -> keep ``cal.fft_bins``
(autocorrelation dropped, depth range) -> optional z flip.
Output ``complex64[B, 2, A, Z]``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .backend import ArrayModule, array_module, is_numpy, resolve_xp
from .calibration import SpectrometerCalibration
from .resampling import resample, resampling_table

__all__ = [
    "as_background",
    "bscans_to_complex",
    "estimate_background",
    "jones_depth",
    "jones_to_output_depth",
    "output_depth",
    "spectra_to_complex",
    "tile_background",
    "validate_input",
    "validate_raw",
]


def validate_raw(raw: Any, cal: SpectrometerCalibration) -> None:
    """Raise ValueError unless ``raw`` is ``uint16[B, 2, A, cal.n_samples]`` with B, A >= 1."""
    dtype = getattr(raw, "dtype", None)
    shape = tuple(getattr(raw, "shape", ()))
    if dtype is None or np.dtype(dtype) != np.uint16:
        raise ValueError(f"raw spectra must be a uint16 array, got dtype {dtype}")
    if len(shape) != 4 or shape[1] != 2 or shape[3] != cal.n_samples:
        raise ValueError(
            f"raw spectra must have shape (B, 2, A, {cal.n_samples}) = (B-lines, channels, "
            f"A-lines, samples), got {shape}"
        )
    if shape[0] < 1 or shape[2] < 1:
        raise ValueError(f"raw spectra need at least one B-line and one A-line, got {shape}")


def jones_depth(cal: SpectrometerCalibration) -> int:
    """Depth samples of a complex (Jones) tile: every FFT bin from ``autocorr_bins`` to
    n_samples / 2, before any depth range or flip."""
    return cal.n_samples // 2 - cal.autocorr_bins


def validate_input(data: Any, cal: SpectrometerCalibration) -> None:
    """Raw spectra (:func:`validate_raw`) or complex Jones B-lines ``complex64[B, 2, A, Z]``
    (Z = :func:`jones_depth`, or any depth of a cropped tile when no depth range is set);
    ValueError otherwise."""
    dtype = getattr(data, "dtype", None)
    if dtype is None or np.dtype(dtype).kind != "c":
        validate_raw(data, cal)
        return
    shape = tuple(data.shape)
    if len(shape) != 4 or shape[1] != 2 or min(shape) < 1:
        raise ValueError(
            f"complex tiles must have shape (B, 2, A, Z) = (B-lines, channels, A-lines, depth), "
            f"got {shape}"
        )
    if shape[3] != jones_depth(cal) and cal.depth_range is not None:
        raise ValueError(
            f"a depth range needs complex tiles of every FFT bin {cal.autocorr_bins}.."
            f"{cal.n_samples // 2 - 1} ({jones_depth(cal)} samples), got {shape[3]}"
        )


def output_depth(data: Any, cal: SpectrometerCalibration) -> int:
    """Depth samples of the products of ``data``: the calibration's for spectra and full-depth
    complex tiles, the tile's own for a cropped complex tile."""
    if np.dtype(data.dtype).kind == "c" and data.shape[-1] != jones_depth(cal):
        return int(data.shape[-1])
    return cal.n_depth


def jones_to_output_depth(
    jones: Any, cal: SpectrometerCalibration, xp: ArrayModule | None = None
) -> Any:
    """Complex Jones B-lines in FFT bin order (bins ``autocorr_bins`` .. n/2 - 1, tilepipe's
    sign: the FFT of the resampled spectra) -> the calibration's output depth (depth range
    kept, flipped with ``flip_z``), complex64 ``[b, 2, A, Z_out]``. A cropped tile (another
    depth) keeps its depth, flipped with ``flip_z``."""
    xp = resolve_xp(xp, jones)
    first, stop = cal.fft_bins
    if jones.shape[-1] == jones_depth(cal):
        seg = jones[..., first - cal.autocorr_bins : stop - cal.autocorr_bins]
    else:
        seg = jones
    if cal.flip_z:
        seg = seg[..., ::-1]
    return xp.ascontiguousarray(seg, dtype=xp.complex64)


def _background(x: Any, kind: str, xp: ArrayModule) -> Any:
    """Per-pixel background over the A-line axis (-2), float32, keepdims."""
    if kind == "median":
        return xp.median(x, axis=-2, keepdims=True).astype(xp.float32)
    return x.mean(axis=-2, dtype=xp.float32, keepdims=True)


def estimate_background(
    raw: Any, cal: SpectrometerCalibration, xp: ArrayModule | None = None
) -> Any:
    """Tile-wide per-channel background ``float32[2, 1, S]`` (mean or median over B and A)."""
    validate_raw(raw, cal)
    xp = resolve_xp(xp, raw)
    x = xp.asarray(raw)
    if cal.background == "median":
        flat = xp.moveaxis(x, 1, 0).reshape(2, -1, cal.n_samples)
        return xp.median(flat, axis=1, keepdims=True).astype(xp.float32)
    return x.mean(axis=(0, 2), dtype=xp.float64).astype(xp.float32)[:, None, :]


def as_background(background: Any, cal: SpectrometerCalibration, xp: ArrayModule) -> Any:
    """A per-channel background spectrum (``[2, S]`` or ``[2, 1, S]``) as float32 ``[2, 1, S]``
    on ``xp``."""
    bg = xp.asarray(background, dtype=xp.float32)
    if bg.size != 2 * cal.n_samples:
        raise ValueError(
            f"background must hold 2 x {cal.n_samples} values (one spectrum per channel), "
            f"got shape {tuple(bg.shape)}"
        )
    return bg.reshape(2, 1, cal.n_samples)


def tile_background(
    raw: Any, cal: SpectrometerCalibration, background: Any | None, xp: ArrayModule
) -> Any | None:
    """The background a tile's spectra lose, float32 ``[2, 1, S]`` on ``xp``: ``background``
    when given, the tile-wide estimate (computed where ``raw`` lives) when
    ``cal.background_scope == "tile"``, else None (each batch estimates its own)."""
    if background is not None:
        return as_background(background, cal, xp)
    if cal.background_scope == "tile":
        return xp.asarray(estimate_background(raw, cal, array_module(raw)))
    return None


def _fft(y: Any, real_input: bool, xp: ArrayModule) -> Any:
    """FFT along the last axis (rfft for real input); SciPy's pocketfft on the host."""
    if is_numpy(xp):
        import scipy.fft as sfft

        return sfft.rfft(y, axis=-1) if real_input else sfft.fft(y, axis=-1, overwrite_x=True)
    return xp.fft.rfft(y, axis=-1) if real_input else xp.fft.fft(y, axis=-1)


def bscans_to_complex(
    x: Any,
    cal: SpectrometerCalibration,
    background: Any | None = None,
    xp: ArrayModule | None = None,
) -> Any:
    """Complex depth profiles ``complex64[b, 2, A, Z]`` for one batch already on the device.

    ``background``: ``float32[2, 1, S]`` (or ``[b, 2, 1, S]``) to subtract; None estimates it
    over the A-lines of each B-line (``cal.background`` = "mean" or "median").
    """
    xp = resolve_xp(xp, x)
    table = resampling_table(cal, xp)
    bg = _background(x, cal.background, xp) if background is None else background
    first, stop = cal.fft_bins
    b, _, a, _ = x.shape
    out = xp.empty((b, 2, a, stop - first), dtype=xp.complex64)
    for ch in (0, 1):
        idx, w = table.indices[ch], table.weights[ch]
        y = resample(x[:, ch], idx, w, xp)
        y -= resample(bg[..., ch, :, :], idx, w, xp)
        if cal.background_after == "median":
            y -= xp.median(y, axis=-2, keepdims=True)
        if table.real_post:
            y *= table.post
        else:
            y = y * table.post
        seg = _fft(y, table.real_post, xp)[..., first:stop]
        out[:, ch] = seg[..., ::-1] if cal.flip_z else seg
    return out


def spectra_to_complex(
    raw: Any,
    cal: SpectrometerCalibration,
    *,
    xp: ArrayModule | None = None,
    batch_bscans: int | None = None,
    background: Any | None = None,
) -> Any:
    """Whole tile ``uint16[B, 2, A, S]`` -> ``complex64[B, 2, A, Z]`` on ``xp``.

    Processes ``batch_bscans`` B-lines at a time (default 4) so temporaries stay bounded;
    results do not depend on the batch size. With ``cal.background_scope == "tile"`` and no
    explicit ``background`` the background is estimated once over the whole tile.
    """
    validate_raw(raw, cal)
    xp = resolve_xp(xp, raw)
    n_b = raw.shape[0]
    step = max(1, int(batch_bscans or 4))
    background = tile_background(raw, cal, background, xp)
    out = xp.empty((n_b, 2, raw.shape[2], cal.n_depth), dtype=xp.complex64)
    for b0 in range(0, n_b, step):
        x = xp.asarray(raw[b0 : b0 + step])
        out[b0 : b0 + step] = bscans_to_complex(x, cal, background, xp)
    return out
