"""The registered volume of an acquisition: a growing multiscale OME-Zarr (NGFF 0.5, Zarr v3).

Layout: one image with axes ``(c, z, y, x)``: channels are the en-face products (``aip``,
``mip``, ``retardance``, ``orientation``, ``birefringence``), ``z`` is the slice index, ``y``
and ``x`` are space axes in micrometer. Arrays ``"0"``, ``"1"``, ... are the levels, each 2x
smaller in y and x only (z is never downsampled, so a slice never touches another's data).
Chunks ``(1, 1, chunk, chunk)`` inside shards ``(1, 1, shard, shard)``: writing slice ``k``
writes only the chunks of plane ``z = k`` at every level, so appending or redoing a slice never
rewrites another. The z extent grows (metadata only) as slices arrive; unwritten planes read
as NaN (the fill value).

Canvas: fixed by the reference slice (slice 0): its mosaic grid grown by a margin on every
side (``Canvas.offset_yx``). Each slice is resampled into it with its composed transform;
what falls outside is cropped (the fraction is recorded per plane). A canvas that no longer
matches the reference slice (slice 0 re-stitched to another size) recreates the volume.

Optional dB volume: subgroup ``db`` (an NGFF image with axes ``(z, y, x)``), ``depth`` planes
per slice at ``z = slice * depth + d``, chunks of one plane, same canvas and levels.

Per-plane records (transform, quality, inputs) live in ``attributes["tilepipe"]["planes"]``;
``zarr.json`` attribute updates are written atomically (temporary file + rename). Creation is
atomic (temporary directory + rename). One writer per volume.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from kernels.register import halve
from services.io.atomic import atomic_directory, write_atomically
from services.io.omezarr import (
    NGFF_VERSION,
    create_tiled_array,
    doubled_angle_mean,
    omero_channel,
)

__all__ = ["Canvas", "Volume", "level_shapes"]

DB_GROUP = "db"


@dataclass(frozen=True)
class Canvas:
    """Level-0 frame of a volume: ``canvas px = reference mosaic px + offset_yx``."""

    shape: tuple[int, int]
    offset_yx: tuple[float, float]
    pixel_size_um: tuple[float, float]
    origin_um: tuple[float, float]  # physical centre of canvas pixel [0, 0]
    slice_thickness_um: float
    channels: tuple[str, ...]
    axial: tuple[str, ...] = ("orientation",)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Canvas:
        return Canvas(
            shape=tuple(int(v) for v in data["shape"]),  # type: ignore[arg-type]
            offset_yx=tuple(float(v) for v in data["offset_yx"]),  # type: ignore[arg-type]
            pixel_size_um=tuple(float(v) for v in data["pixel_size_um"]),  # type: ignore[arg-type]
            origin_um=tuple(float(v) for v in data["origin_um"]),  # type: ignore[arg-type]
            slice_thickness_um=float(data["slice_thickness_um"]),
            channels=tuple(data["channels"]),
            axial=tuple(data.get("axial", ())),
        )

    def same_frame(self, other: Canvas) -> bool:
        """Same geometry and channels (the slice thickness is metadata only)."""
        return (self.shape, self.offset_yx, self.pixel_size_um, self.origin_um, self.channels) == (
            other.shape,
            other.offset_yx,
            other.pixel_size_um,
            other.origin_um,
            other.channels,
        )

    def from_reference(self) -> np.ndarray:
        """3x3 matrix: reference-slice mosaic pixel ``(y, x, 1)`` -> canvas pixel."""
        return np.array(
            [[1.0, 0.0, self.offset_yx[0]], [0.0, 1.0, self.offset_yx[1]], [0.0, 0.0, 1.0]]
        )


def level_shapes(
    shape: Sequence[int], min_size: int = 256, max_levels: int = 16
) -> list[tuple[int, int]]:
    """Level shapes as :func:`services.io.omezarr.pyramid` makes them (ceil halving)."""
    out = [(int(shape[0]), int(shape[1]))]
    while min(out[-1]) > min_size and len(out) < max_levels:
        out.append(((out[-1][0] + 1) // 2, (out[-1][1] + 1) // 2))
    return out


def _levels(data: np.ndarray, axial: Sequence[bool], n: int) -> Iterator[np.ndarray]:
    """Level 0 and ``n - 1`` successive :func:`downsample` levels of a ``(c, y, x)`` stack;
    axial channels carry their doubled-angle vectors down (one cos/sin, at level 0)."""
    level = np.asarray(data, dtype=np.float32)
    vectors: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for k, is_axial in enumerate(axial):
        if is_axial:
            two = np.deg2rad(2.0 * level[k])
            vectors[k] = (np.cos(two), np.sin(two))
    yield level
    for _ in range(1, n):
        shape = (level.shape[0], (level.shape[1] + 1) // 2, (level.shape[2] + 1) // 2)
        nxt = np.empty(shape, dtype=np.float32)
        for k in range(level.shape[0]):
            if k in vectors:
                cs, sn = (halve(v) for v in vectors[k])
                vectors[k] = (cs, sn)
                nxt[k] = doubled_angle_mean(cs, sn)
            else:
                nxt[k] = halve(level[k])
        level = nxt
        yield level


def _write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    write_atomically(path, json.dumps(data, indent=1))


def _update_attrs(store: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Apply ``change`` to a group's attributes and rewrite its ``zarr.json`` atomically."""
    meta_path = store / "zarr.json"
    meta = json.loads(meta_path.read_text())
    attrs = meta.setdefault("attributes", {})
    change(attrs)
    _write_json_atomically(meta_path, meta)


