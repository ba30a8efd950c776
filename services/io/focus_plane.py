"""An illumination's focus plane: found once, on the first stitched slice, stored, reused.

The lab finds the focus plane on the first slice of each illumination from the unfiltered
surface and crops every later slice's volumes with the same plane. Here the first mosaic of an
illumination whose volumes are fused finds it (:func:`fit_from_tiles`: the tiles' unfiltered
surface, ``surface_raw``, in every overlap of the stitched positions, tissue only) and stores
it as a small JSON record under the output root (``<acq>/focus/focus-<illumination>.json``,
created once and atomically: a second writer racing for it keeps the first one's). Later
slices, on any host sharing the output root and after any restart, read that record. Delete
it to find the plane again (the next fused mosaic of that illumination does).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import zarr

from kernels.focus_plane import FocusPlaneFit, focus_plane
from services.io.atomic import create_once

RECORD_VERSION = 1
SURFACE_ARRAYS = ("surface_raw", "surface")  # unfiltered if the products have it


def _maps(group: Path, threshold_db: float) -> tuple[np.ndarray, np.ndarray, str]:
    """(surface, tissue mask, which surface array) of one tile's products group."""
    g = zarr.open_group(str(group), mode="r")
    name = next((n for n in SURFACE_ARRAYS if n in g), None)
    if name is None:
        raise ValueError(f"{group}: no surface map ({' or '.join(SURFACE_ARRAYS)})")
    surface = np.asarray(g[name][:], np.float64)
    aip = np.asarray(g["aip"][:], np.float64)
    with np.errstate(invalid="ignore"):
        return surface, np.isfinite(aip) & (aip > threshold_db), name


def fit_from_tiles(
    tiles: Sequence[tuple[Path, tuple[float, float]]],
    threshold_db: float,
    degree: int = 2,
) -> dict:
    """Fit the plane from every overlapping pair of placed tiles (products group, solved
    (y, x)); the record's fields without its provenance. ValueError if it cannot be fitted."""
    if not tiles:
        raise ValueError("focus plane: no tiles")
    first = zarr.open_group(str(tiles[0][0]), mode="r")
    height, width = (int(n) for n in first["aip"].shape)
    shape = (height, width)
    fit = FocusPlaneFit(shape=shape, degree=degree)
    pos = np.rint(np.array([p for _, p in tiles], np.float64)).astype(int)
    used = set()
    for i in range(len(tiles)):
        for j in range(i + 1, len(tiles)):
            dy, dx = pos[j] - pos[i]
            if abs(dy) >= shape[0] or abs(dx) >= shape[1]:
                continue
            sa, va, name_a = _maps(tiles[i][0], threshold_db)
            sb, vb, name_b = _maps(tiles[j][0], threshold_db)
            fit.add_overlap(sa, sb, (int(dy), int(dx)), va, vb)
            used.update((name_a, name_b))
    coefficients = fit.solve()
    plane = focus_plane(coefficients, shape, degree)
    return {
        "tile_shape": list(shape),
        "degree": degree,
        "coefficients": coefficients,
        "range_samples": float(plane.max()),
        "pairs": fit.pairs,
        "samples": fit.samples,
        "surface": sorted(used),
        "threshold_db": threshold_db,
    }


def load(path: Path) -> dict | None:
    """The stored record, or None if there is none yet."""
    try:
        record = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    if record.get("v") != RECORD_VERSION:
        raise ValueError(f"{path}: focus plane record version {record.get('v')!r}")
    return record


def store(path: Path, record: dict) -> tuple[dict, bool]:
    """Store `record` unless one exists; returns (the stored record, whether it is this one)."""
    body = {
        "v": RECORD_VERSION,
        "axes": ["bline", "aline"],
        "unit": "depth samples (minimum 0)",
        **record,
    }
    created = create_once(Path(path), (json.dumps(body, indent=1) + "\n").encode())
    stored = load(Path(path))
    assert stored is not None
    return stored, created


def plane_of(record: dict, shape: tuple[int, int]) -> np.ndarray:
    """The record's plane on the tile grid; ValueError if it was found for other tiles."""
    if tuple(record["tile_shape"]) != tuple(shape):
        raise ValueError(
            f"focus plane found for tiles {record['tile_shape']}, these are {list(shape)}"
        )
    return focus_plane(record["coefficients"], shape, int(record["degree"]))
