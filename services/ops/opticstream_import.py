"""`tilepipe import-opticstream SCAN_CONFIG.json --out DIR`: the lab's scan configuration as a
tilepipe manifest.

Reads the JSON of opticstream's ``PSOCTScanConfigModel`` (``config/psoct_scan_config.py``) and
writes ``DIR/manifest.toml`` for the instrument's files as they land in DIR: names
``mosaic_%03d_image_%04d_spectral_%04d.nii`` (``.raw`` for 12-bit, ``_processed[_cropped].nii``
for complex tiles), numbers from 1, mosaics counted through the acquisition (slice s holds
mosaics 2s-1 normal and 2s tilted), the column snake grid (Fiji "snake by columns, Up &
Right"), one ``[[mosaic]]`` per illumination with its own grid width and A-lines, and the
toolbox's processing conventions. The calibration files are copied into ``DIR/calibration``.

Fields that change the science and that tilepipe cannot honour are refused with their name;
orchestration and publishing settings that tilepipe does not apply here are listed.
"""

from __future__ import annotations

import json
import re
import shutil
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.core.errors import ImportRefused, ManifestError
from services.core.manifest import (
    SIDECARS,
    Calibration,
    Lattice,
    Manifest,
    MosaicSpec,
    Numbering,
    Processing,
    RawLayout,
    dump_manifest,
    load_manifest,
)
from services.core.names import Names
from services.io.atomic import atomic_file, write_atomically

DEFAULT_TILT_DEG = -15.0  # the lab's tilted illumination (gamma)
SAVING_FORMATS = {
    "spectral": (
        "nifti-spectral",
        "mosaic_{mosaic:03d}_image_{index:04d}_spectral_{counter:04d}.nii",
    ),
    "spectral_12bit": ("raw12", "mosaic_{mosaic:03d}_image_{index:04d}_spectral_{counter:04d}.raw"),
    "processed_with_spectral": (
        "nifti-spectral",
        "mosaic_{mosaic:03d}_image_{index:04d}_spectral_{counter:04d}.nii",
    ),
    "complex": ("nifti-complex", "mosaic_{mosaic:03d}_image_{index:04d}_processed.nii"),
    "complex_with_spectral": (
        "nifti-complex",
        "mosaic_{mosaic:03d}_image_{index:04d}_processed.nii",
    ),
}
COMPLEX_ALT = "mosaic_{mosaic:03d}_image_{index:04d}_processed_cropped.nii"
ACQUISITION_FIELDS = {
    "grid_size_x_normal",
    "grid_size_x_tilted",
    "grid_size_y",
    "tile_size_x_normal",
    "tile_size_x_tilted",
    "tile_size_y",
    "tile_overlap",
    "scan_resolution_3d",
    "tile_saving_type",
    "wavelength_um",
    "slice_thickness_um",
}
NOT_APPLIED = {  # top-level and processing fields tilepipe does not use here, with the reason
    "project_base_path": "tilepipe writes under its configured roots",
    "dandiset_path": "the destination is [stages.upload] options url with layout = 'dandi'",
    "archive_path": "raw tiles are archived by [stages.upload] options archive_raw = true",
    "enface_modalities": "tilepipe computes every en-face product",
    "volume_modalities": "tilepipe computes every volume",
    "stitch_3d_volumes": "set [stages.stitch] options fuse_volume in the tilepipe config",
    "crop_focus_plane_depth": "set [stages.stitch] options volume_depth in the tilepipe config",
    "crop_focus_plane_offset": "set [stages.stitch] options volume_offset in the tilepipe config",
    "matlab_root": "no MATLAB",
    "zarr_config": "tilepipe writes its own OME-Zarr",
    "processing.save_enface_2d_as_3d": "process-tile always writes maps as X x Y x 1",
    "processing.matlab_num_workers": "no MATLAB",
    "processing.matlab_pool_type": "no MATLAB",
    "processing.ori_method_args": "no arguments for circularMean",
    "processing.biref_method_args": "no arguments for the legacy fit",
}
# opticstream's name formats -> [names] templates; its placeholders -> tilepipe's fields
NAME_FORMATS = {
    "archive_tile_name_format": "raw_archive",
    "mosaic_enface_format": "mosaic_enface",
    "mosaic_mask_format": "mosaic_mask",
    "mosaic_volume_format": "mosaic_volume",
    "slice_registered_format": "slice_axis",
}
PLACEHOLDERS = {"project_name": "project", "slice_id": "slice", "tile_id": "tile"}
KNOWN_TOP = {
    "project_name",
    *NAME_FORMATS,
    "mosaics_per_slice",
    "acquisition",
    "processing",
    "mask_threshold_normal",
    "mask_threshold_tilted",
} | {k for k in NOT_APPLIED if "." not in k}


