"""`tilepipe check MANIFEST`: pre-flight verification before an acquisition starts.

Besides the roots and free space, it reads what is already in the acquisition's directory the
way the watcher and convert will: every name against the pattern, every tile's size against its
mosaic's layout, every NIfTI header, and every calibration file, and names each mismatch.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from services.core.config import Config
from services.core.errors import ManifestError, NotRegularFile, RawFormatError
from services.core.manifest import NIFTI_HEADER_BYTES, Manifest, load_manifest
from services.core.regular_files import file_kind, open_regular
from services.io.rawio import header_notes
from services.state.acquisitions import check_acquisition

FLOAT32 = 4
EXAMPLES = 8  # names shown per kind of mismatch


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def expected_output_bytes(manifest: Manifest) -> tuple[int, int]:
    """Rough (work root, output root) bytes an acquisition will need.

    Work: the converted tile (about the raw size) and three float32 product volumes over the
    kept depth per tile. Output: five float32 en-face mosaics per slice and mosaic, plus a third
    for the pyramid levels.
    """
    lat = manifest.lattice
    try:
        depth = manifest.spectrometer().n_depth
    except ManifestError:
        depth = manifest.raw.samples // 2
    work = out = 0
    for m in range(lat.mosaics):
        g = manifest.geometry(m)
        raw = g.raw
        per_tile = raw.expected_bytes + 3 * raw.bscans * raw.alines * depth * FLOAT32
        dy, dx = g.step_px
        mosaic_px = (dy * (g.rows - 1) + raw.bscans) * (dx * (g.cols - 1) + raw.alines)
        work += per_tile * g.tiles * lat.slices
        out += int(5 * mosaic_px * FLOAT32 * 4 / 3) * lat.slices
    return work, out


def _examples(items: list[str]) -> str:
    shown = ", ".join(items[:EXAMPLES])
    return shown + (f" (+{len(items) - EXAMPLES} more)" if len(items) > EXAMPLES else "")


def check_files(manifest: Manifest, acq_dir: Path) -> list[Check]:
    """Names, sizes and headers of the files already in an acquisition directory, and the
    calibration files the manifest names."""
    checks = []
    missing = []
    for field, name in manifest.calibration.files().items():
        path = (acq_dir / name).resolve()
        if not path.is_file():
            missing.append(
                f"{field} = {name!r} ({'not a regular file' if path.exists() else 'not found'})"
            )
    if manifest.calibration.files():
        checks.append(
            Check(
                "calibration files present",
                not missing,
                _examples(missing) if missing else ", ".join(manifest.calibration.files().values()),
            )
        )
    unexpected, outside, wrong_size, bad_header, notes, special = [], [], [], [], [], []
    tiles: dict = {}
    for path in sorted(acq_dir.rglob("*")):
        rel = path.relative_to(acq_dir).as_posix()
        if any(part.startswith(".") for part in path.relative_to(acq_dir).parts):
            continue
        if path.is_dir():
            continue
        if rel == Path(manifest.source or "manifest.toml").name or manifest.ignored(rel):
            continue
        try:
            tile = manifest.parse(rel)
        except ValueError as exc:
            outside.append(str(exc))
            continue
        if tile is None:
            unexpected.append(rel)
            continue
        try:
            st = path.stat()
        except OSError as exc:
            special.append(f"{rel} ({exc.strerror or exc})")
            continue
        if not stat.S_ISREG(st.st_mode):
            special.append(f"{rel} (not a regular file: {file_kind(st.st_mode)})")
            continue
        tiles.setdefault(tile, []).append(rel)
        layout = manifest.geometry(tile.mosaic).raw
        size, want = st.st_size, layout.expected_bytes
        if layout.format != "tiff" and size != want:
            kind = "smaller: incomplete or truncated" if size < want else "larger"
            wrong_size.append(f"{rel}: {size} bytes, expected {want} ({kind})")
            continue
        if layout.format in ("nifti-spectral", "nifti-complex"):
            try:
                with open_regular(path, rel) as fh:  # swapped for a FIFO since the stat
                    head = fh.read(NIFTI_HEADER_BYTES)
                notes.extend(f"{rel}: {n}" for n in header_notes(head, layout, rel))
            except NotRegularFile as exc:
                special.append(str(exc))
            except RawFormatError as exc:
                bad_header.append(str(exc))
    doubles = [
        f"{t.slice}/{t.token()}: {', '.join(names)}" for t, names in tiles.items() if len(names) > 1
    ]
    checks.append(
        Check(
            "tile files match the manifest",
            not (unexpected or outside or wrong_size or bad_header or doubles or special),
            "; ".join(
                part
                for part in (
                    f"{len(tiles)} of {manifest.tiles} tiles present",
                    unexpected
                    and f"{len(unexpected)} unexpected names (not the pattern "
                    f"{manifest.pattern!r}): {_examples(unexpected)}",
                    outside and f"{len(outside)} outside the lattice: {_examples(outside)}",
                    wrong_size and f"{len(wrong_size)} of the wrong size: {_examples(wrong_size)}",
                    bad_header and f"{len(bad_header)} unreadable headers: {_examples(bad_header)}",
                    doubles and f"{len(doubles)} tiles with several files: {_examples(doubles)}",
                    special and f"{len(special)} special files: {_examples(special)}",
                )
                if part
            ),
        )
    )
    if notes:
        checks.append(Check("header notes (accepted)", True, _examples(notes)))
    return checks


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
    grids = ", ".join(
        f"{g.illumination} {g.rows}x{g.cols} tiles of {g.raw.alines}x{g.raw.bscans} A-lines"
        for g in map(manifest.geometry, range(lat.mosaics))
    )
    checks.append(
        Check(
            "manifest valid",
            True,
            f"{manifest.id}: {lat.slices} slices x {lat.mosaics} mosaics ({grids}), "
            f"{manifest.raw.format}, {manifest.processing.preset} conventions",
        )
    )
    first = next(iter(manifest.coords()))
    checks.append(
        Check(
            "published names",
            True,
            f"raw archives {manifest.published_name('raw_archive', tile=first)}, mosaics "
            f"{manifest.published_name('mosaic', slice_index=0, mosaic=0)} (DANDI subject "
            f"sub-{manifest.subject})",
        )
    )
    roots = config.roots
    raw = Path(roots.raw)
    raw_ok = raw.is_dir() and os.access(raw, os.R_OK | os.X_OK)
    checks.append(Check("raw root readable", raw_ok, str(raw)))
    where = Path(manifest_path).resolve()
    inside = raw_ok and where.is_relative_to(raw.resolve())
    checks.append(
        Check(
            "manifest under the raw root",
            bool(inside),
            "the watcher finds acquisitions by their manifest under the raw root",
        )
    )
    if inside:  # the watcher's own rules, by the watcher's own code
        try:
            check_acquisition(manifest, where.relative_to(raw.resolve()).as_posix())
            checks.append(Check("events valid", True, "acq_started, tile_arrived, acq_finished"))
        except ManifestError as exc:
            checks.append(Check("events valid", False, str(exc)))
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
    checks.extend(check_files(manifest, Path(manifest_path).resolve().parent))
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
