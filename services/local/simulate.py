"""A realistic simulated acquisition with known ground truth (`tilepipe simulate`).

The sample is a smooth, deterministic 3-D phantom evaluated at any lateral position: a surface,
two tissue layers with different birefringence, a band-limited reflectivity texture that
changes from section to section, and an optic-axis orientation field. Each slice is the
section at its depth, shifted and rotated by a small known amount (what registration must
recover). Tiles are cut at jittered stage positions (what stitching must recover) and turned
into raw spectral interferograms by `kernels.forward` (true non-linear k, Gaussian source,
2nd/3rd-order dispersion, DC and fixed pattern, noise, uint16), then written to the raw root
the way the microscope writes them: chunk by chunk, optionally slowly, at a given tile rate.

The instrument (:class:`Instrument`) is described by its own physics, not by the processor's
calibration: true per-channel wavelengths with channel 2 stored in reverse pixel order and a
slight non-linearity, the physical fringe cos(2kz + ...), a dispersion mismatch and the axis
relation of the lab's system. What the processor gets is what the lab has: a ``wave-pixel.mat``
of calibration points, the float64 dispersion file measured on the toolbox's k grid, and file
names as the microscope writes them (``mosaic_001_image_0001_spectral_0001.nii``).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from kernels.calibration import SpectrometerCalibration
from kernels.forward import ps_amplitudes, simulate_spectra
from kernels.optic_axis import project
from kernels.spectral import spectra_to_complex
from messages.events import TileCoord
from services.core.errors import ManifestError
from services.core.manifest import (
    Calibration,
    Lattice,
    Manifest,
    MosaicSpec,
    Numbering,
    Processing,
    RawLayout,
    dump_manifest,
    load_manifest,
)
from services.io.atomic import atomic_file, fsync_file, write_atomically
from services.io.rawio import encode_tile, write_tiff

TRUTH_NAME = "ground_truth.json"
# a tilted view (PhantomParams.tilted_affine): 3 % longer along the tilt (x), a little shear,
# and shifted by about the en-face depth x tan(-15 deg) (-67 um in x)
TILTED_VIEW = (1.0, 0.0, 0.006, 1.03, -25.0, -67.0)
SIM_MASK_DB = {"normal": 45.0, "tilted": 40.0}  # mask thresholds for the simulated instrument
CALIBRATION_MAT = "calibration/wave-pixel.mat"
DISPERSION_FILE = "calibration/dispersion.dat"


@dataclass(frozen=True)
class Instrument:
    """The simulated microscope's physics (what tilepipe's processing must not assume).

    Wavelengths in nm over ``samples`` camera pixels: channel 1 runs ``start_nm`` ->
    ``stop_nm`` bowed by ``bow_nm`` at mid-band; channel 2 is the same spectrometer shifted by
    ``ch2_shift_nm`` and stored backwards. Dispersion mismatch (a2 [rad um^2], a3 [rad um^3])
    about the band centre. Axis relation: arg J1 - arg J2 = 2*(theta - axis_offset_deg).
    """

    samples: int = 2048
    start_nm: float = 1195.0
    stop_nm: float = 1405.0
    bow_nm: float = 0.3
    ch2_shift_nm: float = 0.6
    dispersion: tuple[float, float] = (-40.0, 15.0)
    axis_offset_deg: float = 100.0
    calibration_points: int = 14

    def wavelengths_nm(self, channel: int) -> np.ndarray:
        """True wavelength of every stored pixel of channel 0 or 1."""
        u = np.linspace(0.0, 1.0, self.samples)
        lam = self.start_nm + (self.stop_nm - self.start_nm) * u + 4 * self.bow_nm * u * (1 - u)
        return lam if channel == 0 else (lam + self.ch2_shift_nm)[::-1]

    def truth_calibration(self):
        """A kernel calibration holding the exact wavelengths (for the forward model only)."""

        p = np.arange(self.samples, dtype=np.float64)
        polys = [
            tuple(np.polynomial.polynomial.polyfit(p, self.wavelengths_nm(ch), 2)) for ch in (0, 1)
        ]
        return SpectrometerCalibration(
            n_samples=self.samples,
            wavelength_poly_nm=polys[0],
            wavelength_poly_nm_ch2=polys[1],
            dispersion_coeffs=self.dispersion,
        )

    def wave_pixel(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu [N, 2], wave_prime [N]) as the lab measures them: the 1-based pixel positions of
        known wavelengths, channel 2 counted after flipping it (psoct-toolbox's convention)."""
        lam1, lam2 = self.wavelengths_nm(0), self.wavelengths_nm(1)[::-1]
        lo, hi = max(lam1[0], lam2[0]), min(lam1[-1], lam2[-1])
        wave = np.linspace(lo + 2.0, hi - 2.0, self.calibration_points)
        pixels = np.arange(1, self.samples + 1, dtype=np.float64)
        mu = np.stack([np.interp(wave, lam1, pixels), np.interp(wave, lam2, pixels)], axis=1)
        return mu, wave

    def dispersion_file_values(self) -> np.ndarray:
        """What the lab's dispersion file holds for this mismatch: -phi(k_j) on the toolbox's
        k grid (the linear fits of :meth:`wave_pixel`, the channels' overlap, descending k)."""
        mu, wave = self.wave_pixel()
        pixels = np.arange(1, self.samples + 1, dtype=np.float64)
        lam = [np.polyval(np.polyfit(mu[:, ch], wave, 1), pixels) for ch in (0, 1)]
        k_max = 2 * np.pi / (max(lam[0][0], lam[1][0]) * 1e-3)
        k_min = 2 * np.pi / (min(lam[0][-1], lam[1][-1]) * 1e-3)
        k = np.linspace(k_max, k_min, self.samples)
        kc = self.truth_calibration().k_center
        a2, a3 = self.dispersion
        return -(a2 * (k - kc) ** 2 + a3 * (k - kc) ** 3)

    def write_calibration(self, acq_dir: Path) -> None:
        """``calibration/wave-pixel.mat`` (MATLAB v5) and ``calibration/dispersion.dat``
        (raw little-endian float64), as the lab keeps them."""
        import scipy.io

        mu, wave = self.wave_pixel()
        (acq_dir / "calibration").mkdir(parents=True, exist_ok=True)
        with atomic_file(acq_dir / CALIBRATION_MAT) as tmp:
            scipy.io.savemat(tmp, {"mu": mu, "wave_prime": wave[:, None]}, appendmat=False)
        values = self.dispersion_file_values().astype("<f8")
        write_atomically(acq_dir / DISPERSION_FILE, values.tobytes())


