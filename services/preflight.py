"""`tilepipe check MANIFEST`: pre-flight verification before an acquisition starts."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from services.config import Config
from services.manifest import Manifest, ManifestError, load_manifest

FLOAT32 = 4


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def expected_output_bytes(manifest: Manifest) -> tuple[int, int]:
    """Rough (work root, output root) bytes an acquisition will need.

    Work: the converted tile (uint16, about the raw size) and three float32 product volumes
    over the kept depth per tile. Output: five float32 en-face mosaics per slice and mosaic,
    plus a third for the pyramid levels.
    """
    raw, lat = manifest.raw, manifest.lattice
    try:
        depth = manifest.spectrometer().n_depth
    except ManifestError:
        depth = raw.samples // 2
    per_tile = raw.values * 2 + 3 * raw.bscans * raw.alines * depth * FLOAT32
    dy, dx = manifest.step_px
    mosaic_px = (dy * (lat.rows - 1) + raw.bscans) * (dx * (lat.cols - 1) + raw.alines)
    per_mosaic = int(5 * mosaic_px * FLOAT32 * 4 / 3)
    return per_tile * lat.tiles, per_mosaic * lat.slices * lat.mosaics


def _writable(root: Path) -> str | None:
    try:
        with tempfile.NamedTemporaryFile(dir=root, prefix=".tilepipe-check-"):
            pass
    except OSError as exc:
        return str(exc)
    return None


def run_checks(manifest_path: Path, config: Config) -> list[Check]:
    """Every check, in order; a failed manifest stops the ones that need it."""
    checks: list[Check] = []
    try:
        manifest = load_manifest(manifest_path)
    except ManifestError as exc:
        return [Check("manifest valid", False, str(exc))]
    lat = manifest.lattice
    checks.append(
        Check(
            "manifest valid",
            True,
            f"{manifest.id}: {lat.slices} slices x {lat.mosaics} mosaics x "
            f"{lat.rows}x{lat.cols} tiles, {manifest.raw.format}",
        )
    )
    roots = config.roots
    raw = Path(roots.raw)
    raw_ok = raw.is_dir() and os.access(raw, os.R_OK | os.X_OK)
    checks.append(Check("raw root readable", raw_ok, str(raw)))
    inside = raw_ok and Path(manifest_path).resolve().is_relative_to(raw.resolve())
    checks.append(
        Check(
            "manifest under the raw root",
            bool(inside),
            "the watcher finds acquisitions by their manifest under the raw root",
        )
    )
    for name in ("work", "output"):
        root = Path(getattr(roots, name))
        problem = "missing" if not root.is_dir() else _writable(root)
        checks.append(
            Check(
                f"{name} root writable",
                problem is None,
                f"{root}" + (f": {problem}" if problem else ""),
            )
        )
    try:
        cal = manifest.spectrometer()
        checks.append(
            Check("calibration loads", True, f"{cal.n_samples} samples -> {cal.n_depth} depth bins")
        )
    except ManifestError as exc:
        checks.append(Check("calibration loads", False, str(exc)))
    work_need, out_need = expected_output_bytes(manifest)
    for name, need in (("work", work_need), ("output", out_need)):
        root = Path(getattr(roots, name))
        if not root.is_dir():
            continue
        free = shutil.disk_usage(root).free
        checks.append(
            Check(
                f"free space on {name} root",
                free >= need,
                f"need about {need / 1e9:.2f} GB, {free / 1e9:.2f} GB free",
            )
        )
    return checks
