"""Pairwise registration of neighbouring tiles by band-passed, windowed phase correlation.

Conventions (used throughout :mod:`kernels.stitch`):

* Coordinates are ``(y, x)`` in pixels, y down (rows), x right (columns).
* A tile's *position* is the global coordinate of its pixel ``[0, 0]``; pixel ``[i, j]`` of a
  tile at ``p`` sits at ``p + (i, j)``.
* The *shift* (offset) of a pair is ``position(moving) - position(fixed)``: the total offset,
  not a correction. ``moving[i, j]`` shows the same point as ``fixed[i + dy, j + dx]``. For a
  right-hand neighbour ``dx ~ width - overlap`` and ``dy ~ 0``.
  :attr:`PairAlignment.correction_yx` is the shift minus the nominal (stage) shift.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from kernels.backend import ArrayModule, resolve_xp

__all__ = ["PairAlignment", "align_pair", "bandpass", "ncc", "tukey"]


@dataclass(frozen=True)
class PairAlignment:
    """Result of :func:`align_pair` (pixels, ``(y, x)``)."""

    shift_yx: tuple[float, float]  # total offset position(moving) - position(fixed)
    nominal_yx: tuple[float, float]  # the stage (nominal) offset it was searched around
    confidence: float  # in [0, 1]: NCC of the band-passed overlap at the shift, clipped at 0
    ncc: float  # that NCC, unclipped (in [-1, 1])
    peak_ratio: float  # chosen correlation peak / highest other peak (inf: no other peak)
    overlap_area: int  # pixels in the overlap the NCC was computed on
    n_candidates: int  # plausible (peak, wrap) interpretations that were scored by NCC
    window_yx: tuple[int, int] = (0, 0)  # phase-correlation window: shifts alias modulo this
    status: str = "ok"  # "ok", "no_candidate" (nothing within max_shift), "flat" (no texture)
    # every scored interpretation: (dy, dx, ncc) with integer total shifts, best first
    candidates: tuple[tuple[float, float, float], ...] = field(default=(), repr=False)

    @property
    def correction_yx(self) -> tuple[float, float]:
        """Shift minus the nominal shift: what the stage got wrong."""
        return (self.shift_yx[0] - self.nominal_yx[0], self.shift_yx[1] - self.nominal_yx[1])


# ----------------------------------------------------------------------------- filters
def tukey(n: int, alpha: float) -> np.ndarray:
    """Tukey (tapered cosine) window of length ``n`` (alpha 0: boxcar, 1: Hann), host array."""
    if n <= 1 or alpha <= 0:
        return np.ones(n)
    x = np.arange(n) / (n - 1)
    w = np.ones(n)
    a = min(alpha, 1.0)
    lo, hi = x < a / 2, x > 1 - a / 2
    w[lo] = 0.5 * (1 + np.cos(np.pi * (2 * x[lo] / a - 1)))
    w[hi] = 0.5 * (1 + np.cos(np.pi * (2 * x[hi] / a - 2 / a + 1)))
    return w


@lru_cache(maxsize=64)
def _gauss_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) matrix applying a 1-D Gaussian blur with mirror-symmetric boundaries (cached,
    read-only)."""
    if sigma <= 0:
        eye = np.eye(n)
        eye.setflags(write=False)
        return eye
    r = math.ceil(4 * sigma)
    taps = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    taps /= taps.sum()
    rows = np.repeat(np.arange(n), 2 * r + 1)
    cols = (np.arange(n)[:, None] + np.arange(-r, r + 1)[None, :]).ravel()
    period = 2 * n  # reflect about the half-pixel edges: -1 -> 0, n -> n - 1
    cols = np.mod(cols, period)
    cols = np.where(cols >= n, period - 1 - cols, cols)
    m = np.zeros((n, n))
    np.add.at(m, (rows, cols), np.tile(taps, n))
    m.setflags(write=False)
    return m


def bandpass(img: Any, sigma_low: float, sigma_high: float, xp: ArrayModule | None = None) -> Any:
    """Difference of Gaussians ``G(sigma_low) * img - G(sigma_high) * img`` (mirror edges).

    Separable blurs as small dense matrix products (``xp``-agnostic; fine up to ~2k pixels a
    side). ``sigma_high <= 0`` gives a plain low-pass.
    """
    xp = resolve_xp(xp, img)
    img = xp.asarray(img, dtype=xp.float64)
    ny, nx = img.shape
    out = xp.asarray(_gauss_matrix(ny, sigma_low)) @ img
    out = out @ xp.asarray(_gauss_matrix(nx, sigma_low)).T
    if sigma_high > 0:
        gy = xp.asarray(_gauss_matrix(ny, sigma_high))
        gx = xp.asarray(_gauss_matrix(nx, sigma_high))
        out = out - gy @ img @ gx.T
    return out