@dataclass(frozen=True)
class PhantomParams:
    """Ground-truth sample parameters (lengths in um, angles in degrees)."""

    seed: int = 7
    surface_um: float = 180.0
    surface_relief_um: float = 40.0
    layer_um: float = 160.0
    layer_relief_um: float = 40.0
    # round-trip retardance per um of depth, upper and lower layer (rad/um)
    birefringence: tuple[float, float] = (0.0040, 0.0012)
    scatterers: int = 20
    scatterer_spacing_um: float = 18.0
    amplitude_counts: float = 20.0  # about 40 dB above the noise floor at the surface
    attenuation_um: float = 400.0
    max_shift_um: float = 30.0
    max_rotation_deg: float = 1.5
    # the 3-D fibre field (issue 21): inclination of the optic axis out of the section plane
    # (amplitude, deg: |alpha| < this), and the log-amplitude of the fibre texture that
    # modulates delta-n at 150..500 um (what the thru-plane registration matches)
    inclination_deg: float = 45.0
    birefringence_texture: float = 0.35
    # what the tilted beam sees of the sample, relative to the normal beam: sample (y, x) =
    # A (y, x) + b for a point the stage puts at (y, x) (um), A row-major (a_yy, a_yx, a_xy,
    # a_xx), then b (um); the tilted->normal registration must recover it. Default: the same
    # view (TILTED_VIEW is a realistic one: stretched along the tilt, shifted by the en-face
    # depth x tan(gamma))
    tilted_affine: tuple[float, float, float, float, float, float] = (1.0, 0.0, 0.0, 1.0, 0, 0)
    # a hole in the tissue (centre y, x and radius in um, sample frame): agarose only, 30 dB
    # less reflective and not birefringent (what the masks must leave out); None: no hole
    void_um: tuple[float, float, float] | None = None


