"""Published names: the lab's BIDS-like file-name templates (manifest ``[names]``) and the
DANDI dataset layout.

A template is a Python format string over a fixed set of fields per product:

- ``project``: ``[names] project`` (default: the manifest id);
- ``slice``: the instrument's slice number, from 1 (``numbering.slice_offset`` included);
- ``tile``: the tile's number within its mosaic, from 1, in scan order (the lab's tile id);
- ``acq``: the mosaic's illumination (``normal``, ``tilted``, ...);
- ``mosaic``: the mosaic's index within the slice, from 0;
- ``modality``: the product's channel (``aip``, ``ret``, ... or ``dBI``, ``R3D``, ``O3D``).

Templates are checked when the manifest is read (so by ``tilepipe check``): only the
product's fields, by name (no positional ``{}``, no ``.attr`` or ``[i]``, no ``!r``); it must
render, end with the product's extension and give a safe file name (letters, digits,
``.``, ``_``, ``-``; no ``/``); and no two artifacts of any products may get one name.

DANDI layout (``[stages.upload] options.layout = "dandi"``): raw archives under
``rawdata/sub-<subject>/micr/``, every product under
``derivatives/tilepipe/sub-<subject>/micr/``, with ``dataset_description.json`` at the top
and in ``derivatives/tilepipe/``.
"""

from __future__ import annotations

import json
import re
import string
from itertools import product as cartesian
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.core.errors import TemplateError

ENFACE_MODALITIES = ("aip", "mip", "ret", "ori", "biref", "surf")
VOLUME_MODALITIES = ("dBI", "R3D", "O3D")
PER_TILE = ("project", "slice", "tile", "acq", "mosaic")
PER_MOSAIC = ("project", "slice", "acq", "mosaic")
PER_SLICE = ("project", "slice")
PER_ACQ = ("project",)
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")
PIPELINE = "tilepipe"


class Kind(BaseModel):
    """What one template names: its fields, modalities and required extension."""

    fields: tuple[str, ...]
    modalities: tuple[str, ...] = ()
    extensions: tuple[str, ...]
    raw: bool = False  # under rawdata/ in the DANDI layout


KINDS: dict[str, Kind] = {
    "raw_archive": Kind(fields=PER_TILE, extensions=(".nii.gz",), raw=True),
    "tile_products": Kind(fields=PER_TILE, extensions=(".zarr",)),
    "mosaic": Kind(fields=PER_MOSAIC, extensions=(".ome.zarr",)),
    "mosaic_enface": Kind(
        fields=(*PER_MOSAIC, "modality"), modalities=ENFACE_MODALITIES, extensions=(".nii.gz",)
    ),
    "mosaic_mask": Kind(fields=PER_MOSAIC, extensions=(".nii.gz",)),
    "mosaic_volume": Kind(
        fields=(*PER_MOSAIC, "modality"), modalities=VOLUME_MODALITIES, extensions=(".ome.zarr",)
    ),
    "slice_axis": Kind(fields=PER_SLICE, extensions=(".nii.gz",)),
    "axis": Kind(fields=PER_SLICE, extensions=(".ome.zarr",)),
    "volume": Kind(fields=PER_ACQ, extensions=(".ome.zarr",)),
    "axis_volume": Kind(fields=PER_ACQ, extensions=(".ome.zarr",)),
}
Template = Annotated[str, Field(min_length=1, max_length=300)]


def template_fields(template: str, what: str) -> set[str]:
    """The named fields a template uses (positional, attribute, index or conversion: error)."""
    used: set[str] = set()
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise TemplateError(f"[names] {what} = {template!r}: not a format string: {exc}") from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name == "" or name.isdigit():
            raise TemplateError(
                f"[names] {what} = {template!r}: positional field {{{name}}}; name a field"
            )
        if not name.isidentifier() or conversion:
            raise TemplateError(
                f"[names] {what} = {template!r}: {{{name}{'!' + conversion if conversion else ''}"
                f"}} is not a plain field name"
            )
        if spec and "{" in spec:
            raise TemplateError(f"[names] {what} = {template!r}: nested fields in a format spec")
        used.add(name)
    return used


