"""The focus plane of an illumination: the depth shift every tile shares, from tile overlaps.

The beam's focus (and the scan's field curvature) adds the same smooth surface ``P(b, a)`` to the
depth of everything a tile sees, at tile pixel ``(b, a)`` (B-line, A-line). Where two placed
tiles overlap they see the same tissue, so their surface maps differ only by the plane:
``surf_A(p - pos_A) - surf_B(p - pos_B) = P(p - pos_A) - P(p - pos_B)``. The tissue's own
surface cancels, and so does P's constant term. :class:`FocusPlaneFit` accumulates the normal
equations of that difference, pair by pair (memory: one pair), for a 2-D polynomial of degree
``degree`` (2: ``b, a, b², b·a, a²`` in coordinates scaled to [0, 1]); :meth:`FocusPlaneFit.solve`
returns its coefficients. :func:`focus_plane` evaluates them on the tile grid with the minimum
at 0 (the lab's normalisation, so the crop window starts ``offset`` samples below the
shallowest focus). Pixels whose tissue signal is below a threshold and, per pair, differences
further than ``outlier_mads`` scaled MADs from that pair's median are left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["FocusPlaneFit", "crop_indices", "focus_plane", "monomials"]


def monomials(degree: int) -> list[tuple[int, int]]:
    """Exponents ``(i, j)`` of ``u^i v^j`` with ``1 <= i + j <= degree`` (no constant)."""
    return [(i, t - i) for t in range(1, degree + 1) for i in range(t, -1, -1)]


def _design(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int], degree: int) -> np.ndarray:
    """``u^i v^j`` columns at tile pixels (rows, cols), u = row / (H - 1), v = col / (W - 1)."""
    u = rows / max(shape[0] - 1, 1)
    v = cols / max(shape[1] - 1, 1)
    return np.stack([u**i * v**j for i, j in monomials(degree)], axis=-1)


@dataclass
class FocusPlaneFit:
    """Least squares of the focus plane from surface differences in tile overlaps."""

    shape: tuple[int, int]
    degree: int = 2
    outlier_mads: float = 3.0
    normal: np.ndarray = field(init=False)
    rhs: np.ndarray = field(init=False)
    samples: int = field(init=False, default=0)
    pairs: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        n = len(monomials(self.degree))
        self.normal = np.zeros((n, n))
        self.rhs = np.zeros(n)

    def add_overlap(
        self,
        surf_a: np.ndarray,
        surf_b: np.ndarray,
        shift_yx: tuple[int, int],
        valid_a: np.ndarray | None = None,
        valid_b: np.ndarray | None = None,
    ) -> int:
        """Add the overlap of tile A and tile B placed ``shift_yx`` (integer pixels) from A;
        returns the samples used. ``valid_*``: where a tile's surface is trusted (tissue)."""
        h, w = self.shape
        dy, dx = int(shift_yx[0]), int(shift_yx[1])
        ya, yb = max(0, dy), min(h, h + dy)
        xa, xb = max(0, dx), min(w, w + dx)
        if ya >= yb or xa >= xb:
            return 0
        a = np.asarray(surf_a, np.float64)[ya:yb, xa:xb]
        b = np.asarray(surf_b, np.float64)[ya - dy : yb - dy, xa - dx : xb - dx]
        ok = np.isfinite(a) & np.isfinite(b)
        if valid_a is not None:
            ok &= np.asarray(valid_a, bool)[ya:yb, xa:xb]
        if valid_b is not None:
            ok &= np.asarray(valid_b, bool)[ya - dy : yb - dy, xa - dx : xb - dx]
        rows, cols = np.nonzero(ok)
        if len(rows) < len(self.rhs) + 1:
            return 0
        diff = (a - b)[ok]
        med = np.median(diff)
        mad = 1.4826 * np.median(np.abs(diff - med))
        keep = np.abs(diff - med) <= self.outlier_mads * max(mad, 0.5)
        rows, cols, diff = rows[keep] + ya, cols[keep] + xa, diff[keep]
        design = _design(rows, cols, self.shape, self.degree) - _design(
            rows - dy, cols - dx, self.shape, self.degree
        )
        self.normal += design.T @ design
        self.rhs += design.T @ diff
        self.samples += len(diff)
        self.pairs += 1
        return len(diff)

    def solve(self) -> list[float]:
        """The non-constant coefficients (order of :func:`monomials`); ValueError without
        enough overlap to determine them."""
        if self.pairs == 0 or np.linalg.matrix_rank(self.normal) < len(self.rhs):
            raise ValueError(
                f"focus plane: {self.pairs} usable overlaps, {self.samples} samples: "
                "not enough to fit it (no tissue in the overlaps?)"
            )
        return [float(c) for c in np.linalg.solve(self.normal, self.rhs)]


def focus_plane(coefficients: list[float], shape: tuple[int, int], degree: int = 2) -> np.ndarray:
    """The plane on the tile grid ``(B, A)`` in depth samples, shifted so its minimum is 0."""
    rows, cols = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    plane = _design(rows, cols, shape, degree) @ np.asarray(coefficients, np.float64)
    return plane - plane.min()


def crop_indices(plane: np.ndarray, offset: int) -> np.ndarray:
    """First kept depth sample of each A-line: ``offset`` + the plane, rounded (int64)."""
    return int(offset) + np.rint(plane).astype(np.int64)