def ncc(a: Any, b: Any, xp: ArrayModule | None = None) -> float:
    """Normalised cross-correlation of two equally shaped arrays (0 if either is flat)."""
    xp = resolve_xp(xp, a, b)
    a = a - a.mean()
    b = b - b.mean()
    den = float(xp.sqrt((a * a).sum() * (b * b).sum()))
    if den <= 1e-12 * max(a.size, 1):
        return 0.0
    return float((a * b).sum()) / den


# ----------------------------------------------------------------------------- geometry
def _boxes(
    shape_a: tuple[int, int],
    shape_b: tuple[int, int],
    d0: tuple[int, int],
    margin: tuple[int, int],
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Nominal overlap box grown by ``margin``, in fixed (a) and moving (b) pixel coordinates."""
    box_a, box_b = [], []
    for sa, sb, d, m in zip(shape_a, shape_b, d0, margin, strict=True):
        lo, hi = max(0, d), min(sa, d + sb)  # nominal overlap in fixed coordinates
        if hi <= lo:
            raise ValueError(f"tiles do not overlap at the nominal shift {d0}")
        box_a.append((max(0, lo - m), min(sa, hi + m)))
        box_b.append((max(0, lo - d - m), min(sb, hi - d + m)))
    return box_a, box_b


def _top_peaks(c: Any, k: int, radius: int, xp: ArrayModule) -> list[tuple[int, int]]:
    """Indices of up to ``k`` highest peaks of ``c``, each suppressing a circular neighbourhood."""
    c = c.copy()
    ny, nx = c.shape
    floor = -math.inf
    ry = xp.asarray(np.arange(-radius, radius + 1))
    peaks = []
    for _ in range(k):
        i = int(xp.argmax(c))
        py, px = divmod(i, nx)
        if float(c[py, px]) <= floor:
            break
        peaks.append((py, px))
        c[xp.ix_((py + ry) % ny, (px + ry) % nx)] = floor
    return peaks


# ----------------------------------------------------------------------------- align
def align_pair(
    fixed: Any,
    moving: Any,
    nominal_shift_yx: tuple[float, float] | None = None,
    overlap_px: float | None = None,
    axis: int | None = None,
    *,
    max_shift_px: float | tuple[float, float] = 12.0,
    sigma_low: float = 1.0,
    sigma_high: float = 8.0,
    tukey_alpha: float = 0.1,
    whiten_power: float = 0.5,
    n_peaks: int = 10,
    min_overlap_frac: float = 0.25,
    xp: ArrayModule | None = None,
) -> PairAlignment:
    """Register ``moving`` against its neighbour ``fixed``; returns the *total* shift.

    ``nominal_shift_yx`` is the stage offset ``position(moving) - position(fixed)``. For a
    regular lattice it may instead be given as ``overlap_px`` along ``axis`` (1: moving is the
    right neighbour, 0: the lower one): ``nominal[axis] = size[axis] - overlap_px``, 0 across.
    If both are given they must agree within 1 px. The result is searched within
    ``max_shift_px`` (a number, or per axis ``(y, x)``) of the nominal shift.

    1. Coarse: the nominal overlap grown by ``max_shift_px`` on every side is cut from both
       tiles, band-passed (difference of Gaussians, ``sigma_low``/``sigma_high`` px), Tukey
       windowed (``tukey_alpha``) and phase correlated: cross-power spectrum divided by its
       magnitude ``** whiten_power`` (1: pure phase correlation; 0.5 tolerates small
       overlaps better), weighted by the same band-pass for a smooth peak.
    2. Wrap-around: a peak at index ``p`` stands for every shift ``p + k N`` (``N``: window
       size, :attr:`PairAlignment.window_yx`). For each of the ``n_peaks`` highest peaks,
       every interpretation within ``max_shift_px`` of the nominal shift and overlapping by at
       least ``min_overlap_frac`` of the nominal overlap is scored by the NCC of the actual
       (band-passed) overlap; the best wins, then climbs to the integer NCC maximum.
    3. Sub-pixel: symmetric gradient (Lucas-Kanade) fit on the exact overlap (see
       :func:`_refine`): ~0.005 px on noiseless band-limited texture. (A windowed
       phase-correlation peak, even upsampled, is biased towards integers by 0.1-0.3 px on
       narrow overlaps, so it is used for the coarse search only.)

    ``confidence`` is the NCC of the band-passed overlap at the final (rounded) shift.
    """
    xp = resolve_xp(xp, fixed, moving)
    fixed = xp.asarray(fixed, dtype=xp.float64)
    moving = xp.asarray(moving, dtype=xp.float64)
    if fixed.ndim != 2 or moving.ndim != 2:
        raise ValueError("align_pair takes 2-D images")
    d0 = _nominal(fixed.shape, nominal_shift_yx, overlap_px, axis)
    d0i = (round(d0[0]), round(d0[1]))
    ms = (max_shift_px, max_shift_px) if isinstance(max_shift_px, int | float) else max_shift_px
    lim = (float(ms[0]) + 1.0, float(ms[1]) + 1.0)
    box_a, box_b = _boxes(fixed.shape, moving.shape, d0i, (math.ceil(lim[0]), math.ceil(lim[1])))
    a = _finite(fixed[box_a[0][0] : box_a[0][1], box_a[1][0] : box_a[1][1]], xp)
    b = _finite(moving[box_b[0][0] : box_b[0][1], box_b[1][0] : box_b[1][1]], xp)
    # strip coordinates: b[u] == a[u + s] where s = shift - to_shift
    to_shift = (box_a[0][0] - box_b[0][0], box_a[1][0] - box_b[1][0])
    sizes = zip(fixed.shape, moving.shape, d0i, strict=True)
    min_area = min_overlap_frac * math.prod(min(sa, d + sb) - max(0, d) for sa, sb, d in sizes)

    def plausible(s: tuple[int, int]) -> tuple[Any, Any] | None:
        """Band-passed overlap at strip shift ``s`` if within the search limits, else None."""
        if abs(s[0] + to_shift[0] - d0[0]) > lim[0] or abs(s[1] + to_shift[1] - d0[1]) > lim[1]:
            return None
        ov = _overlap(abp, bbp, s)
        return ov if ov is not None and ov[0].size >= min_area else None

    abp = bandpass(a, sigma_low, sigma_high, xp)
    bbp = bandpass(b, sigma_low, sigma_high, xp)
    n = (max(a.shape[0], b.shape[0]), max(a.shape[1], b.shape[1]))
    fa = xp.fft.fft2(_windowed(abp, tukey_alpha, xp), s=n)
    fb = xp.fft.fft2(_windowed(bbp, tukey_alpha, xp), s=n)
    corr = xp.fft.ifft2(_whitened(fa, fb, n, sigma_low, sigma_high, whiten_power, xp)).real
    # strip shifts s (per axis) with a plausible total shift s + to_shift; a peak at index p
    # stands for every s = p + k N: keep only peaks with at least one plausible s
    s_lo = [math.ceil(dk - lk - ts) for dk, lk, ts in zip(d0, lim, to_shift, strict=True)]
    s_hi = [math.floor(dk + lk - ts) for dk, lk, ts in zip(d0, lim, to_shift, strict=True)]
    keep = [
        xp.asarray(np.mod(np.arange(nk) - lo, nk) <= hi - lo)
        for nk, lo, hi in zip(n, s_lo, s_hi, strict=True)
    ]
    corr = xp.where(keep[0][:, None] & keep[1][None, :], corr, -xp.inf)

    radius = max(2, math.ceil(2 * sigma_low))
    best: tuple[float, tuple[int, int], tuple[int, int]] | None = None
    scored: list[tuple[float, float, float]] = []
    for peak in _top_peaks(corr, n_peaks, radius, xp):
        wraps = [
            range(p + nk * math.ceil((lo - p) / nk), hi + 1, nk)
            for p, nk, lo, hi in zip(peak, n, s_lo, s_hi, strict=True)
        ]
        for s in [(sy, sx) for sy in wraps[0] for sx in wraps[1]]:
            ov = plausible(s)
            if ov is None:
                continue
            score = ncc(ov[0], ov[1], xp)
            scored.append((float(s[0] + to_shift[0]), float(s[1] + to_shift[1]), score))
            if best is None or score > best[0]:
                best = (score, peak, s)
    if best is None:
        return PairAlignment(d0, d0, 0.0, 0.0, 0.0, 0, 0, n, status="no_candidate")
    _, peak, s_int = best
    s_int = _hill_climb(s_int, plausible, xp)
    s_sub = _refine(a, b, s_int, sigma_low, xp)
    ov = plausible((round(s_sub[0]), round(s_sub[1]))) or _overlap(abp, bbp, s_int)
    score = ncc(ov[0], ov[1], xp) if ov is not None else 0.0
    flat = float(abp.std()) < 1e-9 or float(bbp.std()) < 1e-9
    return PairAlignment(
        shift_yx=(s_sub[0] + to_shift[0], s_sub[1] + to_shift[1]),
        nominal_yx=d0,
        confidence=max(0.0, min(1.0, score)),
        ncc=score,
        peak_ratio=_peak_ratio(corr, peak, radius + 2, xp),
        overlap_area=0 if ov is None else int(ov[0].size),
        n_candidates=len(scored),
        window_yx=n,
        status="flat" if flat else "ok",
        candidates=tuple(sorted(scored, key=lambda c: -c[2])),
    )


def _hill_climb(
    s: tuple[int, int],
    overlap_at: Callable[[tuple[int, int]], tuple[Any, Any] | None],
    xp: ArrayModule,
    max_steps: int = 8,
) -> tuple[int, int]:
    """Integer local maximum of the overlap NCC (8-neighbourhood ascent) starting from ``s``."""

    def score(t: tuple[int, int]) -> float:
        ov = overlap_at(t)
        return -math.inf if ov is None else ncc(ov[0], ov[1], xp)

    cache = {s: score(s)}
    for _ in range(max_steps):
        nbrs = [(s[0] + i, s[1] + j) for i in (-1, 0, 1) for j in (-1, 0, 1) if i or j]
        for t in nbrs:
            if t not in cache:
                cache[t] = score(t)
        t = max(nbrs, key=cache.__getitem__)
        if cache[t] <= cache[s]:
            break
        s = t
    return s


def _refine(
    a: Any,
    b: Any,
    s: tuple[int, int],
    sigma: float,
    xp: ArrayModule,
    iterations: int = 3,
) -> tuple[float, float]:
    """Sub-pixel shift near integer ``s`` by a symmetric gradient (Lucas-Kanade) fit.

    On the overlap ``a[u + s]``, ``b[u]`` (both blurred by ``sigma``) solve in least squares
    ``b - a = (grad a + grad b) / 2 . delta + c0 + c1 y + c2 x + k (a + b) / 2`` (shift plus an
    affine offset and gain between the tiles). 5-point derivatives; the symmetric form is
    unbiased to O(delta^3), unlike a windowed phase-correlation peak, which locks to integers.
    """
    sa = bandpass(a, sigma, 0.0, xp)
    sb = bandpass(b, sigma, 0.0, xp)
    sub = (float(s[0]), float(s[1]))
    for _ in range(iterations):
        ov = _overlap(sa, sb, s)
        if ov is None or min(ov[0].shape) < 3:
            return sub
        oa, ob = ov
        k = 2 if min(oa.shape) >= 7 else 1  # 5-point derivatives, or 3-point on thin overlaps
        gya, gxa = _grad(oa, k)
        gyb, gxb = _grad(ob, k)
        oa, ob = oa[k:-k, k:-k], ob[k:-k, k:-k]
        ny, nx = oa.shape
        yy = xp.broadcast_to(xp.linspace(-1.0, 1.0, ny)[:, None], (ny, nx))
        xx = xp.broadcast_to(xp.linspace(-1.0, 1.0, nx)[None, :], (ny, nx))
        cols = [(gya + gyb) / 2, (gxa + gxb) / 2, xp.ones_like(oa), yy, xx, (oa + ob) / 2]
        m = xp.stack([c.ravel() for c in cols], axis=1)
        e = (ob - oa).ravel()
        scale = xp.sqrt((m * m).sum(axis=0)) + 1e-300
        ms = m / scale
        try:
            theta = xp.linalg.solve(ms.T @ ms, ms.T @ e) / scale
        except np.linalg.LinAlgError:
            return sub
        dy, dx = float(theta[0]), float(theta[1])
        if not (math.isfinite(dy) and math.isfinite(dx)):
            return sub
        sub = (s[0] + dy, s[1] + dx)
        nxt = (round(sub[0]), round(sub[1]))
        if nxt == s:
            break
        s = nxt
    return sub


def _grad(a: Any, k: int) -> tuple[Any, Any]:
    """Central derivatives along y and x on the interior ``[k:-k, k:-k]`` (k=2: 5-point)."""
    c, r = a[:, k:-k], a[k:-k, :]
    if k == 1:
        return (c[2:] - c[:-2]) / 2, (r[:, 2:] - r[:, :-2]) / 2
    gy = (8 * (c[3:-1] - c[1:-3]) - (c[4:] - c[:-4])) / 12
    gx = (8 * (r[:, 3:-1] - r[:, 1:-3]) - (r[:, 4:] - r[:, :-4])) / 12
    return gy, gx


def _nominal(
    shape: tuple[int, ...],
    nominal: tuple[float, float] | None,
    overlap_px: float | None,
    axis: int | None,
) -> tuple[float, float]:
    from_overlap = None
    if overlap_px is not None:
        if axis not in (0, 1):
            raise ValueError("overlap_px needs axis 0 (vertical) or 1 (horizontal neighbours)")
        v = [0.0, 0.0]
        v[axis] = float(shape[axis]) - float(overlap_px)
        from_overlap = (v[0], v[1])
    if nominal is None:
        if from_overlap is None:
            raise ValueError("give nominal_shift_yx, or overlap_px and axis")
        return from_overlap
    d0 = (float(nominal[0]), float(nominal[1]))
    if from_overlap is not None and abs(from_overlap[axis] - d0[axis]) > 1.0:  # type: ignore[index]
        raise ValueError(f"overlap_px={overlap_px} disagrees with nominal_shift_yx={d0}")
    return d0


def _whitened(
    fa: Any,
    fb: Any,
    n: tuple[int, int],
    sigma_low: float,
    sigma_high: float,
    whiten_power: float,
    xp: ArrayModule,
) -> Any:
    """Cross-power spectrum ``fa conj(fb) / |.| ** whiten_power`` (1: pure phase correlation),
    weighted by the DoG band-pass."""
    cross = fa * xp.conj(fb)
    mag = xp.abs(cross)
    cross = cross / (mag + 1e-12 * float(mag.max()) + 1e-300) ** whiten_power
    ky = xp.asarray(np.fft.fftfreq(n[0]))[:, None]
    kx = xp.asarray(np.fft.fftfreq(n[1]))[None, :]
    k2 = ky**2 + kx**2
    weight = xp.exp(-2 * math.pi**2 * sigma_low**2 * k2)
    if sigma_high > 0:
        weight = weight - xp.exp(-2 * math.pi**2 * sigma_high**2 * k2)
    return cross * weight


def _finite(a: Any, xp: ArrayModule) -> Any:
    """NaN/inf replaced by the mean of the finite pixels (0 if none)."""
    ok = xp.isfinite(a)
    if bool(ok.all()):
        return a
    fill = float(a[ok].mean()) if bool(ok.any()) else 0.0
    return xp.where(ok, a, fill)


def _windowed(a: Any, alpha: float, xp: ArrayModule) -> Any:
    w = xp.asarray(np.outer(tukey(a.shape[0], alpha), tukey(a.shape[1], alpha)))
    return (a - a.mean()) * w


def _overlap(a: Any, b: Any, s: tuple[int, int]) -> tuple[Any, Any] | None:
    """Views of ``a[u + s]`` and ``b[u]`` over their common support (None if empty)."""
    sl_a, sl_b = [], []
    for na, nb, si in zip(a.shape, b.shape, s, strict=True):
        lo, hi = max(0, -si), min(nb, na - si)
        if hi <= lo:
            return None
        sl_a.append(slice(lo + si, hi + si))
        sl_b.append(slice(lo, hi))
    return a[tuple(sl_a)], b[tuple(sl_b)]


def _peak_ratio(corr: Any, peak: tuple[int, int], radius: int, xp: ArrayModule) -> float:
    """Height of ``peak`` over the highest value outside its (circular) neighbourhood."""
    ny, nx = corr.shape
    rest = corr.copy()
    rr = xp.asarray(np.arange(-radius, radius + 1))
    rest[xp.ix_((peak[0] + rr) % ny, (peak[1] + rr) % nx)] = -xp.inf
    other = float(rest.max())
    top = float(corr[peak])
    if not other > 0:
        return math.inf
    return top / other