class Names(BaseModel):
    """``[names]``: the published file names (defaults: opticstream's name formats)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    project: Annotated[str, Field(max_length=64, pattern=r"^$|^[A-Za-z0-9][A-Za-z0-9_.-]*$")] = ""
    subject: Annotated[str, Field(max_length=64, pattern=r"^$|^[A-Za-z0-9]+$")] = ""
    raw_archive: Template = (
        "{project}_sample-slice{slice:02d}_chunk-{tile:04d}_acq-{acq}_OCT.nii.gz"
    )
    tile_products: Template = (
        "{project}_sample-slice{slice:02d}_chunk-{tile:04d}_acq-{acq}_proc-psoct_OCT.zarr"
    )
    mosaic: Template = "{project}_sample-slice{slice:02d}_acq-{acq}_proc-enface_OCT.ome.zarr"
    mosaic_enface: Template = (
        "{project}_sample-slice{slice:02d}_acq-{acq}_proc-{modality}_OCT.nii.gz"
    )
    mosaic_mask: Template = "{project}_sample-slice{slice:03d}_acq-{acq}_OCT_mask.nii.gz"
    mosaic_volume: Template = (
        "{project}_sample-slice{slice:02d}_acq-{acq}_proc-{modality}_OCT.ome.zarr"
    )
    slice_axis: Template = "{project}_sample-slice{slice:03d}_proc-3daxis_OCT.nii.gz"
    axis: Template = "{project}_sample-slice{slice:03d}_proc-axis_OCT.ome.zarr"
    volume: Template = "{project}_proc-registered_OCT.ome.zarr"
    axis_volume: Template = "{project}_proc-axis_OCT.ome.zarr"

    @model_validator(mode="after")
    def _each_template(self) -> Names:
        for kind, spec in KINDS.items():
            template = getattr(self, kind)
            used = template_fields(template, kind)
            unknown = sorted(used - set(spec.fields))
            if unknown:
                raise TemplateError(
                    f"[names] {kind} = {template!r}: unknown fields {unknown}; "
                    f"allowed: {list(spec.fields)}"
                )
            if not template.endswith(spec.extensions):
                raise TemplateError(
                    f"[names] {kind} = {template!r}: must end with {' or '.join(spec.extensions)}"
                )
        return self

    def label(self, default_project: str) -> tuple[str, str]:
        """(project, subject) with their defaults (subject: the project's letters and digits)."""
        project = self.project or default_project
        subject = self.subject or re.sub(r"[^A-Za-z0-9]", "", project) or "sample"
        return project, subject

    def render(self, kind: str, fields: dict[str, Any]) -> str:
        """One artifact's file name (checked: a safe single path segment)."""
        template = getattr(self, kind)
        used = template_fields(template, kind)
        try:
            name = template.format(**{k: v for k, v in fields.items() if k in used})
        except (KeyError, ValueError, TypeError, IndexError) as exc:
            raise TemplateError(f"[names] {kind} = {template!r} does not render: {exc!r}") from None
        if not SAFE_NAME.match(name) or ".." in name:
            raise TemplateError(
                f"[names] {kind} = {template!r} gives the unsafe name {name!r} "
                "(letters, digits, '.', '_', '-' only; no '/' or '..')"
            )
        return name

    def check(self, project: str, illuminations: list[str], max_slice: int, max_tile: int) -> None:
        """Render every template over a sample of the acquisition's artifacts; TemplateError
        when one does not render or is unsafe, or two artifacts get one name."""
        seen: dict[str, str] = {}
        slices = sorted({1, 2, max(1, max_slice)})
        tiles = sorted({1, 2, max(1, max_tile)})
        mosaics = list(enumerate(illuminations))
        for kind, spec in KINDS.items():
            axes: dict[str, list[Any]] = {"project": [project]}
            if "slice" in spec.fields:
                axes["slice"] = slices
            if "tile" in spec.fields:
                axes["tile"] = tiles
            if "acq" in spec.fields:
                axes["mosaic"] = mosaics
            if "modality" in spec.fields:
                axes["modality"] = list(spec.modalities)
            for combo in cartesian(*axes.values()):
                fields = dict(zip(axes, combo, strict=True))
                if "mosaic" in fields:
                    fields["mosaic"], fields["acq"] = fields["mosaic"]
                name = self.render(kind, fields)
                label = f"{kind} {_describe(fields)}"
                if name in seen:
                    raise TemplateError(
                        f"[names]: {seen[name]} and {label} both get the name {name!r}; "
                        f"add the field that tells them apart to [names] {kind}"
                    )
                seen[name] = label


def _describe(fields: dict[str, Any]) -> str:
    return "(" + ", ".join(f"{k}={v}" for k, v in fields.items() if k != "project") + ")"


def dandi_key(kind: str, subject: str, name: str) -> str:
    """Object key of an artifact in the DANDI layout (relative to the destination)."""
    top = "rawdata" if KINDS[kind].raw else f"derivatives/{PIPELINE}"
    return f"{top}/sub-{subject}/micr/{name}"


def dataset_descriptions(project: str, version: str) -> dict[str, bytes]:
    """The dataset-level files of the DANDI/BIDS layout: key -> JSON bytes."""
    raw = {"Name": project, "BIDSVersion": "1.10.0", "DatasetType": "raw"}
    derived = {
        "Name": f"{project} ({PIPELINE} products)",
        "BIDSVersion": "1.10.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": PIPELINE, "Version": version}],
    }
    return {
        "dataset_description.json": _json(raw),
        f"derivatives/{PIPELINE}/dataset_description.json": _json(derived),
    }


def _json(doc: dict[str, Any]) -> bytes:
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
