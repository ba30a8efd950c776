"""Slice-to-slice registration of en-face mosaics (serial sectioning) and resampling.

Method: (1) a global estimate on a coarse copy (max side ``coarse_size``): Fourier-Mellin
(phase correlation of log-polar magnitude spectra) gives rotation (and scale), then phase
correlation of the rotated image gives the translation; the best of a few candidates by NCC
wins. (2) Intensity-based refinement: Gauss-Newton on band-passed, apodized intensities with
a per-iteration gain/bias fit, coarse to fine over a 2x pyramid down to ``refine_size``.
The quality score is the weighted NCC of the band-passed images over their overlap.

Models: ``rigid`` (rotation + translation; slice to slice), ``similarity`` (+ isotropic
scale) and ``affine`` (6 parameters: the thru-plane registration of the tilted illumination's
mosaic onto the normal one). For ``affine`` the global search is the similarity one and the
Gauss-Newton refinement frees the whole linear part. Band-passing, unit-variance normalisation
and the gain/bias fit make the match insensitive to the images' offset, scale and sign, which
is what two modalities of one texture (e.g. apparent birefringence of two beams) differ by.

Conventions (pixels, NumPy/SciPy on the host):

* Coordinates ``(y, x)`` of an image array, y down (rows), x right (columns); homogeneous
  column vectors ``(y, x, 1)``.
* A registration matrix ``M`` (3x3) maps *moving* pixel coordinates to *fixed* pixel
  coordinates: ``moving[p]`` shows the sample point seen at ``fixed[M p]``.
* ``rotation_deg`` t and ``scale`` s: ``M[:2, :2] = s [[cos t, sin t], [-sin t, cos t]]`` in
  ``(y, x)`` order, i.e. the rotation ``x' = x cos t - y sin t``, ``y' = x sin t + y cos t``
  of :meth:`services.local.simulate.Phantom.slice_transform` (sample = R(t) stage + d). So the
  matrix from slice k's stage pixels to slice 0's is the simulator's transform of slice k:
  rotation ``+t``, translation ``(dy, dx) / pixel`` (plus ``(R - I) origin`` for a stage
  origin other than 0).
* Pixel ``[i, j]`` of a 2^k-downsampled level covers level-0 pixels ``[2^k i, 2^k i + 2^k)``,
  its centre is at ``2^k i + (2^k - 1) / 2`` (as in :mod:`services.io.omezarr`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from scipy import fft as sfft
from scipy import ndimage

__all__ = [
    "Pyramid",
    "RegisterParams",
    "Registration",
    "decompose",
    "halve",
    "register_slices",
    "similarity_matrix",
    "translation_matrix",
    "warp_image",
    "warp_stack",
]


MODELS = ("rigid", "similarity", "affine")


@dataclass(frozen=True)
class RegisterParams:
    """Registration settings (lengths in level-0 pixels unless stated)."""

    # "rigid" (rotation + translation), "similarity" (+ isotropic scale) or "affine" (any
    # linear part: rotation, two scales and shear, e.g. the tilted illumination onto the normal)
    model: str = "rigid"
    max_rotation_deg: float = 10.0  # search range; > 90 also tries the 180-degree flip
    max_scale_change: float = 0.05  # similarity / affine: |s - 1| searched and accepted
    max_shift_px: float | None = None  # accepted distance from the initial guess (None: any)
    coarse_size: int = 1024  # max side of the global-search image
    refine_size: int = 2048  # max side of the finest refinement level
    sigma_low: float = 1.0  # band-pass at every level (level pixels)
    sigma_high: float = 12.0
    max_points: int = 250_000  # pixels used per Gauss-Newton iteration (strided subsample)
    max_iter: int = 40
    min_quality: float = 0.2  # weighted NCC below this is not accepted
    min_overlap: float = 0.25  # overlap / smaller valid area below this is not accepted

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, not {self.model!r}")


@dataclass(frozen=True)
class Registration:
    """Result of :func:`register_slices` (``matrix``: moving -> fixed, level-0 pixels)."""

    matrix: np.ndarray
    rotation_deg: float
    shift_yx: tuple[float, float]  # translation column of `matrix`
    scale: float
    quality: float  # weighted NCC of the band-passed images after alignment, in [-1, 1]
    overlap: float  # overlapping valid area / the smaller valid area (finest level)
    accepted: bool
    reason: str = ""  # why not accepted ("" when accepted)
    coarse: tuple[float, float, float] = (0.0, 0.0, 0.0)  # global estimate: rot, dy, dx
    iterations: int = 0
    levels: tuple[int, ...] = field(default=())  # downsampling factors refined on


# ----------------------------------------------------------------------------- geometry
def translation_matrix(dy: float, dx: float) -> np.ndarray:
    """``(y, x) -> (y + dy, x + dx)``."""
    return np.array([[1.0, 0.0, dy], [0.0, 1.0, dx], [0.0, 0.0, 1.0]])


def _linear(rotation_deg: float, scale: float = 1.0) -> np.ndarray:
    t = math.radians(rotation_deg)
    c, s = math.cos(t), math.sin(t)
    return scale * np.array([[c, s], [-s, c]])


def similarity_matrix(
    rotation_deg: float = 0.0,
    shift_yx: Sequence[float] = (0.0, 0.0),
    scale: float = 1.0,
    center_yx: Sequence[float] = (0.0, 0.0),
) -> np.ndarray:
    """``p -> s R(t) (p - c) + c + shift`` as a 3x3 matrix (conventions: module doc)."""
    a = _linear(rotation_deg, scale)
    c = np.asarray(center_yx, dtype=float)
    m = np.eye(3)
    m[:2, :2] = a
    m[:2, 2] = c - a @ c + np.asarray(shift_yx, dtype=float)
    return m


def decompose(matrix: np.ndarray) -> tuple[float, tuple[float, float], float]:
    """``(rotation_deg, shift_yx, scale)`` of a similarity matrix (rotation about the origin)."""
    m = np.asarray(matrix, dtype=float)
    scale = math.sqrt(abs(np.linalg.det(m[:2, :2])))
    rotation = math.degrees(math.atan2(m[0, 1] - m[1, 0], m[0, 0] + m[1, 1]))
    return rotation, (float(m[0, 2]), float(m[1, 2])), scale


def _level_matrix(f: int) -> np.ndarray:
    """Level pixel -> level-0 pixel for a downsampling factor ``f``."""
    o = (f - 1) / 2.0
    return np.array([[f, 0.0, o], [0.0, f, o], [0.0, 0.0, 1.0]])


def _to_level(matrix: np.ndarray, f: int) -> np.ndarray:
    s = _level_matrix(f)
    return np.linalg.inv(s) @ matrix @ s


def _from_level(matrix: np.ndarray, f: int) -> np.ndarray:
    s = _level_matrix(f)
    return s @ matrix @ np.linalg.inv(s)


# ----------------------------------------------------------------------------- resampling
def halve(image: np.ndarray) -> np.ndarray:
    """NaN-aware mean of 2x2 blocks (odd sizes: the last blocks are partial; all-NaN: NaN),
    as :func:`services.io.omezarr.downsample` computes a pyramid level (float32)."""
    img = np.asarray(image, dtype=np.float32)
    ny, nx = img.shape
    valid = np.isfinite(img)
    v = np.where(valid, img, np.float32(0.0))
    if ny % 2 or nx % 2:
        v = np.pad(v, ((0, ny % 2), (0, nx % 2)))
        valid = np.pad(valid, ((0, ny % 2), (0, nx % 2)))
    num = v[0::2, 0::2] + v[1::2, 0::2]
    num += v[0::2, 1::2]
    num += v[1::2, 1::2]
    c = valid.view(np.uint8)
    den = c[0::2, 0::2] + c[1::2, 0::2]
    den += c[0::2, 1::2]
    den += c[1::2, 1::2]
    with np.errstate(invalid="ignore", divide="ignore"):
        np.divide(num, den, out=num)  # 0 / 0 -> NaN where a block has no data
    return num


class Pyramid:
    """An image and its 2^k-downsampled levels (:func:`halve`), made or loaded on demand.

    ``loader(f)`` may return a stored level (e.g. an OME-Zarr pyramid level, ``None`` if
    there is none) so a large mosaic is never read at full resolution for registration.
    """

    def __init__(
        self,
        shape: Sequence[int],
        loader: Callable[[int], np.ndarray | None] | None = None,
        image: np.ndarray | None = None,
    ) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self._loader = loader
        self._levels: dict[int, np.ndarray] = {}
        if image is not None:
            self._levels[1] = np.asarray(image, dtype=np.float32)

    @staticmethod
    def of(image: np.ndarray | Pyramid) -> Pyramid:
        if isinstance(image, Pyramid):
            return image
        img = np.asarray(image, dtype=np.float32)
        if img.ndim != 2:
            raise ValueError("registration takes 2-D images")
        return Pyramid(img.shape, image=img)

    def level(self, f: int) -> np.ndarray:
        """Level with downsampling factor ``f`` (a power of two)."""
        if f not in self._levels:
            got = self._loader(f) if self._loader is not None else None
            if got is None:
                if f <= 1:
                    raise ValueError("no level-0 image to build the pyramid from")
                got = halve(self.level(f // 2))
            self._levels[f] = np.asarray(got, dtype=np.float32)
        return self._levels[f]


def _affine(
    image: np.ndarray, inv: np.ndarray, shape: tuple[int, int], threads: int = 1
) -> np.ndarray:
    """Bilinear ``out[o] = image[inv o]`` (0 outside), in row blocks on ``threads`` threads
    (``scipy.ndimage`` releases the GIL)."""
    a, b = inv[:2, :2], inv[:2, 2]
    if threads <= 1 or shape[0] < 512:
        return ndimage.affine_transform(image, a, offset=b, output_shape=shape, order=1, cval=0.0)
    out = np.empty(shape, dtype=image.dtype)
    rows = max(64, math.ceil(shape[0] / (4 * threads)))

    def block(y0: int) -> None:
        y1 = min(shape[0], y0 + rows)
        ndimage.affine_transform(
            image,
            a,
            offset=b + a @ np.array([y0, 0.0]),
            output_shape=(y1 - y0, shape[1]),
            output=out[y0:y1],
            order=1,
            cval=0.0,
        )

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(block, range(0, shape[0], rows)))
    return out


def warp_stack(
    stack: np.ndarray,
    matrix: np.ndarray,
    shape: tuple[int, int],
    axial: Sequence[bool] | bool = False,
    min_weight: float = 0.5,
    threads: int | None = None,
) -> np.ndarray:
    """Resample a ``(c, y, x)`` stack into a target frame of ``shape`` (bilinear, NaN-aware).

    ``matrix`` maps source pixels to target pixels. Values and validity are interpolated
    separately (``sum w v / sum w``), so NaN holes neither spread nor leak; a target pixel is
    NaN where the interpolated validity is below ``min_weight``. Axial channels (angles in
    degrees, period 180) are interpolated as doubled-angle unit vectors. ``threads``
    (default: every CPU) parallelise the resampling over row blocks.
    """
    nt = threads or os.cpu_count() or 1
    src = np.asarray(stack, dtype=np.float32)
    flags = [bool(axial)] * src.shape[0] if isinstance(axial, bool) else [bool(a) for a in axial]
    m = np.asarray(matrix, dtype=float)
    shape = (int(shape[0]), int(shape[1]))
    out = np.full((src.shape[0], *shape), np.nan, dtype=np.float32)
    # only the target box the source can reach is resampled
    ny, nx = src.shape[1:]
    corners = m @ np.array([[-1, -1, ny, ny], [-1, nx, -1, nx], [1, 1, 1, 1]], dtype=float)
    y0, x0 = (max(0, math.floor(v)) for v in corners[:2].min(axis=1))
    y1, x1 = (min(n, math.ceil(v) + 1) for v, n in zip(corners[:2].max(axis=1), shape, strict=True))
    if y1 <= y0 or x1 <= x0:
        return out
    box = (y1 - y0, x1 - x0)
    inv = np.linalg.inv(m) @ np.array([[1.0, 0.0, y0], [0.0, 1.0, x0], [0.0, 0.0, 1.0]])
    masks: list[tuple[np.ndarray, np.ndarray]] = []  # (valid mask, warped weight), shared
    for k, is_axial in enumerate(flags):
        valid = np.isfinite(src[k])
        weight = next((w for v, w in masks if np.array_equal(v, valid)), None)
        if weight is None:
            weight = _affine(valid.astype(np.float32), inv, box, nt)
            masks.append((valid, weight))
        ok = weight >= min_weight
        target = out[k, y0:y1, x0:x1]
        if is_axial:
            two = np.deg2rad(2.0 * np.where(valid, src[k], np.float32(0.0)))
            cs = _affine(np.where(valid, np.cos(two), np.float32(0.0)), inv, box, nt)
            sn = _affine(np.where(valid, np.sin(two), np.float32(0.0)), inv, box, nt)
            ang = np.mod(0.5 * np.rad2deg(np.arctan2(sn, cs)) + 90.0, 180.0) - 90.0
            target[...] = np.where(ok, ang, np.nan)
        else:
            val = _affine(np.where(valid, src[k], np.float32(0.0)), inv, box, nt)
            with np.errstate(invalid="ignore", divide="ignore"):
                target[...] = np.where(ok, val / np.maximum(weight, 1e-6), np.nan)
    return out


def warp_image(
    image: np.ndarray,
    matrix: np.ndarray,
    shape: tuple[int, int],
    axial: bool = False,
    threads: int | None = 1,
) -> np.ndarray:
    """:func:`warp_stack` of one 2-D image (single-threaded by default)."""
    return warp_stack(np.asarray(image)[None], matrix, shape, axial, threads=threads)[0]


# ----------------------------------------------------------------------------- preparation
@dataclass
class _Prepared:
    """A band-passed, normalised image (0 outside its valid area) and its apodization."""

    bp: np.ndarray
    win: np.ndarray
    valid: np.ndarray

    @property
    def flat(self) -> bool:
        return float(np.sum(self.win)) < 16.0


def _prepare(image: np.ndarray, sigma_low: float, sigma_high: float) -> _Prepared:
    """Normalised-convolution difference of Gaussians, unit variance, smooth edge window."""
    img = np.asarray(image, dtype=np.float64)
    valid = np.isfinite(img)
    v = np.where(valid, img, 0.0)
    w = valid.astype(np.float64)

    def blur(a: np.ndarray, s: float) -> np.ndarray:
        return ndimage.gaussian_filter(a, s, mode="constant", truncate=3.0)

    with np.errstate(invalid="ignore", divide="ignore"):
        low = blur(v, sigma_low) / np.maximum(blur(w, sigma_low), 1e-6)
        high = blur(v, sigma_high) / np.maximum(blur(w, sigma_high), 1e-6)
    bp = np.where(valid, low - high, 0.0)
    n = max(int(valid.sum()), 1)
    bp[valid] -= bp[valid].sum() / n
    sd = math.sqrt(float(np.sum(bp[valid] ** 2)) / n)
    if sd > 1e-12:
        bp /= sd
    ramp = float(np.clip(0.08 * min(img.shape), 3.0, 2.5 * sigma_high))
    dist = ndimage.distance_transform_edt(np.pad(valid, 1))[1:-1, 1:-1]
    t = np.clip((dist - 0.5) / ramp, 0.0, 1.0)
    win = t * t * (3.0 - 2.0 * t)
    if sd <= 1e-12:
        win = np.zeros_like(win)
    return _Prepared(bp, win, valid)


def _wncc(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> float:
    """Weighted normalised cross-correlation (0 when flat or empty)."""
    sw = float(w.sum())
    if sw <= 1e-9:
        return 0.0
    ma, mb = float((w * a).sum()) / sw, float((w * b).sum()) / sw
    da, db = a - ma, b - mb
    den = math.sqrt(float((w * da * da).sum()) * float((w * db * db).sum()))
    return float((w * da * db).sum()) / den if den > 1e-12 else 0.0


# ----------------------------------------------------------------------------- global search
def _peak_subpixel(c: np.ndarray, py: int, px: int) -> tuple[float, float]:
    """Parabolic sub-pixel offset of a peak on a periodic surface."""
    ny, nx = c.shape

    def vertex(m: float, z: float, p: float) -> float:
        den = m - 2 * z + p
        return 0.0 if abs(den) < 1e-12 else float(np.clip(0.5 * (m - p) / den, -0.5, 0.5))

    dy = vertex(c[(py - 1) % ny, px], c[py, px], c[(py + 1) % ny, px])
    dx = vertex(c[py, (px - 1) % nx], c[py, px], c[py, (px + 1) % nx])
    return dy, dx


def _top_peaks(c: np.ndarray, k: int, radius: int) -> list[tuple[int, int]]:
    c = c.copy()
    ny, nx = c.shape
    out = []
    r = np.arange(-radius, radius + 1)
    for _ in range(k):
        i = int(np.argmax(c))
        py, px = divmod(i, nx)
        if not np.isfinite(c[py, px]):
            break
        out.append((py, px))
        c[np.ix_((py + r) % ny, (px + r) % nx)] = -np.inf
    return out


def _phase_corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Phase correlation surface of equally shaped arrays: peak at ``s`` where a[p] ~ b[p - s]."""
    fa = sfft.rfft2(a)
    fb = sfft.rfft2(b)
    cross = fa * np.conj(fb)
    cross /= np.maximum(np.abs(cross), 1e-12 * float(np.abs(cross).max() or 1.0))
    return sfft.irfft2(cross, s=a.shape)


