"""Global tile positions from pairwise shifts: weighted least squares with a weak stage prior.

Minimises, separately in y and x,

    sum_accepted w_ij (p_j - p_i - d_ij)^2  +  prior_weight * sum_tiles (p_t - p0_t)^2

where ``d_ij`` is the measured shift ``position(j) - position(i)`` (see
:mod:`kernels.stitch.phasecorr`), ``w_ij = confidence ** weight_power`` and ``p0`` are the
nominal (stage) positions. The weak prior fixes each connected component's translation to the
stage model (its mean offset from nominal is ~0); its pull on measured pairs is
``O(prior_weight / w)``. A tile without any accepted pair is then placed at its stage offset
from its placed neighbours (its nominal position moved by their mean correction from
nominal), so a stage error shared by a region (drift, backlash) carries over to it; with no
placed neighbour at all it stays at its nominal position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kernels.backend import ArrayModule, resolve_xp, to_host
from kernels.stitch.phasecorr import PairAlignment

__all__ = ["Layout", "PairMeasurement", "remove_global_offset", "solve_positions"]


@dataclass(frozen=True)
class PairMeasurement:
    """A measured (or missing) shift between tiles ``i`` and ``j``: ``position(j) - position(i)``.

    ``alignment`` is None when either tile is missing.
    """

    i: int
    j: int
    alignment: PairAlignment | None


@dataclass
class Layout:
    """Solved mosaic layout. Positions are ``(y, x)`` of each tile's pixel ``[0, 0]``."""

    positions_yx: np.ndarray  # (n_tiles, 2) float64
    residuals_yx: np.ndarray  # (n_pairs, 2): solved (p_j - p_i) - measured; NaN if unmeasured
    accepted: np.ndarray  # (n_pairs,) bool
    reasons: list[str]  # per pair, "" when accepted
    weights: np.ndarray  # (n_pairs,) weight used in the final solve (0 if rejected)
    component: np.ndarray  # (n_tiles,) connected component over accepted pairs; -1 missing
    stage_only: np.ndarray  # (n_tiles,) bool: present, no accepted pair: placed by stage model
    present: np.ndarray  # (n_tiles,) bool: tile exists

    @property
    def residual_rms_px(self) -> float:
        """RMS length of the residuals of the accepted pairs (0 if none)."""
        r = self.residuals_yx[self.accepted]
        return float(np.sqrt((r**2).sum(axis=1).mean())) if len(r) else 0.0


def solve_positions(
    nominal_yx: Any,
    pairs: Sequence[PairMeasurement],
    *,
    present: Any = None,
    min_confidence: float = 0.2,
    min_peak_ratio: float = 0.0,
    stage_tol_px: float = 10.0,
    residual_tol_px: float = 1.5,
    outlier_rounds: int = 3,
    prior_weight: float = 1e-3,
    weight_power: float = 2.0,
    xp: ArrayModule | None = None,
) -> Layout:
    """Solve tile positions from pair shifts, anchored weakly to the stage positions.

    A pair is rejected (``reasons`` says which) when a tile is missing (``"missing_tile"``),
    the aligner found nothing (``"no_candidate"``/``"flat"``), its confidence is below
    ``min_confidence`` or its peak ratio below ``min_peak_ratio`` (``"low_confidence"``), or
    its shift differs from the nominal one by more than ``stage_tol_px`` on an axis
    (``"stage_inconsistent"``). Then up to ``outlier_rounds`` times the accepted pair with the
    largest residual is rejected (``"residual"``) if that residual exceeds ``residual_tol_px``,
    and the system re-solved. Dense normal equations: fine up to a few thousand tiles.
    """
    p0 = np.asarray(to_host(nominal_yx), dtype=np.float64)
    if p0.ndim != 2 or p0.shape[1] != 2:
        raise ValueError("nominal_yx must have shape (n_tiles, 2)")
    n, m = len(p0), len(pairs)
    pres = np.ones(n, bool) if present is None else np.asarray(to_host(present), bool).copy()
    ii = np.array([p.i for p in pairs], dtype=np.intp)
    jj = np.array([p.j for p in pairs], dtype=np.intp)
    meas = np.full((m, 2), np.nan)
    weights = np.zeros(m)
    reasons = [""] * m
    for k, pm in enumerate(pairs):
        al = pm.alignment
        if not (0 <= pm.i < n and 0 <= pm.j < n) or pm.i == pm.j:
            raise ValueError(f"pair {k} has invalid tile indices ({pm.i}, {pm.j})")
        if al is None or not (pres[pm.i] and pres[pm.j]):
            reasons[k] = "missing_tile"
            continue
        meas[k] = al.shift_yx
        dev = np.abs(meas[k] - (p0[pm.j] - p0[pm.i]))
        if al.status != "ok":
            reasons[k] = al.status
        elif al.confidence < min_confidence or al.peak_ratio < min_peak_ratio:
            reasons[k] = (
                f"low_confidence (confidence={al.confidence:.2f}, peak_ratio={al.peak_ratio:.2f})"
            )
        elif not np.all(np.isfinite(dev)) or dev.max() > stage_tol_px:
            reasons[k] = f"stage_inconsistent (|shift - nominal|={dev.max():.1f} px)"
        else:
            weights[k] = max(al.confidence, 1e-6) ** weight_power
    accepted = weights > 0

    xp = resolve_xp(xp, nominal_yx)
    pos = _solve(p0, ii, jj, meas, np.where(accepted, weights, 0.0), prior_weight, xp)
    for _ in range(max(0, outlier_rounds)):
        res = np.linalg.norm((pos[jj] - pos[ii]) - meas, axis=1)
        res = np.where(accepted, res, -np.inf)
        if m == 0 or not np.isfinite(res.max()) or res.max() <= residual_tol_px:
            break
        worst = int(np.argmax(res))
        accepted[worst] = False
        reasons[worst] = f"residual ({res[worst]:.2f} px)"
        pos = _solve(p0, ii, jj, meas, np.where(accepted, weights, 0.0), prior_weight, xp)

    comp = _components(n, ii[accepted], jj[accepted])
    degree = np.bincount(np.concatenate([ii[accepted], jj[accepted]]), minlength=n)
    comp[~pres] = -1
    stage_only = pres & (degree == 0)
    pos = _place_by_neighbours(pos, p0, stage_only, ii, jj, pres)
    return Layout(
        positions_yx=pos,
        residuals_yx=(pos[jj] - pos[ii]) - meas if m else np.zeros((0, 2)),
        accepted=accepted,
        reasons=reasons,
        weights=np.where(accepted, weights, 0.0),
        component=comp,
        stage_only=stage_only,
        present=pres,
    )


