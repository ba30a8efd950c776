"""Write and read multiscale OME-Zarr images (NGFF 0.5: Zarr v3, ``ome`` attributes, shards).

Layout: one image per store with axes ``(c, y, x)``: a leading channel axis ``c`` holds the
products (e.g. AIP, MIP, retardance, orientation; a single 2-D image gets ``c`` of length 1),
``y``/``x`` are space axes in micrometer. Arrays ``"0"``, ``"1"``, ... are the levels, each 2x
smaller in y and x than the previous (NaN-aware mean of 2x2 blocks; axial channels such as
orientation in degrees use the circular mean of doubled angles), until the smallest side is
<= ``min_size``. float32, NaN fill, chunks ``(1, chunk, chunk)`` inside shards
``(1, shard, shard)``. Per level ``coordinateTransformations`` = scale ``(1, 2^k py, 2^k px)``
and translation ``(0, oy + (2^k - 1) py / 2, ox + (2^k - 1) px / 2)``: the physical position of
pixel centres, so levels overlay exactly (``origin_um`` is the centre of pixel ``[0, 0]``).

Atomicity: the store is written through :func:`services.io.atomic.atomic_directory` (a temporary
name beside the target, fsynced, then renamed into place), so the target name only
ever holds a complete store; a crash leaves at most a ``.tmp-`` directory, which the sweeper
(:func:`services.io.atomic.sweep_temporaries`) removes once its writer is gone. An existing store
at the target is left untouched if its recorded content digest
(``attributes["tilepipe"]["content_sha256"]``: data + metadata) equals the new one; otherwise
it is replaced: atomically on Linux (``renameat2`` exchange), elsewhere by two renames (a brief
window where the name is absent). A target that is not a Zarr store is never replaced
(``FileExistsError``). Concurrent writers to one target are not supported.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from kernels.register import halve
from services.io.atomic import atomic_directory

__all__ = [
    "NGFF_VERSION",
    "WriteResult",
    "doubled_angle_mean",
    "downsample",
    "open_level",
    "pyramid",
    "read_multiscale",
    "write_omezarr",
]

NGFF_VERSION = "0.5"
DEFAULT_AXIAL = ("orientation",)


@dataclass(frozen=True)
class WriteResult:
    """What :func:`write_omezarr` did."""

    path: Path
    shapes: tuple[tuple[int, int, int], ...]  # (c, y, x) per level
    content_sha256: str
    written: bool  # False: an identical store was already there and was left alone


# ----------------------------------------------------------------------------- pyramid
def downsample(stack: np.ndarray, axial: Sequence[bool] | bool = False) -> np.ndarray:
    """2x2 NaN-aware block means of a ``(c, y, x)`` stack in float32; axial channels (angles
    in degrees, period 180) as circular means of doubled angles, in ``[-90, 90)``. The same
    all-NaN blocks give NaN, odd sizes a partial last block."""
    data = np.asarray(stack, dtype=np.float32)
    flags = [bool(axial)] * data.shape[0] if isinstance(axial, bool) else [bool(a) for a in axial]
    out = np.empty((data.shape[0], (data.shape[1] + 1) // 2, (data.shape[2] + 1) // 2), np.float32)
    for k, is_axial in enumerate(flags):
        if is_axial:
            two = np.deg2rad(2.0 * data[k])
            out[k] = doubled_angle_mean(halve(np.cos(two)), halve(np.sin(two)))
        else:
            out[k] = halve(data[k])
    return out


def doubled_angle_mean(cs: np.ndarray, sn: np.ndarray) -> np.ndarray:
    """Angles in degrees in ``[-90, 90)`` from summed cosines and sines of doubled angles."""
    return np.mod(0.5 * np.rad2deg(np.arctan2(sn, cs)) + 90.0, 180.0) - 90.0


def pyramid(
    image: np.ndarray,
    axial: Sequence[bool] | bool = False,
    min_size: int = 256,
    max_levels: int = 16,
) -> list[np.ndarray]:
    """Level 0 plus 2x downsamplings until the smallest spatial side is <= ``min_size``.

    Each level is :func:`downsample` of the one before (float32, channel by channel)."""

    levels = [np.asarray(image, dtype=np.float32)]
    while min(levels[-1].shape[1:]) > min_size and len(levels) < max_levels:
        levels.append(downsample(levels[-1], axial))
    return levels


# ----------------------------------------------------------------------------- write
def write_omezarr(
    path: str | os.PathLike[str],
    image: np.ndarray | Mapping[str, np.ndarray],
    *,
    pixel_size_um: tuple[float, float] = (1.0, 1.0),
    origin_um: tuple[float, float] = (0.0, 0.0),
    channel_names: Sequence[str] | None = None,
    axial_channels: Sequence[str] = DEFAULT_AXIAL,
    chunk: int = 256,
    shard: int = 2048,
    min_size: int = 256,
    max_levels: int = 16,
    name: str | None = None,
    attributes: Mapping[str, Any] | None = None,
    fsync: bool = True,
) -> WriteResult:
    """Write ``image`` as a multiscale NGFF 0.5 OME-Zarr at ``path`` (see module doc).

    ``image``: a (c, y, x) or (y, x) array with ``channel_names``, or a mapping name -> (y, x)
    array (all the same shape). Channels named in ``axial_channels`` are downsampled as axial
    angles in degrees. ``attributes`` (JSON) are stored under ``attributes["tilepipe"]``.
    """
    data, names = _as_stack(image, channel_names)
    if shard % chunk:
        raise ValueError(f"shard ({shard}) must be a multiple of chunk ({chunk})")
    target = Path(path)
    axial = [n in axial_channels for n in names]
    levels = pyramid(data, axial, min_size, max_levels)
    ome = _ome_metadata(levels, names, axial, pixel_size_um, origin_um, name or _stem(target))
    extra = dict(attributes or {})
    digest = _digest(levels[0], {"ome": ome, "tilepipe": extra})
    shapes = tuple((int(lv.shape[0]), int(lv.shape[1]), int(lv.shape[2])) for lv in levels)

    if target.exists() or target.is_symlink():
        if not (target.is_dir() and (target / "zarr.json").is_file()):
            raise FileExistsError(f"{target} exists and is not a Zarr store; not replacing it")
        if _stored_digest(target) == digest:
            return WriteResult(target, shapes, digest, written=False)

    with atomic_directory(target, fsync=fsync) as tmp:
        _write_levels(tmp, levels, ome, extra, digest, chunk, shard)
    return WriteResult(target, shapes, digest, written=True)


def _write_levels(
    tmp: Path,
    levels: list[np.ndarray],
    ome: dict[str, Any],
    extra: dict[str, Any],
    digest: str,
    chunk: int,
    shard: int,
) -> None:
    """Write the store's group and levels under `tmp`."""
    group = zarr.create_group(
        store=str(tmp),
        zarr_format=3,
        attributes={"ome": ome, "tilepipe": {**extra, "content_sha256": digest}},
    )
    for k, lv in enumerate(levels):
        arr = create_tiled_array(group, str(k), lv.shape, ("c", "y", "x"), chunk, shard)
        arr[...] = lv


