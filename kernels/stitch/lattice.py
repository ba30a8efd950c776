"""Tile lattices: row-major tile indices, neighbour pairs, nominal positions, pair alignment."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from kernels.stitch.phasecorr import align_pair
from kernels.stitch.solve import PairMeasurement

__all__ = ["align_lattice", "lattice_pairs", "nominal_lattice"]


def lattice_pairs(rows: int, cols: int) -> list[tuple[int, int, int]]:
    """Neighbour pairs ``(i, j, axis)`` of a ``rows x cols`` lattice, tile index ``r * cols + c``.

    ``axis`` 1: ``j`` is the right neighbour of ``i``; 0: ``j`` is below ``i``.
    """
    out = [(r * cols + c, r * cols + c + 1, 1) for r in range(rows) for c in range(cols - 1)]
    out += [(r * cols + c, (r + 1) * cols + c, 0) for r in range(rows - 1) for c in range(cols)]
    return out


def nominal_lattice(
    rows: int, cols: int, tile_shape: tuple[int, int], overlap: float | tuple[float, float]
) -> np.ndarray:
    """Nominal ``(y, x)`` positions (rows * cols, 2) for a fractional ``overlap`` (y, x)."""
    ov = (overlap, overlap) if isinstance(overlap, int | float) else overlap
    step = (tile_shape[0] * (1 - ov[0]), tile_shape[1] * (1 - ov[1]))
    r, c = np.divmod(np.arange(rows * cols), cols)
    return np.stack([r * step[0], c * step[1]], axis=1).astype(np.float64)


def align_lattice(
    tiles: Sequence[Any | None],
    nominal_yx: Any,
    rows: int,
    cols: int,
    **align_kwargs: Any,
) -> list[PairMeasurement]:
    """Align every neighbour pair of the lattice (``None`` tiles give ``alignment=None``).

    ``align_kwargs`` go to :func:`kernels.stitch.phasecorr.align_pair`.
    """
    if len(tiles) != rows * cols:
        raise ValueError(f"expected {rows * cols} tiles, got {len(tiles)}")
    p0 = np.asarray(nominal_yx, dtype=np.float64)
    out = []
    for i, j, axis in lattice_pairs(rows, cols):
        a, b = tiles[i], tiles[j]
        if a is None or b is None:
            out.append(PairMeasurement(i, j, None))
            continue
        d0 = p0[j] - p0[i]
        al = align_pair(a, b, (float(d0[0]), float(d0[1])), axis=axis, **align_kwargs)
        out.append(PairMeasurement(i, j, al))
    return out