def _place_by_neighbours(
    pos: np.ndarray,
    p0: np.ndarray,
    unplaced: np.ndarray,
    ii: np.ndarray,
    jj: np.ndarray,
    present: np.ndarray,
) -> np.ndarray:
    """Tiles in ``unplaced`` at nominal + the mean (solved - nominal) correction of their
    present, placed neighbours (lattice pairs ``ii``-``jj``), outward from the placed ones."""
    pos = pos.copy()
    todo = unplaced.copy()
    placed = present & ~unplaced
    links = [(int(a), int(b)) for a, b in zip(ii, jj, strict=True) if present[a] and present[b]]
    while todo.any():
        moved = []
        for t in np.flatnonzero(todo):
            near = [b if a == t else a for a, b in links if t in (a, b)]
            near = [k for k in near if placed[k]]
            if near:
                pos[t] = p0[t] + np.mean([pos[k] - p0[k] for k in near], axis=0)
                moved.append(t)
        if not moved:
            break  # the rest has no placed tile around it: the stage model alone
        todo[moved] = False
        placed[moved] = True
    return pos


def _solve(
    p0: np.ndarray,
    ii: np.ndarray,
    jj: np.ndarray,
    meas: np.ndarray,
    w: np.ndarray,
    prior_weight: float,
    xp: ArrayModule,
) -> np.ndarray:
    """Normal equations ``(B^T W B + lambda I) p = B^T W d + lambda p0`` for both axes at once."""
    n = len(p0)
    use = w > 0
    lam = prior_weight * (float(w[use].mean()) if use.any() else 1.0)
    a = lam * xp.eye(n)
    rhs = lam * xp.asarray(p0)
    if use.any():
        k = np.flatnonzero(use)
        inc = xp.zeros((len(k), n))
        rows = xp.arange(len(k))
        inc[rows, xp.asarray(ii[k])] = -1.0
        inc[rows, xp.asarray(jj[k])] = 1.0
        wk = xp.asarray(w[k])[:, None]
        a = a + inc.T @ (wk * inc)
        rhs = rhs + inc.T @ (wk * xp.asarray(meas[k]))
    return np.asarray(to_host(xp.linalg.solve(a, rhs)), dtype=np.float64)


def _components(n: int, ii: np.ndarray, jj: np.ndarray) -> np.ndarray:
    """Connected-component label per node (union-find), labels 0.. in order of first node."""
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in zip(ii.tolist(), jj.tolist(), strict=True):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    roots = [find(x) for x in range(n)]
    labels: dict[int, int] = {}
    return np.array([labels.setdefault(r, len(labels)) for r in roots], dtype=np.intp)


def remove_global_offset(positions_yx: Any, reference_yx: Any, mask: Any = None) -> np.ndarray:
    """``positions - mean(positions - reference)`` over ``mask``: compare layouts up to a
    global translation (which the pair measurements cannot determine)."""
    p = np.asarray(to_host(positions_yx), float)
    r = np.asarray(to_host(reference_yx), float)
    sel = np.ones(len(p), bool) if mask is None else np.asarray(mask, bool)
    off = (p[sel] - r[sel]).mean(axis=0) if sel.any() else np.zeros(2)
    return p - off
