"""The one NIfTI-1 writer (nibabel): float32 data, a diagonal affine in mm, units in ``descrip``.

Used by the per-tile products (:mod:`services.io.nifti_products`) and the mosaic and axis exports
(:mod:`services.io.exports`). Array orientation is the caller's (the toolbox's: axis 0 = x =
A-line, axis 1 = y = B-line, axis 2 = z); the affine maps voxel (i, j, k) to
``origin_mm + (i, j, k) * zooms_mm``; ``xyzt_units`` say mm; qform and sform both carry it
(code 1, scanner). A ``.nii.gz`` name is gzip-compressed (no timestamp in the gzip header, so
the same data give the same bytes). Written under a temporary name and renamed into place.
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from services.io.atomic import write_atomically

GZIP_LEVEL = 1  # float maps hardly compress better at higher levels, and 5x slower
VECTOR_INTENT = "vector"  # NIfTI intent of a vector field stored along axis 4 (x, y, z, 1, c)


def write_nifti(
    path: Path,
    data: np.ndarray,
    zooms_mm: Sequence[float],
    descrip: str,
    origin_mm: Sequence[float] = (0.0, 0.0, 0.0),
    intent: str | None = None,
) -> Path:
    """Write `data` (3-D, or 5-D (x, y, z, 1, c) with `intent`) as NIfTI-1 at `path` (``.nii``
    or ``.nii.gz``), atomically."""
    import nibabel as nib

    zooms = [float(z) for z in zooms_mm]
    affine = np.diag([*zooms, 1.0])
    affine[:3, 3] = [float(o) for o in origin_mm]
    img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine)
    img.header.set_xyzt_units("mm", "sec")
    extra = [1.0] * (img.ndim - 3)
    img.header.set_zooms((*zooms, *extra))
    img.header["descrip"] = descrip.encode()[:79]
    if intent is not None:
        img.header.set_intent(intent)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    body = img.to_bytes()
    if str(path).endswith(".gz"):
        body = gzip.compress(body, compresslevel=GZIP_LEVEL, mtime=0)
    return write_atomically(Path(path), body)
