"""NIfTI copies and PNG previews of the OME-Zarr products the lab opens as NIfTI and images.

:func:`export_mosaic` (stitch, after writing a mosaic) and :func:`export_axis` (register's
thru-plane step, after writing a slice's axis products) read the store's level 0 and write:

- NIfTI (``.nii.gz``, :func:`services.io.nifti.write_nifti`) beside the store, in
  :func:`services.io.layout.exports_dir`: one file per product under psoct-toolbox's key (mosaic:
  ``aip mip ret ori biref mask``; axis: ``delta_n inclination azimuth axis vector mask``).
  Arrays are the toolbox's X x Y x 1 (axis 0 = x = A-line = the mosaic's columns, axis 1 = y =
  B-line = its rows); ``axis`` and ``vector`` are vector fields X x Y x 1 x 3 (components
  x, y, z in that frame, intent "vector"). Affine: diagonal, pixel sizes in mm (x, y from the
  store's scale, z the slice thickness), translation = the store's origin (pixel centres) in
  mm and z = slice index x thickness, so a slice's files stack. ``descrip`` names the unit.
- previews (PNG, :mod:`services.io.previews`) under :func:`services.io.layout.previews_dir`, then
  the acquisition's HTML index (:func:`services.io.preview_index.write_index`).

Both return ``{name: output-root-relative path}`` (``nifti.<key>``, ``preview.<key>``), what the
stage lists in its event. With ``force=False`` files already there are kept (a redelivery).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.io.layout import exports_dir, previews_dir
from services.io.nifti import VECTOR_INTENT, write_nifti
from services.io.nifti_products import MAPS
from services.io.omezarr import open_level, read_multiscale
from services.io.preview_index import write_index
from services.io.previews import (
    block_mean,
    grey,
    mask_image,
    orientation_hsv,
    shrink_factor,
    write_png,
)

MASK_UNIT = "1 tissue, 0 not, NaN no data"
AXIAL = frozenset({"orientation", "azimuth", "tilted_orientation"})  # 180-degree periodic
# mosaic channel -> (toolbox key, unit)
MOSAIC_NIFTI = {
    "aip": ("aip", MAPS["aip"][1]),
    "mip": ("mip", MAPS["mip"][1]),
    "retardance": ("ret", MAPS["ret"][1]),
    "orientation": ("ori", MAPS["ori"][1]),
    "birefringence": ("biref", MAPS["biref"][1]),
    "mask": ("mask", MASK_UNIT),
}
AXIS_NIFTI = {
    "delta_n": "delta-n",
    "inclination": "deg",
    "azimuth": "deg",
    "mask": "1 fitted, else 0/NaN",
}
AXIS_VECTORS = {  # key -> (channels, unit)
    "axis": (("axis_x", "axis_y", "axis_z"), "unit vector x,y,z"),
    "vector": (("vector_x", "vector_y", "vector_z"), "axis x dn weight x,y,z"),
}

Renderer = Callable[[Mapping[str, np.ndarray]], np.ndarray | None]
MOSAIC_PREVIEWS: dict[str, Renderer] = {
    "aip": lambda c: grey(c["aip"]),
    "mip": lambda c: grey(c["mip"]),
    "ret": lambda c: grey(c["retardance"]),
    "ori": lambda c: orientation_hsv(c["orientation"], c["retardance"]),
    "biref": lambda c: grey(c["birefringence"]),
    "mask": lambda c: mask_image(c["mask"]) if "mask" in c else None,
}
AXIS_PREVIEWS: dict[str, Renderer] = {
    "inplane": lambda c: np.stack([c["inplane_r"], c["inplane_g"], c["inplane_b"]], -1),
    "throughplane": lambda c: np.stack(
        [c["throughplane_r"], c["throughplane_g"], c["throughplane_b"]], -1
    ),
    "axis3d": lambda c: np.abs(np.stack([c["vector_x"], c["vector_y"], c["vector_z"]], -1)),
    "delta_n": lambda c: grey(c["delta_n"]),
    "mask": lambda c: mask_image(c["mask"]),
}


class _Named(Mapping[str, np.ndarray]):
    """Planes read or computed when asked for, under the names of `self.names`."""

    names: Mapping[str, object]

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


class Channels(_Named):
    """The level-0 planes of a store by channel name, each read when asked for (one plane in
    memory at a time, not the whole stack: a real mosaic is ~6000 x 6000 px per channel)."""

    def __init__(self, store: Path, names: list[str]) -> None:
        self.level = open_level(store, 0)
        self.names = {name: k for k, name in enumerate(names)}

    def __getitem__(self, name: str) -> np.ndarray:
        return np.asarray(self.level[self.names[name]], dtype=np.float32)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.level.shape[1:])  # type: ignore[return-value]


FRAME = "rows = y (B-lines, down), columns = x (A-lines, right)"
GREY = "grey, linear from the 1st to the 99th percentile, NaN black"
PREVIEW_NOTES = {
    "aip": f"aip [dB]: {GREY}",
    "mip": f"mip [dB]: {GREY}",
    "ret": f"retardance [deg]: {GREY}",
    "ori": "orientation [deg]: hue (o + 90)/180 (-90 red, -30 green, +30 blue), value = "
    "retardance 1st-99th percentile",
    "biref": f"birefringence [delta-n]: {GREY}",
    "mask": "mask: white 1, grey 0, black no data",
    "inplane": "in-plane axis azimuth as hue, delta-n as value (inplane_r/g/b)",
    "throughplane": "thru-plane inclination as hue, delta-n as value (throughplane_r/g/b)",
    "axis3d": "|weighted axis vector| x, y, z as R, G, B",
    "delta_n": f"delta-n [dimensionless]: {GREY}",
}


@dataclass(frozen=True)
class ExportKind:
    """What one kind of store is exported as: scalar maps (channel -> (key, unit)), vector
    fields (key -> (channels, unit)) and previews (key -> renderer)."""

    scalars: dict[str, tuple[str, str]]
    vectors: dict[str, tuple[tuple[str, ...], str]]
    previews: dict[str, Renderer]

    @property
    def files(self) -> int:
        """Files written for a store with every channel."""
        return len(self.scalars) + len(self.vectors) + len(self.previews)


MOSAIC = ExportKind(MOSAIC_NIFTI, {}, MOSAIC_PREVIEWS)
AXIS = ExportKind(
    {name: (name, unit) for name, unit in AXIS_NIFTI.items()}, AXIS_VECTORS, AXIS_PREVIEWS
)
MOSAIC_EXPORT_FILES = MOSAIC.files
AXIS_EXPORT_FILES = AXIS.files


class Shrunk(_Named):
    """Channels block-averaged for previews (:func:`services.io.previews.block_mean`), each
    computed once."""

    def __init__(self, channels: Mapping[str, np.ndarray], factor: int) -> None:
        self.names = self.channels = channels
        self.factor = factor
        self.cache: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.cache:
            plane = self.channels[name]
            self.cache[name] = block_mean(plane, self.factor, axial=name in AXIAL)
        return self.cache[name]


def _read(store: Path) -> tuple[Channels, tuple[float, float], tuple[float, float]]:
    """Channels of level 0, pixel size (y, x) and origin (y, x) in micrometres."""
    ome = read_multiscale(store)
    transforms = ome["multiscales"][0]["datasets"][0]["coordinateTransformations"]
    scale = next(t["scale"] for t in transforms if t["type"] == "scale")
    shift = next((t["translation"] for t in transforms if t["type"] == "translation"), [0, 0, 0])
    channels = Channels(store, ome["channel_names"])
    return channels, (float(scale[1]), float(scale[2])), (float(shift[1]), float(shift[2]))


def _geometry(
    pixel_um: tuple[float, float], origin_um: tuple[float, float], slice_index: int, dz_um: float
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    zooms = (pixel_um[1] / 1000.0, pixel_um[0] / 1000.0, dz_um / 1000.0)
    origin = (origin_um[1] / 1000.0, origin_um[0] / 1000.0, slice_index * dz_um / 1000.0)
    return zooms, origin


def _export(
    kind: ExportKind,
    preview_name: str,
    output_root: Path,
    store_rel: str,
    slice_index: int,
    slice_thickness_um: float,
    force: bool,
) -> dict[str, str]:
    """Write `kind`'s files of the store `store_rel` (previews in the slice's `preview_name`
    folder) and the acquisition's preview index; the files' relative paths by name."""
    acq = store_rel.split("/", 1)[0]
    nifti_rel, preview_rel = exports_dir(store_rel), previews_dir(acq, slice_index, preview_name)
    planned = {f"nifti.{key}": f"{nifti_rel}/{key}.nii.gz" for key, _ in kind.scalars.values()}
    planned |= {f"nifti.{key}": f"{nifti_rel}/{key}.nii.gz" for key in kind.vectors}
    planned |= {f"preview.{key}": f"{preview_rel}/{key}.png" for key in kind.previews}
    if not force and all((output_root / p).is_file() for p in planned.values()):
        return planned
    channels, pixel_um, origin_um = _read(output_root / store_rel)
    zooms, origin = _geometry(pixel_um, origin_um, slice_index, slice_thickness_um)
    written: dict[str, str] = {}
    for channel, (key, unit) in kind.scalars.items():
        if channel not in channels:
            continue
        rel = planned[f"nifti.{key}"]
        desc = f"tilepipe {key} [{unit}] x=A y=B"
        write_nifti(output_root / rel, channels[channel].T[:, :, None], zooms, desc, origin)
        written[f"nifti.{key}"] = rel
    for key, (names, unit) in kind.vectors.items():
        if not all(n in channels for n in names):
            continue
        field = np.stack([channels[n].T for n in names], axis=-1)[:, :, None, None, :]
        rel = planned[f"nifti.{key}"]
        desc = f"tilepipe {key} [{unit}] x=A y=B"
        write_nifti(output_root / rel, field, zooms, desc, origin, intent=VECTOR_INTENT)
        written[f"nifti.{key}"] = rel
    shrunk = Shrunk(channels, shrink_factor(channels.shape))
    for key, render in kind.previews.items():
        try:
            image = render(shrunk)
        except KeyError:  # a store without that product
            continue
        if image is None:
            continue
        rel = planned[f"preview.{key}"]
        write_png(output_root / rel, image, f"tilepipe preview {PREVIEW_NOTES[key]}; {FRAME}")
        written[f"preview.{key}"] = rel
    write_index(output_root, acq)
    return written


def export_mosaic(
    output_root: Path,
    store_rel: str,
    slice_index: int,
    mosaic: int,
    slice_thickness_um: float,
    force: bool = True,
) -> dict[str, str]:
    """NIfTI files and previews of one stitched en-face mosaic (module doc)."""
    return _export(
        MOSAIC, f"m{mosaic}", Path(output_root), store_rel, slice_index, slice_thickness_um, force
    )


def export_axis(
    output_root: Path,
    store_rel: str,
    slice_index: int,
    slice_thickness_um: float,
    force: bool = True,
) -> dict[str, str]:
    """NIfTI files and previews of one slice's 3-D optic-axis products (module doc)."""
    return _export(
        AXIS, "axis", Path(output_root), store_rel, slice_index, slice_thickness_um, force
    )