def _datasets(n_levels: int, canvas: Canvas, z_um: float, leading: int) -> list[dict[str, Any]]:
    py, px = canvas.pixel_size_um
    oy, ox = canvas.origin_um
    out = []
    for k in range(n_levels):
        f = float(2**k)
        out.append(
            {
                "path": str(k),
                "coordinateTransformations": [
                    {"type": "scale", "scale": [1.0] * (leading - 1) + [z_um, f * py, f * px]},
                    {
                        "type": "translation",
                        "translation": [0.0] * leading
                        + [oy + (f - 1) * py / 2, ox + (f - 1) * px / 2],
                    },
                ],
            }
        )
    return out


def _space_axes() -> list[dict[str, str]]:
    return [
        {"name": "z", "type": "space", "unit": "micrometer"},
        {"name": "y", "type": "space", "unit": "micrometer"},
        {"name": "x", "type": "space", "unit": "micrometer"},
    ]


def _omero(plane: np.ndarray, names: Sequence[str], axial: Sequence[str]) -> dict[str, Any]:
    return {"channels": [omero_channel(plane[k], n, n in axial) for k, n in enumerate(names)]}


class Volume:
    """Open an existing volume store (see the module doc)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.group = zarr.open_group(str(self.path), mode="r+", zarr_format=3)
        meta = dict(self.group.attrs["tilepipe"])
        self.canvas = Canvas.from_dict(meta["canvas"])
        self.n_levels = len(self.group.attrs["ome"]["multiscales"][0]["datasets"])

    # ------------------------------------------------------------------ creation
    @staticmethod
    def create(
        path: str | os.PathLike[str],
        canvas: Canvas,
        *,
        chunk: int = 256,
        shard: int = 2048,
        min_size: int = 256,
        attributes: dict[str, Any] | None = None,
    ) -> Volume:
        """Create an empty volume (one z plane, NaN) atomically, replacing any old one."""
        if shard % chunk:
            raise ValueError(f"shard ({shard}) must be a multiple of chunk ({chunk})")
        target = Path(path)
        shapes = level_shapes(canvas.shape, min_size)
        ome = {
            "version": NGFF_VERSION,
            "multiscales": [
                {
                    "name": target.name.removesuffix(".zarr").removesuffix(".ome"),
                    "axes": [{"name": "c", "type": "channel"}, *_space_axes()],
                    "datasets": _datasets(len(shapes), canvas, canvas.slice_thickness_um, 2),
                    "type": "mean",
                    "metadata": {
                        "description": "2x2 NaN-aware mean in y and x (z is never "
                        "downsampled); axial channels: circular mean of doubled angles",
                        "axial_channels": [n for n in canvas.channels if n in canvas.axial],
                    },
                }
            ],
            "omero": _omero(
                np.full((len(canvas.channels), 1, 1), np.nan), canvas.channels, canvas.axial
            ),
        }
        extra = {
            **(attributes or {}),
            "canvas": canvas.to_dict(),
            "chunk": chunk,
            "shard": shard,
            "min_size": min_size,
            "planes": {},
        }
        with atomic_directory(target) as tmp:
            group = zarr.create_group(
                store=str(tmp), zarr_format=3, attributes={"ome": ome, "tilepipe": extra}
            )
            for k, (ny, nx) in enumerate(shapes):
                shape = (len(canvas.channels), 1, ny, nx)
                create_tiled_array(group, str(k), shape, ("c", "z", "y", "x"), chunk, shard)
        return Volume(target)

    @staticmethod
    def open_or_create(path: str | os.PathLike[str], canvas: Canvas, **kwargs: Any) -> Volume:
        """The volume at ``path`` if it has this canvas's frame, else a new empty one."""
        target = Path(path)
        if (target / "zarr.json").is_file():
            try:
                vol = Volume(target)
            except (KeyError, ValueError, TypeError):
                vol = None
            if vol is not None and vol.canvas.same_frame(canvas):
                return vol
        elif target.exists():
            raise FileExistsError(f"{target} exists and is not a Zarr store; not replacing it")
        return Volume.create(target, canvas, **kwargs)

    # ------------------------------------------------------------------ planes
    @property
    def depth(self) -> int:
        """Number of z planes (slices) the volume spans now."""
        return int(self.group["0"].shape[1])

    def planes(self) -> dict[int, dict[str, Any]]:
        """Per-plane records, by slice index."""
        recs = zarr.open_group(str(self.path), mode="r").attrs["tilepipe"].get("planes", {})
        return {int(k): v for k, v in recs.items()}

    def _grow(self, group: zarr.Group, z: int, leading: int) -> None:
        for k in range(self.n_levels):
            arr = group[str(k)]
            assert isinstance(arr, zarr.Array)
            if arr.shape[leading] <= z:
                shape = list(arr.shape)
                shape[leading] = z + 1
                arr.resize(tuple(shape))

    def write_plane(self, z: int, stack: np.ndarray, record: dict[str, Any]) -> int:
        """Write slice ``z`` (``(c, y, x)`` in canvas pixels, canvas channel order) at every
        level, then its record; returns the bytes of level-0 data written."""
        data = np.asarray(stack, dtype=np.float32)
        c = len(self.canvas.channels)
        if data.shape != (c, *self.canvas.shape):
            raise ValueError(f"plane shape {data.shape} != {(c, *self.canvas.shape)}")
        self._grow(self.group, z, 1)
        axial = [n in self.canvas.axial for n in self.canvas.channels]
        smallest = data
        for k, level in enumerate(_levels(data, axial, self.n_levels)):
            arr = self.group[str(k)]
            assert isinstance(arr, zarr.Array)
            arr[:, z] = level
            smallest = level

        def change(attrs: dict[str, Any]) -> None:
            tp = attrs.setdefault("tilepipe", {})
            tp.setdefault("planes", {})[str(z)] = record
            if z == 0 or not any(
                ch["window"]["max"] != ch["window"]["min"]
                for ch in attrs["ome"]["omero"]["channels"]
            ):
                attrs["ome"]["omero"] = _omero(smallest, self.canvas.channels, self.canvas.axial)

        _update_attrs(self.path, change)
        return data.nbytes

    def read_plane(self, z: int, level: int = 0) -> np.ndarray:
        """Plane ``z`` as ``(c, y, x)`` (NaN where nothing was written)."""
        arr = self.group[str(level)]
        assert isinstance(arr, zarr.Array)
        return np.asarray(arr[:, z])

    # ------------------------------------------------------------------ dB volume
    def db_depth(self) -> int | None:
        """Planes per slice of the dB volume, or None if there is none yet."""
        if DB_GROUP not in self.group:
            return None
        return int(self.group[DB_GROUP].attrs["tilepipe"]["depth"])

    def _db_group(self, depth: int, z_um: float) -> zarr.Group:
        if DB_GROUP in self.group:
            db = self.group[DB_GROUP]
            assert isinstance(db, zarr.Group)
            if int(db.attrs["tilepipe"]["depth"]) != depth:
                raise ValueError(
                    f"dB volume has {db.attrs['tilepipe']['depth']} planes per slice, not {depth}"
                )
            return db
        tp = self.group.attrs["tilepipe"]
        chunk, shard = int(tp["chunk"]), int(tp["shard"])
        shapes = level_shapes(self.canvas.shape, int(tp["min_size"]))
        ome = {
            "version": NGFF_VERSION,
            "multiscales": [
                {
                    "name": "db",
                    "axes": _space_axes(),
                    "datasets": _datasets(len(shapes), self.canvas, z_um, 1),
                    "type": "mean",
                }
            ],
        }
        db = self.group.create_group(
            DB_GROUP, attributes={"ome": ome, "tilepipe": {"depth": depth, "z_um": z_um}}
        )
        for k, (ny, nx) in enumerate(shapes):
            create_tiled_array(db, str(k), (depth, ny, nx), ("z", "y", "x"), chunk, shard)
        return db

    def write_db_block(self, z: int, d0: int, block: np.ndarray, depth: int, z_um: float) -> int:
        """Write dB planes ``d0 .. d0 + len(block)`` of slice ``z`` (``(d, y, x)``, canvas
        pixels) at every level; returns the bytes of level-0 data written."""
        data = np.asarray(block, dtype=np.float32)
        if data.shape[1:] != self.canvas.shape or d0 + data.shape[0] > depth:
            raise ValueError(f"dB block {data.shape} at {d0} does not fit the canvas/depth")
        db = self._db_group(depth, z_um)
        top = (z + 1) * depth - 1
        self._grow(db, top, 0)
        start = z * depth + d0
        for k, level in enumerate(_levels(data, [False] * len(data), self.n_levels)):
            arr = db[str(k)]
            assert isinstance(arr, zarr.Array)
            arr[start : start + level.shape[0]] = level
        return data.nbytes
