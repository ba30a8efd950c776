"""Per-tile products as NIfTI-1 files in psoct-toolbox's layout (`tilepipe process-tile`).

Names: ``<prefix>_<product>.nii`` with the toolbox's product keys: volumes ``dBI`` [dB],
``R3D`` (retardance, degrees) and ``O3D`` (optic-axis orientation, degrees); en-face maps
``aip`` and ``mip`` [dB], ``ret`` [deg], ``ori`` [deg], ``biref`` (delta-n, dimensionless) and
``surf`` (depth index, 1-based like the toolbox's files). ``<prefix>`` is the raw name up to
``_spectral``/``_processed`` (the toolbox's rule), e.g. ``mosaic_001_image_0001``.

Array orientation (the toolbox's MATLAB arrays): axis 0 = A-line within a B-line (x), axis 1 =
B-line (y), axis 2 = depth (z, index 0 the shallowest bin unless flip_z); maps are written
X x Y x 1 (the toolbox's Save2DAs3D). The affine is diagonal: pixel sizes in mm (x and y from
``lattice.pixel_size_um``, z from ``lattice.axial_pixel_um`` for volumes, the slice thickness
for maps), origin 0; ``xyzt_units`` says mm. Each file's ``descrip`` names its unit, and
``<prefix>_products.json`` records units, conventions, calibration and parameters.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from services.io.atomic import atomic_file
from services.io.nifti import write_nifti

VOLUMES = {"dBI": ("db", "dB"), "R3D": ("retardance", "deg"), "O3D": ("orientation", "deg")}
MAPS = {
    "aip": ("aip", "dB"),
    "mip": ("mip", "dB"),
    "ret": ("enface_retardance", "deg"),
    "ori": ("enface_orientation", "deg"),
    "biref": ("birefringence", "delta-n"),
    "surf": ("surface", "index, 1-based"),
}


def product_prefix(raw_name: str) -> str:
    """The toolbox's output prefix of a raw tile name (``<prefix>_spectral_*`` ->
    ``<prefix>``; complex ``<prefix>_processed*`` likewise), else the name without suffix."""
    stem = Path(raw_name).name
    for suffix in (".nii.gz", ".nii", ".raw", ".tif", ".tiff"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    match = re.match(r"^(.*?)_(spectral|processed|complex)(_.*)?$", stem)
    return match.group(1) if match and match.group(1) else stem


def write_tile_products(
    products: Any,
    out_dir: Path,
    prefix: str,
    *,
    pixel_size_um: float,
    axial_pixel_um: float,
    slice_thickness_um: float,
    metadata: dict[str, Any],
) -> list[Path]:
    """Write every product of one tile (``kernels.pipeline.TileProducts``) as NIfTI; returns
    the paths written (each atomically)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    px = pixel_size_um / 1000.0
    written = []
    for key, (attr, unit) in VOLUMES.items():
        vol = getattr(products, attr).transpose(1, 0, 2)  # [B, A, Z] -> (A, B, Z)
        path = out_dir / f"{prefix}_{key}.nii"
        write_nifti(
            path, vol, (px, px, axial_pixel_um / 1000.0), f"tilepipe {key} [{unit}] x=A y=B z"
        )
        written.append(path)
    for key, (attr, unit) in MAPS.items():
        img = np.asarray(getattr(products, attr), dtype=np.float32)
        if key == "surf":
            img = img + 1.0  # the toolbox's files count depth from 1
        path = out_dir / f"{prefix}_{key}.nii"
        write_nifti(
            path,
            img.T[:, :, None],
            (px, px, slice_thickness_um / 1000.0),
            f"tilepipe {key} [{unit}] x=A y=B",
        )
        written.append(path)
    sidecar = out_dir / f"{prefix}_products.json"
    doc = {
        "products": {
            **{
                k: {"array": "x=A-line, y=B-line, z=depth", "unit": u}
                for k, (_, u) in VOLUMES.items()
            },
            **{k: {"array": "x=A-line, y=B-line, 1", "unit": u} for k, (_, u) in MAPS.items()},
        },
        "pixel_size_mm": {"x": px, "y": px, "z_volume": axial_pixel_um / 1000.0},
        "surface_index_base": 1,
        "device": products.device,
        **metadata,
    }
    with atomic_file(sidecar) as tmp:
        tmp.write_text(json.dumps(doc, indent=1, default=_jsonable))
    written.append(sidecar)
    return written


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, tuple | set):
        return list(value)
    if isinstance(value, np.generic):
        return value.item()
    return str(value)