def create_tiled_array(
    group: zarr.Group,
    name: str,
    shape: Sequence[int],
    dims: Sequence[str],
    chunk: int,
    shard: int,
) -> zarr.Array:
    """A float32 array of NaN in `group`, tiled in (y, x), its last two axes: chunks of
    ``chunk`` x ``chunk`` inside shards of ``shard`` x ``shard`` (both clipped to the plane,
    shards to whole chunks), one along every other axis."""
    *lead, ny, nx = (int(n) for n in shape)
    cy, cx = min(chunk, ny), min(chunk, nx)
    sy = min(shard, math.ceil(ny / cy) * cy) // cy * cy
    sx = min(shard, math.ceil(nx / cx) * cx) // cx * cx
    ones = (1,) * len(lead)
    return group.create_array(
        name=name,
        shape=(*lead, ny, nx),
        dtype="float32",
        chunks=(*ones, cy, cx),
        shards=(*ones, sy, sx),
        fill_value=float("nan"),
        dimension_names=tuple(dims),
    )


def _stem(path: Path) -> str:
    """``slice_003`` for ``slice_003.ome.zarr``."""
    name = path.name
    for suffix in (".zarr", ".ome"):
        name = name.removesuffix(suffix)
    return name or path.name


def _as_stack(
    image: np.ndarray | Mapping[str, np.ndarray], channel_names: Sequence[str] | None
) -> tuple[np.ndarray, list[str]]:
    if isinstance(image, Mapping):
        if channel_names is not None:
            raise ValueError("channel_names comes from the mapping's keys")
        names = [str(k) for k in image]
        arrays = [np.asarray(v) for v in image.values()]
        if not arrays or any(a.ndim != 2 or a.shape != arrays[0].shape for a in arrays):
            raise ValueError("a mapping needs one or more 2-D arrays of one shape")
        data = np.stack(arrays).astype(np.float32)
    else:
        data = np.asarray(image, dtype=np.float32)
        if data.ndim == 2:
            data = data[None]
        if data.ndim != 3:
            raise ValueError(f"image must be (y, x) or (c, y, x), got shape {data.shape}")
        names = (
            list(channel_names)
            if channel_names is not None
            else [f"c{k}" for k in range(data.shape[0])]
        )
    if len(names) != data.shape[0] or len(set(names)) != len(names):
        raise ValueError(f"need {data.shape[0]} distinct channel names, got {names}")
    if min(data.shape[1:]) < 1:
        raise ValueError("empty image")
    return data, names