@dataclass
class ImportReport:
    manifest: Manifest
    notes: list[str] = field(default_factory=list)


def _get(data: dict, path: str, default: Any = None) -> Any:
    node: Any = data
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _refuse(field_name: str, value: Any, why: str) -> ImportRefused:
    return ImportRefused(f"{field_name} = {value!r}: {why}")


def acquisition_id(project_name: str) -> str:
    """A tilepipe acquisition id from a project name (letters, digits, - and _)."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "-", project_name).strip("-")[:64]
    return cleaned or "acquisition"


def name_template(field_name: str, fmt: Any) -> str:
    """An opticstream name format as a [names] template (its placeholders renamed)."""
    if not isinstance(fmt, str) or not fmt:
        raise _refuse(field_name, fmt, "a non-empty format string")
    out = []
    try:
        parsed = list(string.Formatter().parse(fmt))
    except ValueError as exc:
        raise _refuse(field_name, fmt, f"not a format string ({exc})") from None
    for text, name, spec, conversion in parsed:
        out.append(text.replace("{", "{{").replace("}", "}}"))
        if name is not None:
            name = PLACEHOLDERS.get(name, name)
            out.append(
                "{"
                + name
                + (f"!{conversion}" if conversion else "")
                + (f":{spec}" if spec else "")
                + "}"
            )
    return "".join(out)


def build_manifest(
    config: dict[str, Any],
    *,
    wave_pixel_mat: str | None,
    dispersion_file: str | None,
    slices: int,
    first_slice: int,
    acq_id: str | None = None,
) -> ImportReport:
    """The manifest for a scan configuration (calibration file names as given)."""
    notes: list[str] = []
    if not isinstance(config, dict):
        raise ImportRefused("the scan configuration must be a JSON object")
    project = config.get("project_name")
    if not isinstance(project, str) or not project:
        raise _refuse("project_name", project, "required, a non-empty string")
    acq = config.get("acquisition")
    if not isinstance(acq, dict):
        raise _refuse("acquisition", acq, "required, an object (PSOCTAcquisitionParams)")
    unknown = set(acq) - ACQUISITION_FIELDS
    if unknown:
        raise _refuse(f"acquisition.{sorted(unknown)[0]}", acq[sorted(unknown)[0]], "unknown field")
    for name in ("grid_size_x_normal", "grid_size_x_tilted", "grid_size_y"):
        if not isinstance(acq.get(name), int) or acq[name] < 1:
            raise _refuse(f"acquisition.{name}", acq.get(name), "required, an integer >= 1")
    for key in sorted(set(config) - KNOWN_TOP):
        if not key.startswith(("_", "block_")):
            notes.append(f"not applied: {key} (unknown to PSOCTScanConfigModel)")
    for key, why in NOT_APPLIED.items():
        if _get(config, key) is not None:
            notes.append(f"not applied: {key} ({why})")

    saving = acq.get("tile_saving_type", "spectral")
    if saving not in SAVING_FORMATS:
        raise _refuse("acquisition.tile_saving_type", saving, f"one of {sorted(SAVING_FORMATS)}")
    raw_format, pattern = SAVING_FORMATS[saving]
    ignore = list(SIDECARS)
    if saving == "complex_with_spectral":
        ignore.append("*_spectral_*")
        notes.append("tile_saving_type complex_with_spectral: the complex tiles are processed")
    if saving == "processed_with_spectral":
        ignore.append("*_processed*")
        notes.append(
            "tile_saving_type processed_with_spectral: the spectral tiles are processed; the "
            "acquisition PC's processed files are ignored"
        )

    res = acq.get("scan_resolution_3d", [0.01, 0.01, 0.0025])
    if not (
        isinstance(res, list | tuple)
        and len(res) == 3
        and all(isinstance(v, int | float) and v > 0 for v in res)
    ):
        raise _refuse("acquisition.scan_resolution_3d", res, "three positive numbers (mm)")
    if abs(res[0] - res[1]) > 1e-9:
        raise _refuse(
            "acquisition.scan_resolution_3d", res, "x and y pixel sizes must be equal in tilepipe"
        )
    overlap = float(acq.get("tile_overlap", 20.0))
    if not 0 <= overlap < 90:
        raise _refuse("acquisition.tile_overlap", overlap, "a percentage in [0, 90)")

    per_slice = config.get("mosaics_per_slice", 2)
    if per_slice not in (2, 3):
        raise _refuse("mosaics_per_slice", per_slice, "2 (normal + tilted) or 3 (macaque)")
    t_normal = float(config.get("mask_threshold_normal", 60.0))
    t_tilted = float(config.get("mask_threshold_tilted", 55.0))
    normal = MosaicSpec(
        illumination="normal",
        cols=acq["grid_size_x_normal"],
        alines=acq.get("tile_size_x_normal", 350),
        mask_threshold_db=t_normal,
    )
    if per_slice == 2:
        mosaics = [
            normal,
            MosaicSpec(
                illumination="tilted",
                tilt_deg=DEFAULT_TILT_DEG,
                cols=acq["grid_size_x_tilted"],
                alines=acq.get("tile_size_x_tilted", 200),
                mask_threshold_db=t_tilted,
            ),
        ]
    else:  # the macaque system: three illuminations, all with the normal grid and tiles
        mosaics = [
            normal,
            normal.model_copy(update={"illumination": "tiltPos", "tilt_deg": -DEFAULT_TILT_DEG}),
            normal.model_copy(update={"illumination": "tiltNeg", "tilt_deg": DEFAULT_TILT_DEG}),
        ]
        pattern = "processed_{file:04d}.nii"
        notes.append(
            "mosaics_per_slice 3: files processed_NNNN.nii are read with the file number "
            "cycling through the three mosaics of a slice (normal, tiltPos, tiltNeg)"
        )
        if raw_format == "nifti-complex":
            raise _refuse("acquisition.tile_saving_type", saving, "with mosaics_per_slice 3")

    proc = config.get("processing") or {}
    if not isinstance(proc, dict):
        raise _refuse("processing", proc, "an object (PSOCTProcessingParams)")
    ori = proc.get("ori_method", "circularMean")
    if ori != "circularMean":
        raise _refuse("processing.ori_method", ori, "tilepipe implements circularMean only")
    biref = proc.get("biref_method", "legacy")
    if biref not in ("legacy", ""):
        raise _refuse("processing.biref_method", biref, "tilepipe implements the legacy fit only")
    surface = str(proc.get("surface_spec", "gradient") or "gradient").strip()
    if surface != "gradient":
        raise _refuse("processing.surface_spec", surface, "tilepipe implements 'gradient' only")
    offset = proc.get("enface_offset", 0)
    depth = proc.get("enface_depth", 70)
    if not isinstance(offset, int) or not isinstance(depth, int) or depth < 1:
        raise _refuse("processing.enface_depth", depth, "integers, depth >= 1")
    if proc.get("disp_comp_file") and not dispersion_file:
        dispersion_file = str(proc["disp_comp_file"])

    processing = Processing(
        preset="toolbox",
        # the toolbox conjugates J: flipPhase false is tilepipe's sign -1
        orientation_sign=1 if proc.get("flip_phase", False) else -1,
        orientation_offset_deg=float(proc.get("phase_offset_deg", 100.0)),
        # its flipZ = true undoes the flip its complex files carry: no net flip
        flip_z=not bool(proc.get("flip_z", True)),
        enface_offset=offset,
        enface_thickness=depth,
    )
    calibration = Calibration(
        wave_pixel_mat=wave_pixel_mat,
        channel2_reversed=True,
        dispersion_file=dispersion_file,
        center_wavelength_um=float(acq.get("wavelength_um", 1.3)),
    )
    if not dispersion_file:
        notes.append("no dispersion file: no dispersion compensation (pass --dispersion)")
    names = {"project": acquisition_id(project)}
    for field_name, kind in NAME_FORMATS.items():
        if config.get(field_name) is not None:
            names[kind] = name_template(field_name, config[field_name])
    try:
        manifest = Manifest(
            id=acq_id or acquisition_id(project),
            names=Names(**names),
            description=f"imported from opticstream scan config {project!r}",
            lattice=Lattice(
                slices=slices,
                mosaics=len(mosaics),
                rows=acq["grid_size_y"],
                cols=acq["grid_size_x_normal"],
                scan_order="snake-by-columns-up-right",
                overlap=overlap / 100.0,
                pixel_size_um=res[0] * 1000.0,
                axial_pixel_um=res[2] * 1000.0,
                slice_thickness_um=float(acq.get("slice_thickness_um", 500.0)),
            ),
            mosaic=mosaics,
            numbering=Numbering(base=1, mosaic="global", slice_offset=first_slice - 1),
            pattern=pattern,
            alt_patterns=[COMPLEX_ALT] if raw_format == "nifti-complex" else [],
            raw=RawLayout(
                format=raw_format,
                samples=2048,
                alines=acq.get("tile_size_x_normal", 350),
                bscans=acq.get("tile_size_y", 350),
            ),
            calibration=calibration,
            processing=processing,
            settle_s=5.0,
            ignore=ignore,
        )
    except (ValueError, ManifestError) as exc:
        raise ImportRefused(
            f"the scan configuration does not make a valid manifest: {exc}"
        ) from None
    return ImportReport(manifest, notes)


MOSAIC_NUMBER = re.compile(r"^mosaic_([0-9]{1,6})_image_[0-9]+_")


def slices_present(out: Path, per_slice: int) -> tuple[int, int] | None:
    """(first, last) 1-based instrument slice numbers of the tiles already in `out`."""
    numbers = [int(m.group(1)) for p in out.glob("mosaic_*") if (m := MOSAIC_NUMBER.match(p.name))]
    if not numbers:
        return None
    return (min(numbers) - 1) // per_slice + 1, (max(numbers) - 1) // per_slice + 1


def import_command(args) -> int:
    """Write DIR/manifest.toml (and DIR/calibration/*); 0 ok, 2 refused."""
    out = Path(args.out)
    target = out / "manifest.toml"
    try:
        config = json.loads(Path(args.scan_config).read_text())
    except FileNotFoundError:
        print(f"error: {args.scan_config}: not found", file=sys.stderr)
        return 2
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        print(f"error: {args.scan_config}: not a JSON scan configuration: {exc}", file=sys.stderr)
        return 2
    if target.exists() and not args.force:
        print(f"error: {target} exists (use --force to replace it)", file=sys.stderr)
        return 2
    if args.calibration is None:
        print(
            "error: no wavelength calibration: pass --calibration wave-pixel.mat (the toolbox "
            "keeps its default in +psoct/data)",
            file=sys.stderr,
        )
        return 2
    per_slice = config.get("mosaics_per_slice", 2) if isinstance(config, dict) else 2
    present = slices_present(out, per_slice if per_slice in (2, 3) else 2) if out.is_dir() else None
    first = args.first_slice or (present[0] if present else 1)
    slices = args.slices or (present[1] - first + 1 if present else 1)
    cal_dir = out / "calibration"
    names = {}
    for key, source in (("mat", args.calibration), ("dispersion", args.dispersion)):
        if source is not None:
            if not Path(source).is_file():
                print(f"error: {source}: calibration file not found", file=sys.stderr)
                return 2
            names[key] = f"calibration/{Path(source).name}"
    try:
        report = build_manifest(
            config,
            wave_pixel_mat=names.get("mat"),
            dispersion_file=names.get("dispersion"),
            slices=max(1, slices),
            first_slice=max(1, first),
            acq_id=args.id,
        )
    except ImportRefused as exc:
        print(f"error: {args.scan_config}: {exc}", file=sys.stderr)
        return 2
    manifest = report.manifest
    external = manifest.calibration.dispersion_file
    if external and not external.startswith("calibration/"):
        source = Path(external)
        if not source.is_file():
            print(f"error: processing.disp_comp_file {external}: not found", file=sys.stderr)
            return 2
        names["dispersion"] = f"calibration/{source.name}"
        args.dispersion = source
        manifest = manifest.model_copy(
            update={
                "calibration": manifest.calibration.model_copy(
                    update={"dispersion_file": names["dispersion"]}
                )
            }
        )
    cal_dir.mkdir(parents=True, exist_ok=True)
    for key, source in (("mat", args.calibration), ("dispersion", args.dispersion)):
        if key in names:
            with atomic_file(out / names[key]) as tmp:
                shutil.copyfile(source, tmp)
    write_atomically(target, dump_manifest(manifest))
    try:  # the calibration must load as written
        load_manifest(target).spectrometer()
    except ManifestError as exc:
        print(
            f"error: {target}: written, but the calibration does not load: {exc}", file=sys.stderr
        )
        return 2
    lat = manifest.lattice
    print(
        f"wrote {target}: {manifest.id}, {lat.slices} slice(s) from instrument slice {first}, "
        + ", ".join(
            f"{g.illumination} {g.rows}x{g.cols} tiles of {g.raw.alines} A-lines"
            for g in map(manifest.geometry, range(lat.mosaics))
        )
        + f", {manifest.raw.format}, toolbox conventions"
    )
    for note in report.notes:
        print(f"  {note}")
    if present is None and not args.slices:
        print("  no tiles in the directory yet: expecting 1 slice (pass --slices N)")
    return 0