class Phantom:
    """Smooth random fields evaluated at lateral positions (x, y in um) and section index."""

    def __init__(self, params: PhantomParams, extent_um: float) -> None:
        self.p = params
        rng = np.random.default_rng(params.seed)

        def field(n: int, fmin: float, fmax: float) -> tuple[np.ndarray, ...]:
            freq = rng.uniform(fmin, fmax, n)
            angle = rng.uniform(0, 2 * math.pi, n)
            return (
                freq * np.cos(angle),
                freq * np.sin(angle),
                rng.uniform(0, 2 * math.pi, n),
                rng.uniform(0.5, 1.0, n),
                rng.uniform(-1, 1, n),
            )

        big = max(extent_um, 1.0)
        self.texture = field(96, 1 / 150.0, 1 / 25.0)
        self.smooth = field(6, 0.5 / big, 2.0 / big)
        self.layer = field(6, 0.5 / big, 2.0 / big)
        self.axis = field(5, 0.3 / big, 1.5 / big)
        self.bire = field(5, 0.3 / big, 1.5 / big)
        # drawn after the fields above, so that those keep their values
        self.incl = field(5, 0.3 / big, 1.5 / big)
        self.fibre = field(48, 1 / 500.0, 1 / 150.0)

    @staticmethod
    def _eval(
        comp: tuple[np.ndarray, ...], x: np.ndarray, y: np.ndarray, section: float = 0.0
    ) -> np.ndarray:
        fx, fy, phase, amp, drift = comp
        out = np.zeros(np.broadcast_shapes(x.shape, y.shape))
        for k in range(fx.size):
            out += amp[k] * np.cos(
                2 * math.pi * (fx[k] * x + fy[k] * y) + phase[k] + 0.6 * drift[k] * section
            )
        return out / math.sqrt(0.5 * float(np.sum(amp**2)))

    def surface_um(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return self.p.surface_um + self.p.surface_relief_um * np.tanh(
            0.5 * self._eval(self.smooth, x, y)
        )

    def layer_um(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return self.p.layer_um + self.p.layer_relief_um * np.tanh(
            0.5 * self._eval(self.layer, x, y)
        )

    def reflectivity(self, x: np.ndarray, y: np.ndarray, section: int) -> np.ndarray:
        """Positive texture (about 0.2..3), different but correlated from section to section."""
        return np.exp(0.55 * self._eval(self.texture, x, y, section))

    def orientation_deg(self, x: np.ndarray, y: np.ndarray, section: int) -> np.ndarray:
        """In-plane orientation of the optic axis in [-90, 90), as the instrument reports it
        for the normal beam (the toolbox's `ori`; the model frame's azimuth is its negative,
        :mod:`kernels.optic_axis`)."""
        theta = 70.0 * np.tanh(self._eval(self.axis, x, y, section)) + 25.0 * section
        return (theta + 90.0) % 180.0 - 90.0

    def azimuth_deg(self, x: np.ndarray, y: np.ndarray, section: int) -> np.ndarray:
        """Azimuth of the 3-D optic axis in the model frame of :mod:`kernels.optic_axis`
        (from +x towards +y, [-90, 90)): the negated normal-beam orientation."""
        return (90.0 - self.orientation_deg(x, y, section)) % 180.0 - 90.0

    def inclination_deg(self, x: np.ndarray, y: np.ndarray, section: int) -> np.ndarray:
        """Elevation of the optic axis out of the section plane [deg], towards +z (the normal
        beam), for the representative with a non-negative x component."""
        return self.p.inclination_deg * np.tanh(self._eval(self.incl, x, y, section))

    def tissue(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """1 in tissue, 0 in the void (``void_um``)."""
        if self.p.void_um is None:
            return np.ones(np.broadcast_shapes(x.shape, y.shape))
        cy, cx, r = self.p.void_um
        return ((x - cx) ** 2 + (y - cy) ** 2 > r * r).astype(np.float64)

    def birefringence(
        self, x: np.ndarray, y: np.ndarray, section: int = 0
    ) -> tuple[np.ndarray, np.ndarray]:
        """True round-trip retardance slope (rad/um) of the upper and lower layer: what a beam
        perpendicular to the optic axis sees (a beam k sees it times 1 - (u.k)^2), modulated
        by the fibre texture."""
        mod = 1.0 + 0.25 * np.tanh(self._eval(self.bire, x, y))
        if self.p.birefringence_texture:
            mod = mod * np.exp(self.p.birefringence_texture * self._eval(self.fibre, x, y, section))
        mod = mod * self.tissue(x, y)
        return self.p.birefringence[0] * mod, self.p.birefringence[1] * mod

    def slice_transform(self, section: int) -> tuple[float, float, float]:
        """Known (dy_um, dx_um, rotation_deg) of section `section` relative to section 0."""
        if section == 0:
            return 0.0, 0.0, 0.0
        rng = np.random.default_rng(self.p.seed * 1000 + section)
        dy, dx = rng.uniform(-1, 1, 2) * self.p.max_shift_um
        return float(dy), float(dx), float(rng.uniform(-1, 1) * self.p.max_rotation_deg)


@dataclass
class TileTruth:
    slice: int
    mosaic: int
    row: int
    col: int
    index: int
    y_px: float
    x_px: float
    nominal_y_px: float
    nominal_x_px: float


@dataclass
class Truth:
    """The ground-truth sidecar: everything tests and benchmarks check against."""

    acq: str
    pixel_size_um: float
    dispersion: tuple[float, float]
    phantom: dict
    slices: list[dict] = field(default_factory=list)
    tiles: list[TileTruth] = field(default_factory=list)
    instrument: dict = field(default_factory=dict)
    # per mosaic: illumination, tilt and `to_normal`, the 3x3 (y, x, 1) map from its stage
    # pixels to mosaic 0's stage pixels showing the same sample point
    views: list[dict] = field(default_factory=list)

    def tile(self, coord: TileCoord) -> TileTruth:
        for t in self.tiles:
            if (t.slice, t.mosaic, t.row, t.col) == (
                coord.slice,
                coord.mosaic,
                coord.row,
                coord.col,
            ):
                return t
        raise KeyError(coord)

    @staticmethod
    def load(path: Path) -> Truth:
        data = json.loads(Path(path).read_text())
        data["tiles"] = [TileTruth(**t) for t in data["tiles"]]
        return Truth(**data)


class Simulator:
    """Generates the raw tiles of one manifest's acquisition."""

    def __init__(
        self,
        manifest: Manifest,
        params: PhantomParams | None = None,
        jitter_px: float = 3.0,
        noise_std: float = 2.0,
        low_texture: frozenset[tuple[int, int, int, int]] = frozenset(),
        low_texture_contrast: float = 0.15,
    ) -> None:
        self.manifest = manifest
        self.params = params or PhantomParams()
        self.instrument = Instrument(samples=manifest.raw.samples)
        self.cal = self.instrument.truth_calibration()
        lat = manifest.lattice
        extent = lat.pixel_size_um * max(
            max(g.rows * g.raw.bscans, g.cols * g.raw.alines)
            for g in map(manifest.geometry, range(lat.mosaics))
        )
        self.phantom = Phantom(self.params, extent)
        self.jitter_px = jitter_px
        self.noise_std = noise_std
        self.low_texture = low_texture  # (slice, mosaic, row, col) of nearly flat tiles
        self.low_texture_contrast = low_texture_contrast
        self.truth = self._truth()

    def _truth(self) -> Truth:
        m = self.manifest
        rng = np.random.default_rng(self.params.seed + 17)
        tiles = []
        for coord in m.coords():
            ny, nx = m.geometry(coord.mosaic).nominal_position_px(coord.row, coord.col)
            jy, jx = rng.uniform(-1, 1, 2) * self.jitter_px
            tiles.append(
                TileTruth(
                    coord.slice,
                    coord.mosaic,
                    coord.row,
                    coord.col,
                    coord.index or 0,
                    ny + jy,
                    nx + jx,
                    ny,
                    nx,
                )
            )
        slices = []
        for s in range(m.lattice.slices):
            dy, dx, rot = self.phantom.slice_transform(s)
            slices.append(
                {
                    "slice": s,
                    "dy_um": dy,
                    "dx_um": dx,
                    "rotation_deg": rot,
                    "dy_px": dy / m.lattice.pixel_size_um,
                    "dx_px": dx / m.lattice.pixel_size_um,
                }
            )
        return Truth(
            m.id,
            m.lattice.pixel_size_um,
            self.instrument.dispersion,
            asdict(self.params),
            slices,
            tiles,
            instrument=asdict(self.instrument),
            views=[
                {
                    "mosaic": g.index,
                    "illumination": g.illumination,
                    "tilt_deg": g.tilt_deg,
                    "to_normal": self.tilted_matrix(g.index).tolist(),
                }
                for g in map(m.geometry, range(m.lattice.mosaics))
            ],
        )

    def sample_coords(self, t: TileTruth) -> tuple[np.ndarray, np.ndarray]:
        """Sample-frame (x, y) in um of every A-line of a tile, shape [B, A]."""
        m = self.manifest
        px = m.lattice.pixel_size_um
        raw = m.geometry(t.mosaic).raw
        b = np.arange(raw.bscans)[:, None]
        a = np.arange(raw.alines)[None, :]
        y = (t.y_px + b) * px + m.lattice.stage_origin_um[0]
        x = (t.x_px + a) * px + m.lattice.stage_origin_um[1]
        if self.tilt_deg(t.mosaic) != 0.0:  # the tilted beam's view (PhantomParams.tilted_affine)
            ayy, ayx, axy, axx, by, bx = self.params.tilted_affine
            y, x = ayy * y + ayx * x + by, axy * y + axx * x + bx
        s = self.truth.slices[t.slice]
        rot = math.radians(s["rotation_deg"])
        xs = math.cos(rot) * x - math.sin(rot) * y + s["dx_um"]
        ys = math.sin(rot) * x + math.cos(rot) * y + s["dy_um"]
        return xs, ys

    def delta_n_per_slope(self) -> float:
        """Delta-n (the processing's units) of a retardance slope of 1 rad per um of the
        phantom's depth: lambda / (2 pi) times the tissue's index, which the manifest's
        axial pixel implies (the instrument's optical path per bin / ``axial_pixel_um``)."""
        cal = self.cal
        optical_um_per_bin = math.pi / (cal.n_samples * cal.k_step)
        index = optical_um_per_bin / self.manifest.lattice.axial_pixel_um
        return self.manifest.calibration.center_wavelength_um / (2 * math.pi) * index

    def tilt_deg(self, mosaic: int) -> float:
        """The beam's tilt of a mosaic (0: normal illumination)."""
        return float(self.manifest.geometry(mosaic).tilt_deg)

    def tilted_matrix(self, tilted: int) -> np.ndarray:
        """3x3 ``(y, x, 1)`` map from the tilted mosaic's stage pixels to the normal mosaic's
        stage pixels that show the same sample point (before any stitching offset)."""
        ayy, ayx, axy, axx, by, bx = self.params.tilted_affine
        px = self.manifest.lattice.pixel_size_um
        oy, ox = self.manifest.lattice.stage_origin_um
        lin = np.array([[ayy, ayx], [axy, axx]])
        origin = np.array([oy, ox])
        shift = (lin @ origin + np.array([by, bx]) - origin) / px
        out = np.eye(3)
        out[:2, :2] = lin
        out[:2, 2] = shift
        return out if self.tilt_deg(tilted) != 0.0 else np.eye(3)

    def tile_fields(self, t: TileTruth) -> dict[str, np.ndarray]:
        """Ground-truth maps of a tile ([B, A]): surface, layer, reflectivity, the 3-D axis
        (azimuth, inclination, true slopes) and what this tile's beam sees of it (orientation
        as the instrument reports it, apparent slopes)."""

        x, y = self.sample_coords(t)
        flat = (t.slice, t.mosaic, t.row, t.col) in self.low_texture
        contrast = self.low_texture_contrast if flat else 1.0
        upper, lower = self.phantom.birefringence(x, y, t.slice)
        azimuth = self.phantom.azimuth_deg(x, y, t.slice)
        inclination = self.phantom.inclination_deg(x, y, t.slice)
        tilt = self.tilt_deg(t.mosaic)
        # what the beam sees: delta-n times 1 - (u.k)^2 and the projected axis; the
        # instrument reports the negated model-frame orientation (the toolbox's `ori`)
        views = project(azimuth, inclination, np.ones_like(azimuth), tilt or -15.0)
        seen = views[1] if tilt else views[0]
        tissue = self.phantom.tissue(x, y)
        reflectivity = self.phantom.reflectivity(x, y, t.slice) ** contrast
        return {
            "surface_um": self.phantom.surface_um(x, y),
            "layer_um": self.phantom.layer_um(x, y),
            "reflectivity": reflectivity * (tissue + (1.0 - tissue) * 10**-1.5),
            "orientation_deg": (90.0 - seen.orientation_deg) % 180.0 - 90.0,
            "birefringence_upper": upper * seen.birefringence,
            "birefringence_lower": lower * seen.birefringence,
            "azimuth_deg": azimuth,
            "inclination_deg": inclination,
            "true_birefringence_upper": upper,
            "true_birefringence_lower": lower,
            "tissue": tissue,
        }

    def tile_raw(self, t: TileTruth) -> np.ndarray:
        """Raw spectra `uint16[B, 2, A, S]` of a tile."""

        p = self.params
        f = self.tile_fields(t)
        j = np.arange(p.scatterers)
        rng = np.random.default_rng(hash((p.seed, t.slice, t.mosaic, t.row, t.col)) % 2**32)
        rel = j * p.scatterer_spacing_um + rng.uniform(
            0, 0.5 * p.scatterer_spacing_um, (*f["surface_um"].shape, p.scatterers)
        )
        rel[..., 0] = 0.0  # the first reflector is the tissue surface itself
        depth = f["surface_um"][..., None] + rel
        layer = f["layer_um"][..., None]
        upper, lower = f["birefringence_upper"][..., None], f["birefringence_lower"][..., None]
        retardance = np.where(rel < layer, upper * rel, upper * layer + lower * (rel - layer))
        speckle = rng.uniform(0.6, 1.4, depth.shape)
        refl = (
            p.amplitude_counts
            * f["reflectivity"][..., None]
            * speckle
            * np.exp(-rel / p.attenuation_um)
        )
        amps = ps_amplitudes(
            refl,
            retardance,
            np.radians(f["orientation_deg"])[..., None],
            common_phase_rad=rng.uniform(0, 2 * math.pi, depth.shape),
            axis_relation=(1, self.instrument.axis_offset_deg),
        )
        # a 12-bit camera sees the same light on a 16x smaller scale
        scale = 4095 / 65535 if self.manifest.raw.format == "raw12" else 1.0  # same for all
        raw = simulate_spectra(
            depth,
            amps * scale,
            self.cal,
            reference_counts=20000.0 * scale,
            fixed_pattern_counts=300.0 * scale,
            noise_std=self.noise_std * scale,
            rng=rng.integers(2**31),
            carrier_sign=1,
        )
        if not self.manifest.raw.complex:
            return raw
        return self.acquisition_pc_complex(raw)

    def acquisition_pc_complex(self, raw: np.ndarray) -> np.ndarray:
        """What the acquisition PC saves with ``tile_saving_type = complex``: the spectral step
        of the lab's chain (all FFT bins from the autocorrelation cut, no depth flip), as
        ``complex64[B, 2, A, Z]`` in tilepipe's convention (``encode_tile`` writes the file)."""

        cal = self.manifest.spectrometer().replace(depth_range=None, flip_z=False)
        return spectra_to_complex(raw, cal)

    def write_truth(self, acq_dir: Path) -> Path:
        data = asdict(self.truth)
        return write_atomically(acq_dir / TRUTH_NAME, json.dumps(data, indent=1))


def write_tile_file(
    path: Path,
    payload: bytes,
    chunk_bytes: int = 8 << 20,
    chunk_delay_s: float = 0.0,
    rename: bool = False,
) -> None:
    """Write a tile as the microscope does: chunk by chunk (optionally slowly), either in place
    under its final name or under a temporary name renamed into place at the end."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if rename:
        with atomic_file(path) as tmp:
            _write_chunks(tmp, payload, chunk_bytes, chunk_delay_s)
    else:
        _write_chunks(path, payload, chunk_bytes, chunk_delay_s)
        fsync_file(path)


def _write_chunks(path: Path, payload: bytes, chunk_bytes: int, chunk_delay_s: float) -> None:
    with open(path, "wb") as fh:
        for start in range(0, len(payload), chunk_bytes):
            fh.write(payload[start : start + chunk_bytes])
            fh.flush()
            if chunk_delay_s:
                time.sleep(chunk_delay_s)


def simulate(
    manifest_path: Path,
    manifest: Manifest,
    rate: float,
    *,
    chunk_bytes: int = 8 << 20,
    chunk_delay_s: float = 0.0,
    rename: bool = False,
    params: PhantomParams | None = None,
    jitter_px: float = 3.0,
    only: Callable[[TileCoord], bool] | None = None,
    low_texture: frozenset[tuple[int, int, int, int]] = frozenset(),
    progress: Callable[[int, int, TileCoord], None] | None = None,
) -> Truth:
    """Write every tile of the acquisition at `rate` tiles/s (0: as fast as possible)."""

    sim = Simulator(manifest, params, jitter_px=jitter_px, low_texture=low_texture)
    acq_dir = Path(manifest_path).parent
    sim.write_truth(acq_dir)
    coords = [c for c in manifest.coords() if only is None or only(c)]
    start = time.monotonic()
    for i, coord in enumerate(coords):
        if rate > 0:
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        data = sim.tile_raw(sim.truth.tile(coord))
        path = acq_dir / manifest.path_of(coord)
        payload = encode_tile(data, manifest.geometry(coord.mosaic).raw)
        if payload is None:
            with atomic_file(path) as tmp:
                write_tiff(tmp, data)
        else:
            write_tile_file(path, payload, chunk_bytes, chunk_delay_s, rename)
        if progress is not None:
            progress(i + 1, len(coords), coord)
    return sim.truth


def small_manifest(
    acq: str,
    slices: int = 2,
    rows: int = 3,
    cols: int = 3,
    alines: int = 64,
    bscans: int = 64,
    samples: int = 512,
    overlap: float = 0.2,
    raw_format: str = "nifti-spectral",
    settle_s: float = 0.5,
    mosaics: int = 1,
    tilted_cols: int | None = None,
) -> Manifest:
    """A small acquisition laid out as the instrument writes it (tests, the demo).

    Names ``mosaic_%03d_image_%04d_spectral_%04d.nii`` (``.raw`` for raw12,
    ``_processed.nii`` for complex tiles), numbers from 1, mosaics counted through the
    acquisition, the column snake grid, the lab's calibration files (written by
    :func:`write_manifest`) and psoct-toolbox conventions. ``mosaics`` = 2 adds the tilted
    illumination with half the A-lines (and ``tilted_cols`` columns, default ``cols``).
    """
    if mosaics not in (1, 2):
        raise ValueError("mosaics: 1 (normal) or 2 (normal and tilted)")
    suffix = {
        "nifti-spectral": "spectral_{counter:04d}.nii",
        "raw12": "spectral_{counter:04d}.raw",
        "tiff": "spectral_{counter:04d}.tif",
        "nifti-complex": "processed.nii",
    }[raw_format]
    # the simulated instrument's dB scale sits ~20 dB below the lab's (tissue AIP ~50-65 dB,
    # no tissue ~35 dB), so its masks use 45 / 40 dB where the lab's use 60 / 55
    specs = [MosaicSpec(illumination="normal", mask_threshold_db=SIM_MASK_DB["normal"])]
    if mosaics == 2:
        specs.append(
            MosaicSpec(
                illumination="tilted",
                tilt_deg=-15.0,
                alines=max(1, alines // 2),
                cols=tilted_cols,
                mask_threshold_db=SIM_MASK_DB["tilted"],
            )
        )
    return Manifest(
        id=acq,
        lattice=Lattice(
            slices=slices,
            mosaics=mosaics,
            rows=rows,
            cols=cols,
            scan_order="snake-by-columns-up-right",
            overlap=overlap,
            pixel_size_um=10.0,
        ),
        mosaic=specs,
        numbering=Numbering(base=1, mosaic="global"),
        pattern="mosaic_{mosaic:03d}_image_{index:04d}_" + suffix,
        raw=RawLayout(format=raw_format, samples=samples, alines=alines, bscans=bscans),
        calibration=Calibration(wave_pixel_mat=CALIBRATION_MAT, dispersion_file=DISPERSION_FILE),
        processing=Processing(preset="toolbox"),
        settle_s=settle_s,
    )


def write_manifest(manifest: Manifest, acq_dir: Path) -> Path:
    """Write `manifest.toml` into an acquisition directory, with the simulated instrument's
    calibration files when the manifest names them."""
    acq_dir.mkdir(parents=True, exist_ok=True)
    if CALIBRATION_MAT in manifest.calibration.files().values():
        Instrument(samples=manifest.raw.samples).write_calibration(acq_dir)
    return write_atomically(acq_dir / "manifest.toml", dump_manifest(manifest))


def simulate_command(args) -> int:
    """`tilepipe simulate`: write (optionally a new small manifest and) the acquisition."""

    path = Path(args.manifest)
    if args.new:
        acq = path.parent.name or "demo"
        write_manifest(small_manifest(acq), path.parent)
    try:
        manifest = load_manifest(path)
    except ManifestError as exc:
        print(exc, file=sys.stderr)
        return 2
    params = PhantomParams(seed=args.seed, scatterers=args.scatterers)
    limit = args.slices

    def progress(done: int, total: int, coord: TileCoord) -> None:
        print(
            f"\r{manifest.id}: {done}/{total} tiles (slice {coord.slice} r{coord.row} "
            f"c{coord.col})",
            end="" if done < total else "\n",
            flush=True,
        )

    simulate(
        path,
        manifest,
        args.rate,
        chunk_bytes=int(args.chunk_mb * (1 << 20)),
        chunk_delay_s=args.chunk_delay_s,
        rename=args.rename,
        params=params,
        jitter_px=args.jitter_px,
        progress=progress,
        only=(lambda c: c.slice < limit) if limit is not None else None,
    )
    return 0
