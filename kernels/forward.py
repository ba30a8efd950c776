"""Forward model: sample reflectors -> raw uint16 spectrometer frames (simulator and tests).

Each camera pixel p of channel c sees, at its true wavenumber k_p (from the wavelength
polynomial, so non-linear in k):

    I_c(p) = DC_c(p) + E_c(p) * sum_r |A_rc| * cos(s*2*k_p*z_r + phase(k_p) + arg A_rc) + noise

with E the Gaussian source envelope (peak 1), z_r the single-pass optical path difference [um],
A_rc the complex fringe amplitude [counts at the source peak], ``phase`` the dispersion
mismatch in the calibration's parameterisation and s = +1 (-1) when the resampling grid's k
ascends (descends) with sample index. That makes ``A * exp(i*phase)`` the positive-depth term
on the resampled grid, so compensating with the same coefficients is exact and a processed J
is proportional to A. Sample self-interference (autocorrelation) terms are not modelled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .calibration import SpectrometerCalibration

__all__ = [
    "SourceSpectrum",
    "dc_background",
    "depth_bin_of",
    "depth_um_of",
    "ps_amplitudes",
    "simulate_spectra",
]


@dataclass(frozen=True)
class SourceSpectrum:
    """Gaussian source; None picks the band centre and 40% of the band as FWHM."""

    center_nm: float | None = None
    fwhm_nm: float | None = None

    def envelope(self, cal: SpectrometerCalibration, channel: int = 0) -> np.ndarray:
        """Source power at each pixel of ``channel`` (peak 1), float64."""
        band = cal.wavelengths_nm(0)
        center = self.center_nm if self.center_nm is not None else 0.5 * (band[0] + band[-1])
        fwhm = self.fwhm_nm if self.fwhm_nm is not None else 0.4 * abs(band[-1] - band[0])
        lam = cal.wavelengths_nm(channel)
        return np.exp(-4.0 * math.log(2.0) * ((lam - center) / fwhm) ** 2)


def depth_bin_of(depth_um: Any, cal: SpectrometerCalibration) -> Any:
    """Expected (fractional) output depth bin of a reflector at ``depth_um`` after processing."""
    fft_bin = np.asarray(depth_um, dtype=np.float64) * cal.n_samples * cal.k_step / math.pi
    z = fft_bin - cal.fft_bins[0]
    return (cal.n_depth - 1) - z if cal.flip_z else z


def depth_um_of(depth_bin: Any, cal: SpectrometerCalibration) -> Any:
    """Inverse of :func:`depth_bin_of`: single-pass optical path [um] of an output bin."""
    z = np.asarray(depth_bin, dtype=np.float64)
    if cal.flip_z:
        z = (cal.n_depth - 1) - z
    return (z + cal.fft_bins[0]) * math.pi / (cal.n_samples * cal.k_step)


def ps_amplitudes(
    reflectivity: Any,
    retardance_rad: Any,
    orientation_rad: Any,
    cal: SpectrometerCalibration | None = None,
    common_phase_rad: Any = 0.0,
    *,
    axis_relation: tuple[int, float] | None = None,
) -> np.ndarray:
    """Channel amplitudes ``complex128[..., 2]`` of a PS reflector.

    J1 = R*sin(delta)*exp(i*(psi + d/2)), J2 = R*cos(delta)*exp(i*(psi - d/2)) with the phase
    difference d = sign*(2*theta - 2*offset), so psoct.py recovers retardance = delta and
    orientation = theta (mod 180 deg) with ``cal``'s orientation offset and sign.
    ``axis_relation`` = (sign, offset_deg) states an instrument's relation instead (the
    simulator's: (+1, 100), the lab's system), independent of how anything processes it.
    """
    if axis_relation is not None:  # an instrument's own (sign, offset), not a processor's
        sign, offset = axis_relation[0], math.radians(axis_relation[1])
    else:
        sign = cal.orientation_sign if cal is not None else 1
        offset = math.radians(cal.orientation_offset_deg) if cal is not None else 0.0
    r, delta, theta, psi = np.broadcast_arrays(
        *(
            np.asarray(v, dtype=np.float64)
            for v in (reflectivity, retardance_rad, orientation_rad, common_phase_rad)
        )
    )
    half = 0.5 * sign * (2.0 * theta - 2.0 * offset)
    j1 = r * np.sin(delta) * np.exp(1j * (psi + half))
    j2 = r * np.cos(delta) * np.exp(1j * (psi - half))
    return np.stack([j1, j2], axis=-1)


def dc_background(
    cal: SpectrometerCalibration,
    source: SourceSpectrum | None = None,
    reference_counts: float = 20000.0,
    fixed_pattern_counts: float = 300.0,
) -> np.ndarray:
    """Noise-free DC term ``float32[2, S]``: reference-arm spectrum plus a fixed pattern
    (deterministic ripple and per-pixel offsets), as :func:`simulate_spectra` adds it."""
    source = source or SourceSpectrum()
    p = np.arange(cal.n_samples)
    out = np.empty((2, cal.n_samples), dtype=np.float32)
    for ch in (0, 1):
        pixel_offsets = np.random.default_rng(1234 + ch).standard_normal(cal.n_samples)
        ripple = 1.0 + 0.3 * np.sin(2.0 * math.pi * p / (37.3 + ch)) + 0.05 * pixel_offsets
        out[ch] = reference_counts * source.envelope(cal, ch) + fixed_pattern_counts * ripple
    return out


def simulate_spectra(
    depth_um: Any,
    amplitudes: Any,
    cal: SpectrometerCalibration,
    *,
    dispersion_coeffs: tuple[float, float] | None = None,
    source: SourceSpectrum | None = None,
    reference_counts: float = 20000.0,
    fixed_pattern_counts: float = 300.0,
    noise_std: float = 2.0,
    rng: np.random.Generator | int | None = 0,
    chunk_elements: int = 1 << 21,
    carrier_sign: int | None = None,
) -> np.ndarray:
    """Raw frames ``uint16[B, 2, A, S]`` for reflectors at ``depth_um`` ([B, A, R], um).

    ``amplitudes``: complex ``[B, A, R, 2]`` fringe amplitudes per channel in counts at the
    source peak (see :func:`ps_amplitudes`); both arguments broadcast against each other.
    ``dispersion_coeffs`` defaults to the calibration's (a2, a3), so processing with ``cal``
    compensates exactly. The DC term is :func:`dc_background`; ``rng`` drives the noise.
    ``carrier_sign`` = +1 writes the physical fringe cos(+2kz + ...) whatever grid a processor
    resamples onto (an instrument); None picks the sign that makes ``cal``'s own processing
    see ``A * exp(i*phase)`` (kernel tests).
    """
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    amp = np.asarray(amplitudes, dtype=np.complex128)
    depth = np.asarray(depth_um, dtype=np.float64)
    if amp.ndim < 1 or amp.shape[-1] != 2:
        raise ValueError(f"amplitudes need a last axis of 2 channels, got shape {amp.shape}")
    shape = np.broadcast_shapes(depth.shape, amp.shape[:-1])
    if len(shape) != 3:
        raise ValueError(f"depth_um/amplitudes must broadcast to (B, A, R), got {shape}")
    n_b, n_a, n_r = shape
    depth = np.broadcast_to(depth, shape)
    amp = np.broadcast_to(amp, (*shape, 2))
    mag, arg = np.abs(amp), np.angle(amp)
    a2, a3 = cal.dispersion_coeffs if dispersion_coeffs is None else dispersion_coeffs
    source = source or SourceSpectrum()
    s = cal.n_samples
    default = 2.0 if cal.k_ascending else -2.0
    carrier = default if carrier_sign is None else 2.0 * carrier_sign
    out = np.empty((n_b, 2, n_a, s), dtype=np.uint16)
    step = max(1, chunk_elements // (n_a * s))
    dc_all = dc_background(cal, source, reference_counts, fixed_pattern_counts)
    for ch in (0, 1):
        k = cal.pixel_wavenumbers(ch)
        dk = k - cal.k_center
        disp = a2 * dk**2 + a3 * dk**3
        env = source.envelope(cal, ch).astype(np.float32)
        dc = dc_all[ch]
        ck = carrier * k
        for b0 in range(0, n_b, step):
            b1 = min(n_b, b0 + step)
            fringe = np.zeros((b1 - b0, n_a, s), dtype=np.float32)
            for r in range(n_r):
                theta = depth[b0:b1, :, r, None] * ck
                theta += disp
                theta += arg[b0:b1, :, r, ch, None]
                turns = theta * (1.0 / (2.0 * math.pi))  # reduce to [-pi, pi] in float64,
                np.rint(turns, out=turns)  # then a fast float32 cosine
                turns *= -2.0 * math.pi
                theta += turns
                wave = np.cos(theta.astype(np.float32))
                wave *= mag[b0:b1, :, r, ch, None].astype(np.float32)
                fringe += wave
            frame = fringe
            frame *= env
            frame += dc
            if noise_std > 0:
                frame += noise_std * rng.standard_normal(frame.shape, dtype=np.float32)
            np.rint(frame, out=frame)
            np.clip(frame, 0, 65535, out=frame)
            out[b0:b1, ch] = frame
    return out
