"""A forward model of the lab's PS-OCT instrument, written from the physics.

It produces what the acquisition writes: spectral tiles (``nifti-spectral`` and 12-bit
``.raw``), the spectrometer calibration ``wave-pixel.mat`` and the dispersion file. It does not
import the toolbox transcription; the only toolbox knowledge used is the documented shape of its
k grid (``_toolbox_k_grid``), needed to say where a reflector lands and what the dispersion file
must hold.

Model. Each camera pixel p of channel c sees the true wavenumber ``k_c(p) = 2*pi/lambda_c(p)``
(rad/um). A reflector at single-pass optical path difference z (um, from zero delay) with complex
channel amplitude ``A_c`` adds the reference/sample interference term::

    I_c(k) = dark + S(k) * [dc + sum_r 2*|A_rc| * cos(2*k*z_r + arg(A_rc) + phi_disp(k))]

where S is the (Gaussian) source spectrum and ``phi_disp(k) = a2*(k-kc)**2 + a3*(k-kc)**3`` the
sample/reference dispersion mismatch. Sample/sample autocorrelation terms are neglected.

Polarisation (circular input, standard PS-OCT model): for cumulative single-pass retardance
delta and optic axis theta, ``|A_1| ∝ r*sin(delta)`` and ``|A_2| ∝ r*cos(delta)``; the axis
sets the phase difference between the channels. The instrument relation is

    arg(A_1) - arg(A_2) = 2*(theta - AXIS_REF_DEG),   AXIS_REF_DEG = 100 deg.

Why this relation makes the toolbox (descending-k grid, conjugation, flipPhase=false,
phaseOffset=100 deg) return theta: on a grid ``k_j = K0 - j*dk`` the fringe
``cos(2*k_j*z + psi)`` is ``(e^{+i(...)} + e^{-i(...)})/2``; only the ``e^{-i(...)}`` half,
``e^{-i(2*K0*z + psi)} * e^{+i*2*dk*z*j}``, lands in the kept FFT bins (``m = z*N*dk/pi`` > 0).
So the FFT peak has phase ``-(2*K0*z + psi)``, and the conjugation gives ``+(2*K0*z + psi)``.
Hence ``angle(J1) - angle(J2) = psi_1 - psi_2`` (the common path term cancels), and the toolbox
computes ``O = (psi_1 - psi_2)/2 + 100 deg`` (mod 180) = theta.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.io

N_SAMPLES = 2048
AUTOCORR_CUT = 24
AXIS_REF_DEG = 100.0  # instrument: axis angle at which the two channels are in phase (x2)

__all__ = [
    "AXIS_REF_DEG",
    "Reflector",
    "Sample",
    "Spectrometer",
    "antithetic",
    "birefringent_slab_sample",
    "calibration_points",
    "channel_amplitudes",
    "default_calibration_wavelengths",
    "depth_for_bin",
    "dispersion_file_values",
    "dispersion_phase",
    "expected_depth_bin",
    "simulate_raw",
    "toolbox_bin_size_um",
    "two_reflector_sample",
    "write_dispersion_file",
    "write_raw12",
    "write_spectral_nifti",
    "write_wave_pixel_mat",
]


# --------------------------------------------------------------------------- spectrometer


@dataclass(eq=False)
class Spectrometer:
    """True wavelength (nm) of every camera pixel, in the order the camera stores them.

    Channel 1 ascends in wavelength with pixel index; channel 2 is stored reversed (descending).
    """

    lam_ch1_nm: np.ndarray
    lam_ch2_nm: np.ndarray
    center_nm: float = field(default=0.0)

    def __post_init__(self) -> None:
        self.lam_ch1_nm = np.asarray(self.lam_ch1_nm, dtype=np.float64)
        self.lam_ch2_nm = np.asarray(self.lam_ch2_nm, dtype=np.float64)
        if not np.all(np.diff(self.lam_ch1_nm) > 0):
            raise ValueError("channel 1 must ascend in wavelength")
        if not np.all(np.diff(self.lam_ch2_nm) < 0):
            raise ValueError("channel 2 must be stored descending in wavelength")
        if not self.center_nm:
            self.center_nm = 0.5 * (self.lam_ch1_nm[0] + self.lam_ch1_nm[-1])

    @classmethod
    def typical(
        cls,
        n: int = N_SAMPLES,
        start_nm: float = 1250.0,
        stop_nm: float = 1370.0,
        ch2_shift_nm: float = 0.8,
        bow_nm: float = 0.3,
    ) -> Spectrometer:
        """Linear dispersion plus a quadratic bow of ``bow_nm`` at mid-array (0 at the ends),
        so a degree-1 calibration fit is close but not exact; channel 2 sees the same optics
        shifted by ``ch2_shift_nm`` and is stored reversed."""
        u = np.arange(n, dtype=np.float64) / (n - 1)
        lam = start_nm + (stop_nm - start_nm) * u + bow_nm * 4 * u * (1 - u)
        return cls(lam, (lam + ch2_shift_nm)[::-1], 0.5 * (start_nm + stop_nm))

    @property
    def n(self) -> int:
        return self.lam_ch1_nm.size

    @property
    def kc_per_um(self) -> float:
        """Centre wavenumber (rad/um) about which the dispersion polynomial is expanded."""
        return 2 * np.pi / (self.center_nm * 1e-3)

    def k_per_um(self, channel: int) -> np.ndarray:
        """True wavenumber (rad/um) of each stored pixel of channel 1 or 2."""
        lam = self.lam_ch1_nm if channel == 1 else self.lam_ch2_nm
        return 2 * np.pi / (lam * 1e-3)


def default_calibration_wavelengths(spec: Spectrometer, count: int = 12) -> np.ndarray:
    """Known wavelengths (nm) spread over the band both channels see."""
    lo = max(spec.lam_ch1_nm[0], spec.lam_ch2_nm[-1])
    hi = min(spec.lam_ch1_nm[-1], spec.lam_ch2_nm[0])
    margin = 0.02 * (hi - lo)
    return np.linspace(lo + margin, hi - margin, count)


def calibration_points(spec: Spectrometer, wavelengths_nm: np.ndarray) -> np.ndarray:
    """1-based fractional pixel positions (N x 2) where each wavelength falls.

    Column 1: channel 1 as stored. Column 2: channel 2 in FLIPPED order (the toolbox flips the
    channel-2 buffer before using the calibration).
    """
    w = np.asarray(wavelengths_nm, dtype=np.float64).ravel()
    pix = np.arange(1, spec.n + 1, dtype=np.float64)
    lam2_flipped = spec.lam_ch2_nm[::-1]
    for lam in (spec.lam_ch1_nm, lam2_flipped):
        if w.min() < lam[0] or w.max() > lam[-1]:
            raise ValueError("calibration wavelength outside a channel's range")
    return np.stack([np.interp(w, spec.lam_ch1_nm, pix), np.interp(w, lam2_flipped, pix)], 1)


def write_wave_pixel_mat(path: str | Path, mu: np.ndarray, wave_prime: np.ndarray) -> None:
    """Write ``wave-pixel.mat`` (MATLAB v5): ``mu`` N x 2 double, ``wave_prime`` N x 1 double."""
    mu = np.asarray(mu, dtype=np.float64)
    wave = np.asarray(wave_prime, dtype=np.float64).reshape(-1, 1)
    scipy.io.savemat(str(path), {"mu": mu, "wave_prime": wave}, format="5")


def _toolbox_k_grid(mu: np.ndarray, wave_prime: np.ndarray, n: int = N_SAMPLES) -> np.ndarray:
    """The toolbox's interpolation grid (rad/um) as documented in ``interpolationwave_20201130``:
    linear fits lambda(pixel) per channel at pixels 1..n; kmin = 2*pi/min(last wavelengths),
    kmax = 2*pi/max(first wavelengths); ``Ks = flipud(linspace(kmin, kmax, n))`` (descending)."""
    wave = np.asarray(wave_prime, dtype=np.float64).ravel()
    x = np.arange(1, n + 1, dtype=np.float64)
    lam = [np.polyval(np.polyfit(np.asarray(mu)[:, c], wave, 1), x) * 1e-3 for c in (0, 1)]
    kmin = 2 * np.pi / min(lam[0][-1], lam[1][-1])
    kmax = 2 * np.pi / max(lam[0][0], lam[1][0])
    return np.linspace(kmin, kmax, n)[::-1]


def toolbox_bin_size_um(mu: np.ndarray, wave_prime: np.ndarray, n: int = N_SAMPLES) -> float:
    """Single-pass OPD per FFT bin on the toolbox grid: ``pi / (n * |dk|)`` (um)."""
    k = _toolbox_k_grid(mu, wave_prime, n)
    return float(np.pi / (n * abs(k[0] - k[1])))


def expected_depth_bin(
    z_um: float | np.ndarray, spec: Spectrometer, mu: np.ndarray, wave_prime: np.ndarray
) -> float | np.ndarray:
    """0-based depth index in the toolbox's products for a reflector at OPD ``z_um``:
    FFT bin ``z*n*|dk|/pi`` minus the 24 cut autocorrelation bins."""
    return np.asarray(z_um) / toolbox_bin_size_um(mu, wave_prime, spec.n) - AUTOCORR_CUT


def depth_for_bin(
    index: float | np.ndarray, spec: Spectrometer, mu: np.ndarray, wave_prime: np.ndarray
) -> float | np.ndarray:
    """Inverse of ``expected_depth_bin``: the OPD (um) that lands on product depth ``index``."""
    return (np.asarray(index) + AUTOCORR_CUT) * toolbox_bin_size_um(mu, wave_prime, spec.n)


# --------------------------------------------------------------------------- dispersion


def dispersion_phase(k_per_um: np.ndarray, kc_per_um: float, a2: float, a3: float) -> np.ndarray:
    """Dispersion mismatch phase (rad) present in the fringe: a2*(k-kc)^2 + a3*(k-kc)^3."""
    dk = np.asarray(k_per_um, dtype=np.float64) - kc_per_um
    return a2 * dk**2 + a3 * dk**3


def dispersion_file_values(
    spec: Spectrometer, mu: np.ndarray, wave_prime: np.ndarray, a2: float, a3: float
) -> np.ndarray:
    """The 2048 values the lab's dispersion file must hold to cancel ``phi_disp`` exactly.

    Derivation: after interpolation, sample j of the toolbox sits at ``k_j`` (descending:
    j = 0 is the largest k) and holds ``cos(2*k_j*z + psi + phi(k_j))``. The half that the
    FFT keeps (positive bins, see the module docstring) is ``e^{-i(2*k_j*z + psi + phi(k_j))}``.
    The toolbox multiplies sample j by ``exp(-1i*file[j])``, so the residual is
    ``e^{-i(phi(k_j) + file[j])}``: cancellation needs ``file[j] = -phi(k_j)``, in the order of
    the toolbox's descending k grid (not the camera's pixel order, not ascending k).
    """
    k = _toolbox_k_grid(mu, wave_prime, spec.n)
    return -dispersion_phase(k, spec.kc_per_um, a2, a3)


def write_dispersion_file(path: str | Path, values: np.ndarray) -> None:
    """Write the dispersion file: raw little-endian float64, no header."""
    Path(path).write_bytes(np.asarray(values, dtype="<f8").tobytes())


# --------------------------------------------------------------------------- sample


@dataclass(frozen=True)
class Reflector:
    """One reflector: OPD (um), amplitude (counts at the source peak), cumulative single-pass
    retardance delta (rad), optic axis theta (deg, the lab's convention), common phase (rad)."""

    depth_um: float
    amplitude: float
    delta_rad: float = 0.0
    theta_deg: float = 0.0
    phase_rad: float = 0.0


@dataclass(eq=False)
class Sample:
    """Reflectors as arrays shaped (B, A, M): M reflectors per A-line (amplitude 0 = none)."""

    depth_um: np.ndarray
    amplitude: np.ndarray
    delta_rad: np.ndarray
    theta_deg: np.ndarray
    phase_rad: np.ndarray

    def __post_init__(self) -> None:
        arrays = np.broadcast_arrays(
            *(np.asarray(getattr(self, f), dtype=np.float64) for f in self._fields())
        )
        if arrays[0].ndim != 3:
            raise ValueError("sample arrays must be (B, A, M)")
        for name, arr in zip(self._fields(), arrays, strict=True):
            setattr(self, name, np.array(arr))

    @staticmethod
    def _fields() -> tuple[str, ...]:
        return ("depth_um", "amplitude", "delta_rad", "theta_deg", "phase_rad")

    @property
    def blines(self) -> int:
        return self.depth_um.shape[0]

    @property
    def alines(self) -> int:
        return self.depth_um.shape[1]

    @classmethod
    def from_reflectors(cls, per_aline: Sequence[Sequence[Sequence[Reflector]]]) -> Sample:
        """Build from ``per_aline[b][a]`` = list of reflectors (lists may differ in length)."""
        nb, na = len(per_aline), len(per_aline[0])
        m = max(len(refl) for row in per_aline for refl in row)
        out = {f: np.zeros((nb, na, m)) for f in cls._fields()}
        for b, row in enumerate(per_aline):
            for a, refl in enumerate(row):
                for i, r in enumerate(refl):
                    for f in cls._fields():
                        out[f][b, a, i] = getattr(r, f)
        return cls(**out)


def channel_amplitudes(
    sample: Sample, axis_ref_deg: float = AXIS_REF_DEG
) -> tuple[np.ndarray, np.ndarray]:
    """Complex channel amplitudes (B, A, M): ``A1 = r sin(delta) e^{i(phase + 2(theta -
    axis_ref))}``, ``A2 = r cos(delta) e^{i phase}`` (see the module docstring)."""
    common = np.exp(1j * sample.phase_rad)
    diff = np.exp(2j * np.deg2rad(sample.theta_deg - axis_ref_deg))
    a1 = sample.amplitude * np.sin(sample.delta_rad) * common * diff
    a2 = sample.amplitude * np.cos(sample.delta_rad) * common
    return a1, a2


def antithetic(sample: Sample) -> Sample:
    """Make odd A-lines copies of the even A-line before them with every phase shifted by pi.

    The toolbox subtracts the mean (reference) and then the median (DC) over the A-lines of a
    B-line. On a small tile those estimates pick up the sample's own fringes and distort depth
    profiles and polarisation (the median is nonlinear: several degrees at A = 16). With
    antithetic pairs, every fringe value has its negative in the same B-line, so both estimates
    are exactly zero and the chain stays linear (up to noise).
    """
    if sample.alines % 2:
        raise ValueError("antithetic pairs need an even number of A-lines")
    arrays = {f: getattr(sample, f).copy() for f in Sample._fields()}
    for f, arr in arrays.items():
        arr[:, 1::2] = arr[:, 0::2] + (np.pi if f == "phase_rad" else 0.0)
    return Sample(**arrays)


def two_reflector_sample(
    alines: int,
    blines: int,
    z0_um: float | np.ndarray,
    dz_um: float,
    *,
    delta_rad: float | np.ndarray,
    theta_deg: float | np.ndarray,
    tilt_um_per_aline: float = 0.0,
    amp_surface: float = 600.0,
    amp_deep: float = 60.0,
    pairs: bool = True,
    rng: np.random.Generator | None = None,
) -> Sample:
    """Every A-line: a surface reflector at ``z0 + a*tilt`` (delta 0) and a deeper one ``dz``
    below it with the given (delta, theta); ``z0``, ``delta_rad``, ``theta_deg`` are scalars
    or (B, A) arrays. Phases are random; with ``pairs`` the tile is made ``antithetic`` (odd
    A-lines copy the even ones, so give per-A-line values in equal adjacent pairs).
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    shape = (blines, alines)
    z0 = np.broadcast_to(z0_um, shape) + tilt_um_per_aline * np.arange(alines)[None, :]
    depth = np.stack([z0, z0 + dz_um], axis=-1)
    amp = np.stack([np.full(shape, amp_surface), np.full(shape, amp_deep)], axis=-1)
    delta = np.stack([np.zeros(shape), np.broadcast_to(delta_rad, shape)], axis=-1)
    theta = np.stack([np.zeros(shape), np.broadcast_to(theta_deg, shape)], axis=-1)
    phase = rng.uniform(-np.pi, np.pi, size=(*shape, 2))
    sample = Sample(depth, amp, delta, theta, phase)
    return antithetic(sample) if pairs else sample


def birefringent_slab_sample(
    alines: int,
    blines: int,
    z0_um: float,
    thickness_um: float,
    *,
    delta_per_um: float,
    theta_deg: float = 30.0,
    n_scatterers: int = 60,
    amp_surface: float = 200.0,
    amp_scatter: float = 15.0,
    pairs: bool = True,
    rng: np.random.Generator | None = None,
) -> Sample:
    """A flat surface reflector at ``z0`` (delta 0) over a uniform birefringent slab: random
    scatterers in [z0, z0 + thickness] with retardance ``delta_per_um * (z - z0)`` (rad) and
    a common axis. Speckle: Rayleigh amplitudes, uniform phases; ``pairs``: see ``antithetic``.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    shape = (blines, alines, n_scatterers)
    z = z0_um + thickness_um * rng.uniform(0.02, 1.0, size=shape)
    amp = amp_scatter * rng.rayleigh(1.0, size=shape) / np.sqrt(np.pi / 2)
    surf = np.full((blines, alines, 1), z0_um)
    sample = Sample(
        depth_um=np.concatenate([surf, z], axis=-1),
        amplitude=np.concatenate([np.full_like(surf, amp_surface), amp], axis=-1),
        delta_rad=np.concatenate([np.zeros_like(surf), delta_per_um * (z - z0_um)], axis=-1),
        theta_deg=np.full((blines, alines, n_scatterers + 1), theta_deg),
        phase_rad=rng.uniform(-np.pi, np.pi, size=(blines, alines, n_scatterers + 1)),
    )
    return antithetic(sample) if pairs else sample


# --------------------------------------------------------------------------- acquisition


def simulate_raw(
    spec: Spectrometer,
    sample: Sample,
    *,
    dispersion: tuple[float, float] = (0.0, 0.0),
    dc_counts: float | tuple[float, float] = 1500.0,
    dark_counts: float = 100.0,
    noise_std: float = 2.0,
    rng: np.random.Generator | None = None,
    source_fwhm_fraction: float = 0.4,
    axis_ref_deg: float = AXIS_REF_DEG,
    max_count: int = 65535,
) -> np.ndarray:
    """Camera counts ``uint16[B, 2, A, S]`` for ``sample`` (its shape gives B and A).

    Per stored pixel of channel c at its true k: ``dark + S(k) * (dc + sum 2|A| cos(2kz +
    arg A + phi_disp(k)))`` plus Gaussian noise, rounded and clipped to [0, max_count]. S is a
    Gaussian in k centred on ``spec.kc_per_um`` with FWHM ``source_fwhm_fraction`` of the band
    (a narrow enough source keeps the PSF sidelobes of a bright surface off deeper reflectors).
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    a2, a3 = dispersion
    dcs = (dc_counts, dc_counts) if np.isscalar(dc_counts) else tuple(dc_counts)
    amps = channel_amplitudes(sample, axis_ref_deg)
    nb, na, m = sample.depth_um.shape
    out = np.empty((nb, 2, na, spec.n), dtype=np.uint16)
    for c in (1, 2):
        k = spec.k_per_um(c)
        fwhm = source_fwhm_fraction * (k.max() - k.min())
        source = np.exp(-4 * np.log(2) * ((k - spec.kc_per_um) / fwhm) ** 2)
        carrier = np.exp(1j * dispersion_phase(k, spec.kc_per_um, a2, a3))
        fringe = np.zeros((nb, na, spec.n), dtype=np.complex128)
        for i in range(m):
            amp = amps[c - 1][..., i, None]  # (B, A, 1)
            z = sample.depth_um[..., i, None]
            fringe += 2 * amp * np.exp(2j * k * z)
        intensity = dark_counts + source * (dcs[c - 1] + (fringe * carrier).real)
        if noise_std > 0:
            intensity = intensity + rng.normal(0.0, noise_std, size=intensity.shape)
        out[:, c - 1] = np.clip(np.rint(intensity), 0, max_count).astype(np.uint16)
    return out


def _nifti1_header(dims: Sequence[int], datatype: int, bitpix: int) -> bytes:
    """NIfTI-1 single-file header (348 bytes) + 4 zero extension bytes; vox_offset 352."""
    hdr = bytearray(348)
    struct.pack_into("<i", hdr, 0, 348)  # sizeof_hdr
    struct.pack_into("<8h", hdr, 40, len(dims), *dims, *([1] * (7 - len(dims))))  # dim
    struct.pack_into("<hh", hdr, 70, datatype, bitpix)
    struct.pack_into("<8f", hdr, 76, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)  # pixdim
    struct.pack_into("<f", hdr, 108, 352.0)  # vox_offset
    struct.pack_into("<4s", hdr, 344, b"n+1\0")  # magic
    return bytes(hdr) + bytes(4)


def write_spectral_nifti(path: str | Path, raw_BCAS: np.ndarray) -> None:
    """Write the instrument's ``nifti-spectral`` file: header, then uint16 (S, A, 2, B)
    column-major (= C order of [B, 2, A, S]); dim = [4, S, A, 2, B], datatype 512."""
    raw = np.ascontiguousarray(raw_BCAS, dtype="<u2")
    nb, nc, na, ns = raw.shape
    Path(path).write_bytes(_nifti1_header((ns, na, nc, nb), 512, 16) + raw.tobytes())


def write_raw12(path: str | Path, raw_BCAS: np.ndarray) -> None:
    """Write the 12-bit ``.raw`` file: no header, two samples in three bytes per the toolbox's
    ``unpack12bits``: b0 = s0 low 8 bits; b1 = s0 high 4 bits | s1 low 4 bits << 4;
    b2 = s1 high 8 bits."""
    s = np.ascontiguousarray(raw_BCAS, dtype=np.uint16).ravel()
    if s.size % 2:
        raise ValueError("12-bit packing needs an even number of samples")
    if s.max(initial=0) > 0x0FFF:
        raise ValueError("sample exceeds 12 bits")
    s0, s1 = s[0::2], s[1::2]
    packed = np.empty((s0.size, 3), dtype=np.uint8)
    packed[:, 0] = s0 & 0xFF
    packed[:, 1] = (s0 >> 8) | ((s1 & 0x0F) << 4)
    packed[:, 2] = s1 >> 4
    Path(path).write_bytes(packed.tobytes())
