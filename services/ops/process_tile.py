"""`tilepipe process-tile RAW --manifest MANIFEST --out DIR`: one tile, offline, as NIfTI.

The same calibration, conventions and kernels as the pipeline's convert and process stages
(`Manifest.spectrometer`, `Manifest.processing_params`, `kernels.process_tile`), written in
psoct-toolbox's file layout (:mod:`services.io.nifti_products`): for calibrating a new system and
for comparing with MATLAB output.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

from kernels.backend import get_xp, is_numpy
from kernels.pipeline import process_tile
from messages.events import TileCoord
from services.core.errors import ManifestError, RawFormatError
from services.core.manifest import Manifest, load_manifest
from services.io.nifti_products import product_prefix, write_tile_products
from services.io.rawio import read_tile


def tile_of(manifest: Manifest, raw: Path) -> TileCoord | None:
    """The lattice tile a raw file's name belongs to (relative to the manifest's directory,
    else by its base name), or None when it does not match the pattern."""
    candidates = []
    if manifest.source is not None:
        with contextlib.suppress(ValueError):
            candidates.append(raw.resolve().relative_to(manifest.source.parent).as_posix())
    candidates.append(raw.name)
    for rel in candidates:
        try:
            tile = manifest.parse(rel)
        except ValueError:
            continue
        if tile is not None:
            return tile
    return None


def process_tile_command(args) -> int:
    """Run one tile through the kernels and write its products; 0 ok, 2 bad input."""
    raw = Path(args.raw)
    try:
        manifest = load_manifest(args.manifest)
        tile = tile_of(manifest, raw)
        if args.mosaic is not None:
            mosaic = args.mosaic
        elif tile is not None:
            mosaic = tile.mosaic
        else:
            mosaic = 0
            print(
                f"{raw.name}: not a name of the manifest's pattern {manifest.pattern!r}; "
                f"processing it as mosaic 0 ({manifest.geometry(0).illumination}); "
                "use --mosaic to choose",
                file=sys.stderr,
            )
        geometry = manifest.geometry(mosaic)
        started = time.perf_counter()
        print(f"reading {raw} ({geometry.raw.format}, {geometry.illumination} mosaic {mosaic})")
        data = read_tile(raw, geometry.raw)
        cal = manifest.spectrometer()
        params = manifest.processing_params()
    except (ManifestError, RawFormatError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {raw}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    xp = get_xp(args.device)
    print(
        f"processing {data.shape[0]} B-lines x {data.shape[2]} A-lines on "
        f"{'the CPU' if is_numpy(xp) else 'the GPU'} ({manifest.processing.preset} conventions)"
    )
    products = process_tile(data, cal, params, xp=xp)  # streamed to the device block by block
    computed = time.perf_counter()
    prefix = args.prefix or product_prefix(raw.name)
    paths = write_tile_products(
        products,
        Path(args.out),
        prefix,
        pixel_size_um=geometry.pixel_size_um,
        axial_pixel_um=manifest.lattice.axial_pixel_um,
        slice_thickness_um=manifest.lattice.slice_thickness_um,
        metadata={
            "raw": str(raw),
            "acq": manifest.id,
            "tile": tile.model_dump() if tile is not None else None,
            "mosaic": {"index": mosaic, "illumination": geometry.illumination},
            "conventions": manifest.conventions(),
            "params": params,
            "calibration": cal.describe(),
        },
    )
    done = time.perf_counter()
    print(
        f"wrote {len(paths)} files to {args.out} (read + compute {computed - started:.1f} s, "
        f"write {done - computed:.1f} s): " + ", ".join(p.name for p in paths)
    )
    return 0
