"""Spectrometer calibration: pixel wavelengths, the linear-k grid, dispersion and output layout.

Units and conventions
---------------------
* Pixel index ``p`` runs 0..n_samples-1 in the order samples are stored in the raw file.
* ``wavelength_poly_nm``: lambda(p) = sum_i c_i * p**i in nm (ascending powers).
* Wavenumber ``k = 2*pi / lambda`` in rad/um (lambda in um).
* The resampled grid is linear in k from k(first pixel) to k(last pixel) of channel 0 (so it
  descends when wavelength grows with pixel index); with a separate channel-2 polynomial it spans
  the k range both channels cover, in channel 0's direction.
* Dispersion: phase(k) = a2*(k - kc)**2 + a3*(k - kc)**3 [rad] with ``kc`` the centre of the
  grid, a2 in rad*um**2 and a3 in rad*um**3. It is the phase carried by the positive-depth
  interference term on the resampled grid; compensation multiplies by exp(-i*phase).
* Depth: a reflector at single-pass optical path difference z [um] lands in FFT bin
  z * n_samples * |dk| / pi, i.e. the axial pixel is pi / (n_samples * |dk|) um in air.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

import numpy as np

Interpolation = Literal["linear", "cubic"]
Window = Literal["hann", "none"]
Background = Literal["mean", "median"]
BackgroundScope = Literal["bscan", "tile"]
BackgroundAfter = Literal["none", "median"]
OrientationWrap = Literal["full", "once"]

# 1220-1385 nm over 2048 pixels with 5 nm of mid-band curvature (see ``from_band``).
DEFAULT_WAVELENGTH_POLY_NM = (1220.0, 0.090376, -4.7731e-6)


@dataclass(frozen=True)
class SpectrometerCalibration:
    """Everything needed to turn raw spectra into complex depth profiles.

    Attributes:
        n_samples: camera pixels per spectrum (2048 on the real system).
        wavelength_poly_nm: lambda(p) polynomial in nm, ascending powers of pixel index p.
        wavelength_poly_nm_ch2: polynomial for channel 2 if its spectrometer differs (e.g. its
            pixels are stored in reverse order); None uses ``wavelength_poly_nm``.
        dispersion_coeffs: (a2 [rad um^2], a3 [rad um^3]) about the grid centre wavenumber.
        dispersion_phase: measured phase [rad] per resampled-k sample; overrides the polynomial.
        autocorr_bins: FFT bins dropped at zero depth.
        depth_range: (start, stop) bins kept after dropping, None keeps up to n_samples // 2.
        interpolation: "linear" (extrapolating past the last pixel, like MATLAB's
            ``interp1(..., 'linear', 'extrap')``) or "cubic" (4-point Lagrange) resampling.
        window: "hann" apodization of the resampled spectrum, or "none".
        flip_z: reverse the output depth axis.
        orientation_offset_deg: system optic-axis offset added to the orientation.
        orientation_sign: +1 or -1, sign applied to the channel phase difference.
        background: per-pixel "mean" or "median" over A-lines subtracted from each channel.
        background_scope: background over the A-lines of each B-line ("bscan") or of the tile.
        background_after: "median" also subtracts, after resampling, the per-sample median over
            the A-lines of each B-line (psoct-toolbox's second DC removal); "none" skips it.
        orientation_wrap: "full" wraps the doubled angle into [-180, 180) (orientation in
            [-90, 90)); "once" wraps sign*(arg J1 - arg J2) + 2*offset by a single +-360 deg
            step, as psoct-toolbox's complex2volumes does (orientation can reach 90 + offset
            for a few voxels).
    """

    n_samples: int = 2048
    wavelength_poly_nm: tuple[float, ...] = DEFAULT_WAVELENGTH_POLY_NM
    wavelength_poly_nm_ch2: tuple[float, ...] | None = None
    dispersion_coeffs: tuple[float, float] = (0.0, 0.0)
    dispersion_phase: tuple[float, ...] | None = None
    autocorr_bins: int = 24
    depth_range: tuple[int, int] | None = None
    interpolation: Interpolation = "cubic"
    window: Window = "hann"
    flip_z: bool = False
    orientation_offset_deg: float = 0.0
    orientation_sign: int = 1
    background: Background = "mean"
    background_scope: BackgroundScope = "bscan"
    background_after: BackgroundAfter = "none"
    orientation_wrap: OrientationWrap = "full"

    def __post_init__(self) -> None:
        def freeze(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        freeze("wavelength_poly_nm", tuple(float(c) for c in self.wavelength_poly_nm))
        if self.wavelength_poly_nm_ch2 is not None:
            freeze("wavelength_poly_nm_ch2", tuple(float(c) for c in self.wavelength_poly_nm_ch2))
        a2, a3 = self.dispersion_coeffs
        freeze("dispersion_coeffs", (float(a2), float(a3)))
        if self.dispersion_phase is not None:
            freeze("dispersion_phase", tuple(float(v) for v in self.dispersion_phase))
        if self.depth_range is not None:
            freeze("depth_range", (int(self.depth_range[0]), int(self.depth_range[1])))
        self._validate()

    def _validate(self) -> None:
        n = self.n_samples
        if n < 16 or n % 2:
            raise ValueError(f"n_samples must be an even integer >= 16, got {n}")
        half = n // 2
        if not 0 <= self.autocorr_bins < half:
            raise ValueError(f"autocorr_bins must be in [0, {half}), got {self.autocorr_bins}")
        if self.depth_range is not None:
            start, stop = self.depth_range
            if not 0 <= start < stop <= half - self.autocorr_bins:
                raise ValueError(
                    f"depth_range must satisfy 0 <= start < stop <= {half - self.autocorr_bins}, "
                    f"got {self.depth_range}"
                )
        if self.dispersion_phase is not None and len(self.dispersion_phase) != n:
            raise ValueError(
                f"dispersion_phase needs {n} values (one per resampled sample), "
                f"got {len(self.dispersion_phase)}"
            )
        for name, allowed in (
            ("interpolation", ("linear", "cubic")),
            ("window", ("hann", "none")),
            ("background", ("mean", "median")),
            ("background_scope", ("bscan", "tile")),
            ("background_after", ("none", "median")),
            ("orientation_wrap", ("full", "once")),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.orientation_sign not in (1, -1):
            raise ValueError(f"orientation_sign must be +1 or -1, got {self.orientation_sign}")
        for ch in (0, 1):
            lam = self.wavelengths_nm(ch)
            steps = np.diff(lam)
            if not (np.all(lam > 0) and (np.all(steps > 0) or np.all(steps < 0))):
                raise ValueError(
                    f"wavelength polynomial of channel {ch + 1} must give positive, strictly "
                    "monotonic wavelengths over the pixels"
                )
        if self.k_step == 0.0:
            raise ValueError("the two channels' wavenumber ranges do not overlap")

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_band(
        cls,
        n_samples: int,
        start_nm: float = 1220.0,
        stop_nm: float = 1385.0,
        curvature_nm: float = 5.0,
        **kwargs: Any,
    ) -> SpectrometerCalibration:
        """Calibration whose wavelength runs start_nm -> stop_nm over the pixels.

        ``curvature_nm`` bows the mapping: lambda at the middle pixel is the band centre plus it.
        """
        span = float(n_samples - 1)
        c1 = (stop_nm - start_nm + 4.0 * curvature_nm) / span
        c2 = -4.0 * curvature_nm / span**2
        return cls(n_samples=n_samples, wavelength_poly_nm=(start_nm, c1, c2), **kwargs)

    def replace(self, **changes: Any) -> SpectrometerCalibration:
        """Copy with some fields changed (``dataclasses.replace``)."""
        return replace(self, **changes)

    # ------------------------------------------------------------------ geometry (host, float64)
    def wavelength_poly(self, channel: int = 0) -> tuple[float, ...]:
        """Wavelength polynomial (nm, ascending powers) of channel 0 or 1."""
        if channel == 1 and self.wavelength_poly_nm_ch2 is not None:
            return self.wavelength_poly_nm_ch2
        return self.wavelength_poly_nm

    def wavelengths_nm(self, channel: int = 0) -> np.ndarray:
        """lambda(p) in nm at every pixel of ``channel``."""
        p = np.arange(self.n_samples, dtype=np.float64)
        return np.polynomial.polynomial.polyval(p, self.wavelength_poly(channel))

    def pixel_wavenumbers(self, channel: int = 0) -> np.ndarray:
        """k(p) = 2*pi/lambda in rad/um at every pixel of ``channel``."""
        return 2.0 * math.pi / (self.wavelengths_nm(channel) * 1e-3)

    @property
    def k_limits(self) -> tuple[float, float]:
        """(k at grid start, k at grid end) in rad/um."""
        k0, k1 = self.pixel_wavenumbers(0), self.pixel_wavenumbers(1)
        lo = max(min(k0[0], k0[-1]), min(k1[0], k1[-1]))
        hi = min(max(k0[0], k0[-1]), max(k1[0], k1[-1]))
        if hi <= lo:
            return (lo, lo)
        return (hi, lo) if k0[0] > k0[-1] else (lo, hi)

    def k_grid(self) -> np.ndarray:
        """The linear-in-k resampling grid (rad/um), n_samples points in pixel order."""
        start, stop = self.k_limits
        return np.linspace(start, stop, self.n_samples)

    @property
    def k_center(self) -> float:
        """Centre wavenumber kc of the grid (rad/um), the dispersion expansion point."""
        start, stop = self.k_limits
        return 0.5 * (start + stop)

    @property
    def k_step(self) -> float:
        """|dk| between resampled samples (rad/um)."""
        start, stop = self.k_limits
        return abs(stop - start) / (self.n_samples - 1)

    @property
    def k_ascending(self) -> bool:
        """True when the grid's wavenumber increases with sample index."""
        start, stop = self.k_limits
        return stop > start

    def axial_pixel_um(self, refractive_index: float = 1.0) -> float:
        """Depth per output bin in um (pi / (n_samples * |dk|), divided by the medium index)."""
        return math.pi / (self.n_samples * self.k_step * refractive_index)

    def dispersion_phase_rad(self) -> np.ndarray:
        """Dispersion phase [rad] at every resampled sample (measured, or the polynomial)."""
        if self.dispersion_phase is not None:
            return np.asarray(self.dispersion_phase, dtype=np.float64)
        a2, a3 = self.dispersion_coeffs
        dk = self.k_grid() - self.k_center
        return a2 * dk**2 + a3 * dk**3

    @property
    def has_dispersion(self) -> bool:
        """True when compensation is not the identity."""
        if self.dispersion_phase is not None:
            return any(v != 0.0 for v in self.dispersion_phase)
        return self.dispersion_coeffs != (0.0, 0.0)

    # ------------------------------------------------------------------ output layout
    @property
    def fft_bins(self) -> tuple[int, int]:
        """(first, stop) FFT bin indices kept in the output, before any z flip."""
        first = self.autocorr_bins
        if self.depth_range is None:
            return first, self.n_samples // 2
        return first + self.depth_range[0], first + self.depth_range[1]

    @property
    def n_depth(self) -> int:
        """Number of depth bins in the output."""
        first, stop = self.fft_bins
        return stop - first

    def describe(self) -> dict[str, Any]:
        """Plain-dict view (for logging / metadata)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}