def _log_polar(mag: np.ndarray, n_theta: int, n_r: int, r_min: float, r_max: float) -> np.ndarray:
    """Magnitude spectrum (fft-shifted, square) on a (theta in [0, pi), log r) grid."""
    c = mag.shape[0] // 2
    theta = np.arange(n_theta) * (math.pi / n_theta)
    radii = np.exp(np.linspace(math.log(r_min), math.log(r_max), n_r))
    yy = c - radii[None, :] * np.sin(theta)[:, None]
    xx = c + radii[None, :] * np.cos(theta)[:, None]
    return ndimage.map_coordinates(mag, [yy, xx], order=1, mode="constant", cval=0.0)


def _fourier_mellin(
    f: _Prepared, m: _Prepared, params: RegisterParams, n_cand: int = 3
) -> list[tuple[float, float]]:
    """Candidate ``(rotation_deg, scale)`` of moving -> fixed from log-polar spectra."""
    n = max(f.bp.shape)
    n += n % 2

    def spectrum(p: _Prepared) -> np.ndarray:
        a = np.zeros((n, n))
        a[: p.bp.shape[0], : p.bp.shape[1]] = p.bp * p.win
        return np.sqrt(np.abs(sfft.fftshift(sfft.fft2(a))))

    n_theta = int(min(2048, max(360, 4 * n)))
    n_r = max(64, n // 2)
    r_min, r_max = 2.0, 0.5 * n * 0.95
    lf = _log_polar(spectrum(f), n_theta, n_r, r_min, r_max)
    lm = _log_polar(spectrum(m), n_theta, n_r, r_min, r_max)
    taper = np.hanning(n_r + 2)[1:-1][None, :]
    pad = np.zeros((n_theta, 2 * n_r))
    pa, pb = pad.copy(), pad.copy()
    pa[:, :n_r] = (lf - lf.mean()) * taper
    pb[:, :n_r] = (lm - lm.mean()) * taper
    corr = _phase_corr(pa, pb)
    dlog = (math.log(r_max) - math.log(r_min)) / (n_r - 1)
    step = 180.0 / n_theta
    # allowed region: rotation and scale within the search range
    rot_idx = np.arange(n_theta)
    rot_deg = np.where(rot_idx < n_theta / 2, rot_idx, rot_idx - n_theta) * step
    r_idx = np.arange(2 * n_r)
    r_shift = np.where(r_idx < n_r, r_idx, r_idx - 2 * n_r)
    max_ls = math.log1p(params.max_scale_change) if params.model != "rigid" else 0.0
    ok_r = np.abs(r_shift * dlog) <= max_ls + 1.5 * dlog
    if params.model == "rigid":
        ok_r = r_shift == 0
    ok_t = np.abs(rot_deg) <= min(params.max_rotation_deg, 90.0) + 2 * step
    masked = np.where(ok_t[:, None] & ok_r[None, :], corr, -np.inf)
    out = []
    for py, px in _top_peaks(masked, n_cand, 2):
        sy, sx = _peak_subpixel(corr, py, px)
        if params.model == "rigid":
            sx = 0.0
        t = rot_deg[py] + sy * step
        ls = (r_shift[px] + sx) * dlog
        # lf[theta] ~ lm[theta - shift]: the moving spectrum is the fixed one turned by -t
        rot = -t
        out.append((float(rot), float(math.exp(ls))))
    if params.max_rotation_deg > 90.0:
        out += [((r + 360.0) % 360.0 - 180.0, s) for r, s in out]
    return out or [(0.0, 1.0)]


def _translation_candidates(
    f: _Prepared, m: _Prepared, n_peaks: int = 4
) -> list[tuple[float, float]]:
    """Shifts ``d`` (moving-in-fixed-frame -> fixed) from windowed phase correlation."""
    ny, nx = f.bp.shape
    shape = (ny * 2, nx * 2)  # zero padding: no wrap-around ambiguity for |d| < size
    a = np.zeros(shape)
    b = np.zeros(shape)
    a[:ny, :nx] = f.bp * f.win
    b[:ny, :nx] = m.bp * m.win
    corr = _phase_corr(a, b)
    corr = ndimage.gaussian_filter(corr, 1.0, mode="wrap")
    out = []
    for py, px in _top_peaks(corr, n_peaks, 3):
        sy, sx = _peak_subpixel(corr, py, px)
        dy = py + sy if py < shape[0] // 2 else py + sy - shape[0]
        dx = px + sx if px < shape[1] // 2 else px + sx - shape[1]
        out.append((float(dy), float(dx)))
    return out


# ----------------------------------------------------------------------------- refinement
@dataclass
class _Level:
    f: int
    fixed: _Prepared
    moving: _Prepared
    grad: tuple[np.ndarray, np.ndarray]


def _make_level(fixed: np.ndarray, moving: np.ndarray, f: int, p: RegisterParams) -> _Level:
    fp = _prepare(fixed, p.sigma_low, p.sigma_high)
    mp = _prepare(moving, p.sigma_low, p.sigma_high)
    gy, gx = np.gradient(mp.bp)
    return _Level(f, fp, mp, (gy, gx))


def _sample(img: np.ndarray, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    return ndimage.map_coordinates(img, [yy, xx], order=1, mode="constant", cval=0.0)


def _refine_level(
    lv: _Level, matrix0: np.ndarray, p: RegisterParams
) -> tuple[np.ndarray, int, float, float]:
    """Gauss-Newton on one level; returns (matrix level-0, iterations, quality, overlap)."""
    m_l = _to_level(matrix0, lv.f)
    g = np.linalg.inv(m_l)  # fixed level px -> moving level px
    fy, fx = np.nonzero(lv.fixed.win > 0)
    stride = max(1, math.ceil(math.sqrt(fy.size / p.max_points)))
    if stride > 1:
        keep = (fy % stride == 0) & (fx % stride == 0)
        fy, fx = fy[keep], fx[keep]
    fv = lv.fixed.bp[fy, fx]
    fw = lv.fixed.win[fy, fx]
    c = np.array([(lv.fixed.bp.shape[0] - 1) / 2.0, (lv.fixed.bp.shape[1] - 1) / 2.0])
    x = np.stack([fy - c[0], fx - c[1]]).astype(np.float64)  # centred fixed coords (2, n)
    if p.model == "affine":
        g, it = _gauss_newton_affine(lv, g, c, x, fv, fw, p)
        quality, overlap = _score(lv, g, fy, fx, fv, fw)
        return _from_level(np.linalg.inv(g), lv.f), it, quality, overlap
    # parametrise g(x) = s R(phi) (x - c) + c + t, start from the given matrix
    a = g[:2, :2]
    phi = math.atan2(a[0, 1] - a[1, 0], a[0, 0] + a[1, 1])
    log_s = math.log(math.sqrt(abs(np.linalg.det(a))))
    t = g[:2, :2] @ c + g[:2, 2] - c
    similarity = p.model == "similarity"
    radius = float(np.sqrt(np.mean(np.sum(x * x, axis=0)))) or 1.0
    it = 0
    for it in range(1, p.max_iter + 1):  # noqa: B007 - the count is returned
        cs, sn, s = math.cos(phi), math.sin(phi), math.exp(log_s)
        rot = np.array([[cs, sn], [-sn, cs]])
        drot = np.array([[-sn, cs], [-cs, -sn]])
        rx = s * (rot @ x)
        lin = _linearise(lv, rx, c, t, fv, fw)
        if lin is None:
            break
        gain, r, w, gy, gx = lin
        drx = s * (drot @ x)
        cols = [gain * gy, gain * gx, gain * (gy * drx[0] + gx * drx[1])]
        if similarity:
            cols.append(gain * (gy * rx[0] + gx * rx[1]))
        jac = np.stack(cols, axis=1)
        jw = jac * w[:, None]
        h = jac.T @ jw
        h += np.eye(h.shape[0]) * 1e-9 * np.trace(h)
        delta = -np.linalg.solve(h, jw.T @ r)
        t = t + delta[:2]
        phi += float(delta[2])
        if similarity:
            log_s += float(delta[3])
            log_s = float(np.clip(log_s, -0.5, 0.5))
        step = math.hypot(delta[0], delta[1]) + abs(delta[2]) * radius
        if similarity:
            step += abs(delta[3]) * radius
        if step < 1e-3:
            break
    cs, sn, s = math.cos(phi), math.sin(phi), math.exp(log_s)
    g = np.eye(3)
    g[:2, :2] = s * np.array([[cs, sn], [-sn, cs]])
    g[:2, 2] = c + t - g[:2, :2] @ c
    m_l = np.linalg.inv(g)
    quality, overlap = _score(lv, g, fy, fx, fv, fw)
    return _from_level(m_l, lv.f), it, quality, overlap


def _photometric(mv: np.ndarray, fv: np.ndarray, w: np.ndarray) -> tuple[float, np.ndarray] | None:
    """Per-iteration gain/bias fit ``f ~ gain m + bias``: (gain, residual), None if no data."""
    sw = float(w.sum())
    if sw < 16.0:
        return None
    mm, mf = float((w * mv).sum()) / sw, float((w * fv).sum()) / sw
    var = float((w * (mv - mm) ** 2).sum())
    gain = float((w * (mv - mm) * (fv - mf)).sum()) / var if var > 1e-12 else 1.0
    gain = gain if abs(gain) > 1e-3 else 1e-3
    return gain, gain * (mv - mm) - (fv - mf)


def _linearise(
    lv: _Level, moved: np.ndarray, c: np.ndarray, t: np.ndarray, fv: np.ndarray, fw: np.ndarray
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """The moving level at the warped points ``moved + c + t`` (``moved`` the centred points
    after the linear part): (gain, residual, weights, d/dy, d/dx) of the photometric fit,
    None where too little overlaps."""
    yy = moved[0] + c[0] + t[0]
    xx = moved[1] + c[1] + t[1]
    mv = _sample(lv.moving.bp, yy, xx)
    w = fw * _sample(lv.moving.win, yy, xx)
    fit = _photometric(mv, fv, w)
    if fit is None:
        return None
    return *fit, w, _sample(lv.grad[0], yy, xx), _sample(lv.grad[1], yy, xx)


def _gauss_newton_affine(
    lv: _Level,
    g: np.ndarray,
    c: np.ndarray,
    x: np.ndarray,
    fv: np.ndarray,
    fw: np.ndarray,
    p: RegisterParams,
) -> tuple[np.ndarray, int]:
    """Gauss-Newton with gain/bias for a general affine ``g(x) = A (x - c) + c + t`` (fixed
    level px -> moving level px), ``x`` the centred fixed coordinates. The linear part is
    solved in units of the points' RMS radius so that all six unknowns are pixels."""
    radius = float(np.sqrt(np.mean(np.sum(x * x, axis=0)))) or 1.0
    u = x / radius
    b = g[:2, :2] * radius  # A in pixels per radius
    t = g[:2, :2] @ c + g[:2, 2] - c
    it = 0
    for it in range(1, p.max_iter + 1):  # noqa: B007 - the count is returned
        bx = b @ u
        lin = _linearise(lv, bx, c, t, fv, fw)
        if lin is None:
            break
        gain, r, w, gy, gx = lin
        cols = [gy, gx, gy * u[0], gy * u[1], gx * u[0], gx * u[1]]
        jac = gain * np.stack(cols, axis=1)
        jw = jac * w[:, None]
        h = jac.T @ jw
        h += np.eye(6) * 1e-9 * np.trace(h)
        delta = -np.linalg.solve(h, jw.T @ r)
        t = t + delta[:2]
        b = b + delta[2:].reshape(2, 2)
        if float(np.abs(delta).sum()) < 1e-3:
            break
    a = b / radius
    out = np.eye(3)
    out[:2, :2] = a
    out[:2, 2] = c + t - a @ c
    return out, it


def _score(
    lv: _Level, g: np.ndarray, fy: np.ndarray, fx: np.ndarray, fv: np.ndarray, fw: np.ndarray
) -> tuple[float, float]:
    """Weighted NCC and overlap fraction at the fixed-level points ``(fy, fx)``."""
    yy = g[0, 0] * fy + g[0, 1] * fx + g[0, 2]
    xx = g[1, 0] * fy + g[1, 1] * fx + g[1, 2]
    mv = _sample(lv.moving.bp, yy, xx)
    mw = _sample(lv.moving.win, yy, xx)
    quality = _wncc(fv, mv, fw * mw)
    # overlap of the valid areas (nearest-pixel lookup, whole image)
    ny, nx = lv.fixed.valid.shape
    gy, gx = np.mgrid[0:ny, 0:nx]
    my = np.rint(g[0, 0] * gy + g[0, 1] * gx + g[0, 2]).astype(np.int64)
    mx = np.rint(g[1, 0] * gy + g[1, 1] * gx + g[1, 2]).astype(np.int64)
    mvalid = lv.moving.valid
    inside = (my >= 0) & (my < mvalid.shape[0]) & (mx >= 0) & (mx < mvalid.shape[1])
    both = np.zeros_like(inside)
    both[inside] = mvalid[my[inside], mx[inside]]
    both &= lv.fixed.valid
    smaller = max(1, min(int(lv.fixed.valid.sum()), int(mvalid.sum())))
    return quality, float(both.sum()) / smaller


# ----------------------------------------------------------------------------- entry point
def _factor(shape: Sequence[int], size: int) -> int:
    """Smallest power of two bringing the largest side to ``size`` or below."""
    f = 1
    while max(shape) / f > size:
        f *= 2
    return f


def register_slices(
    fixed: np.ndarray | Pyramid,
    moving: np.ndarray | Pyramid,
    init: np.ndarray | None = None,
    params: RegisterParams | None = None,
) -> Registration:
    """Register ``moving`` (en-face image of slice k) to ``fixed`` (slice k - 1).

    Images are 2-D arrays or :class:`Pyramid` objects (only the levels between
    ``refine_size`` and ``coarse_size`` are used). ``init``: initial moving -> fixed matrix
    (e.g. the stage prior from the mosaics' origins); the global search looks for the
    residual around it. NaN marks pixels without data. Deterministic: the same inputs give
    the same result.
    """
    p = params or RegisterParams()
    fixed, moving = Pyramid.of(fixed), Pyramid.of(moving)
    init = np.eye(3) if init is None else np.asarray(init, dtype=float)

    # 1. global estimate on a coarse copy, moving pre-warped into the fixed frame by `init`
    fc = _factor(fixed.shape, p.coarse_size)
    f_fine = _factor(fixed.shape, p.refine_size)
    fixed_c, moving_c = fixed.level(fc), moving.level(fc)
    init_c = _to_level(init, fc)
    moving_in = warp_image(moving_c, init_c, fixed_c.shape)
    fpc = _prepare(fixed_c, p.sigma_low, p.sigma_high)
    mpc = _prepare(moving_in, p.sigma_low, p.sigma_high)
    if fpc.flat or mpc.flat:
        return _rejected(init, "no texture or no overlap at the initial guess")
    center = ((fixed_c.shape[0] - 1) / 2.0, (fixed_c.shape[1] - 1) / 2.0)
    best: tuple[float, np.ndarray, tuple[float, float, float]] | None = None
    candidates: list[tuple[float, float]] = []
    for rot, scale in [(0.0, 1.0), *_fourier_mellin(fpc, mpc, p)]:
        if all(abs(rot - r) > 0.02 or abs(scale - s) > 1e-3 for r, s in candidates):
            candidates.append((rot, scale))
    # candidates are scored on every other pixel of the coarse level
    ny, nx = fixed_c.shape
    yy, xx = (a.astype(np.float64) for a in np.mgrid[0:ny:2, 0:nx:2])
    f_bp, f_win = fpc.bp[::2, ::2], fpc.win[::2, ::2]
    min_area = 0.1 * min(float(f_win.sum()), float(mpc.win[::2, ::2].sum()))
    for rot, scale in candidates:
        turn = similarity_matrix(rot, (0.0, 0.0), scale, center)
        inv = np.linalg.inv(turn)
        mr = _Prepared(
            _affine(mpc.bp, inv, fixed_c.shape), _affine(mpc.win, inv, fixed_c.shape), mpc.valid
        )
        if mr.flat:
            continue
        for dy, dx in _translation_candidates(fpc, mr):
            m = translation_matrix(dy, dx) @ turn
            g = np.linalg.inv(m)
            sy = g[0, 0] * yy + g[0, 1] * xx + g[0, 2]
            sx = g[1, 0] * yy + g[1, 1] * xx + g[1, 2]
            mv = ndimage.map_coordinates(mpc.bp, [sy, sx], order=1, cval=0.0)
            mw = ndimage.map_coordinates(mpc.win, [sy, sx], order=1, cval=0.0)
            if float((f_win * mw).sum()) < min_area:
                continue  # too little overlap to trust
            score = _wncc(f_bp, mv, f_win * mw)
            if best is None or score > best[0] + 1e-9:
                best = (score, m, (rot, dy * fc, dx * fc))
    if best is None:
        return _rejected(init, "global search found no overlapping candidate")
    matrix = _from_level(best[1], fc) @ init

    # 2. Gauss-Newton refinement, coarse to fine
    factors = []
    f = max(fc, f_fine)
    while f >= f_fine:
        factors.append(f)
        f //= 2
    iterations, quality, overlap = 0, 0.0, 0.0
    for f in factors:
        lv = _make_level(fixed.level(f), moving.level(f), f, p)
        if lv.fixed.flat or lv.moving.flat:
            continue
        matrix, n_it, quality, overlap = _refine_level(lv, matrix, p)
        iterations += n_it
    rotation, shift, scale = decompose(matrix)
    reasons = []
    if not np.all(np.isfinite(matrix)):
        return _rejected(init, "refinement diverged")
    if quality < p.min_quality:
        reasons.append(f"low quality {quality:.2f} < {p.min_quality:g}")
    if overlap < p.min_overlap:
        reasons.append(f"overlap {overlap:.2f} < {p.min_overlap:g}")
    if abs(rotation) > p.max_rotation_deg:
        reasons.append(f"rotation {rotation:.2f} deg beyond {p.max_rotation_deg:g}")
    if p.model == "affine":
        sv = np.linalg.svd(matrix[:2, :2], compute_uv=False)
        if sv.max() > 1.0 + p.max_scale_change or sv.min() < 1.0 / (1.0 + p.max_scale_change):
            reasons.append(f"scales {sv.min():.4f} .. {sv.max():.4f} out of range")
    elif abs(scale - 1.0) > (p.max_scale_change if p.model == "similarity" else 1e-6):
        reasons.append(f"scale {scale:.4f} out of range")
    if p.max_shift_px is not None:
        moved = matrix @ np.linalg.inv(init)
        d = float(np.hypot(*_centre_shift(moved, fixed.shape)))
        if d > p.max_shift_px:
            reasons.append(f"shift {d:.1f} px from the initial guess beyond {p.max_shift_px:g}")
    return Registration(
        matrix=matrix,
        rotation_deg=rotation,
        shift_yx=shift,
        scale=scale,
        quality=float(quality),
        overlap=float(overlap),
        accepted=not reasons,
        reason="; ".join(reasons),
        coarse=best[2],
        iterations=iterations,
        levels=tuple(factors),
    )


def _centre_shift(matrix: np.ndarray, shape: Sequence[int]) -> tuple[float, float]:
    """Displacement of the image centre under ``matrix``."""
    c = np.array([(shape[0] - 1) / 2.0, (shape[1] - 1) / 2.0, 1.0])
    d = matrix @ c - c
    return float(d[0]), float(d[1])


def _rejected(init: np.ndarray, reason: str) -> Registration:
    rotation, shift, scale = decompose(init)
    return Registration(
        matrix=np.array(init, dtype=float),
        rotation_deg=rotation,
        shift_yx=shift,
        scale=scale,
        quality=0.0,
        overlap=0.0,
        accepted=False,
        reason=reason,
    )