def _ome_metadata(
    levels: list[np.ndarray],
    names: list[str],
    axial: list[bool],
    pixel_size_um: tuple[float, float],
    origin_um: tuple[float, float],
    name: str,
) -> dict[str, Any]:
    py, px = (float(pixel_size_um[0]), float(pixel_size_um[1]))
    oy, ox = (float(origin_um[0]), float(origin_um[1]))
    datasets = []
    for k in range(len(levels)):
        f = float(2**k)
        datasets.append(
            {
                "path": str(k),
                "coordinateTransformations": [
                    {"type": "scale", "scale": [1.0, f * py, f * px]},
                    {
                        "type": "translation",
                        "translation": [0.0, oy + (f - 1) * py / 2, ox + (f - 1) * px / 2],
                    },
                ],
            }
        )
    return {
        "version": NGFF_VERSION,
        "multiscales": [
            {
                "name": name,
                "axes": [
                    {"name": "c", "type": "channel"},
                    {"name": "y", "type": "space", "unit": "micrometer"},
                    {"name": "x", "type": "space", "unit": "micrometer"},
                ],
                "datasets": datasets,
                "type": "mean",
                "metadata": {
                    "description": "2x2 NaN-aware mean; axial channels: circular mean of "
                    "doubled angles",
                    "axial_channels": [n for n, a in zip(names, axial, strict=True) if a],
                },
            }
        ],
        "omero": {
            "channels": [
                omero_channel(levels[-1][k], n, a)
                for k, (n, a) in enumerate(zip(names, axial, strict=True))
            ]
        },
    }


def omero_channel(plane: np.ndarray, label: str, axial: bool) -> dict[str, Any]:
    """Display hints (from the smallest level): label, colour, window (min/max, 1-99 %)."""
    vals = plane[np.isfinite(plane)]
    if axial:
        lo, hi, start, end = -90.0, 90.0, -90.0, 90.0
    elif vals.size:
        lo, hi = float(vals.min()), float(vals.max())
        start, end = (float(v) for v in np.percentile(vals, [1.0, 99.0]))
    else:
        lo = hi = start = end = 0.0
    return {
        "label": label,
        "color": "FFFFFF",
        "active": True,
        "window": {"min": lo, "max": hi, "start": start, "end": end},
    }


def _digest(level0: np.ndarray, meta: Mapping[str, Any]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode())
    h.update(repr((level0.shape, str(level0.dtype))).encode())
    h.update(memoryview(np.ascontiguousarray(level0)).cast("B"))  # no copy of the data
    return h.hexdigest()


def _stored_digest(store: Path) -> str | None:
    try:
        attrs = json.loads((store / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError):
        return None
    value = attrs.get("tilepipe", {}).get("content_sha256")
    return value if isinstance(value, str) else None


# ----------------------------------------------------------------------------- read
def read_multiscale(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The store's ``ome`` attributes plus ``channel_names`` (from ``omero``, else c0, c1...)."""
    group = zarr.open_group(str(path), mode="r", zarr_format=3)
    ome = dict(group.attrs["ome"])
    if ome.get("version") != NGFF_VERSION or not ome.get("multiscales"):
        raise ValueError(f"{path} is not an NGFF {NGFF_VERSION} multiscale image")
    chans = ome.get("omero", {}).get("channels", [])
    n = group[ome["multiscales"][0]["datasets"][0]["path"]].shape[0]
    labels = [c.get("label") for c in chans]
    ome["channel_names"] = labels if len(labels) == n else [f"c{k}" for k in range(n)]
    return ome


def open_level(path: str | os.PathLike[str], level: int = 0) -> zarr.Array:
    """Open one level (default 0, full resolution) read-only: a lazy (c, y, x) zarr array."""
    ome = read_multiscale(path)
    group = zarr.open_group(str(path), mode="r", zarr_format=3)
    arr = group[ome["multiscales"][0]["datasets"][level]["path"]]
    assert isinstance(arr, zarr.Array)
    return arr
