"""What a pipeline run left behind, checked: events per subject in the stream (each tile's
once), the tiles' outputs complete and readable, a slice's mosaic valid."""

from __future__ import annotations

import numpy as np
import zarr

from services.core.config import Config
from services.core.manifest import Manifest
from services.io.atomic import is_complete
from services.io.layout import converted_path, mosaic_path, products_path
from services.io.omezarr import open_level, read_multiscale

STREAM = "TILEPIPE"
TILE_KINDS = ("tile_arrived", "tile_converted", "tile_processed")


async def per_subject(js, subjects: str) -> dict[str, int]:
    """Messages in the stream per subject (the exact count, duplicates would show as 2)."""
    info = await js.stream_info(STREAM, subjects_filter=subjects)
    return dict(info.state.subjects or {})


async def count_kind(js, kind: str, acq: str = "*") -> int:
    counts = await per_subject(js, f"tp.{kind}.{acq}.>")
    return sum(counts.values())


async def assert_each_tile_once(js, acq: str, tiles: int, kinds=TILE_KINDS) -> None:
    for kind in kinds:
        counts = await per_subject(js, f"tp.{kind}.{acq}.>")
        assert len(counts) == tiles and set(counts.values()) == {1}, (kind, counts)


def assert_tile_outputs_complete(config: Config, manifest: Manifest) -> None:
    """Every tile's converted recipe and products group is complete and readable."""
    raw = manifest.raw
    for tile in manifest.coords():
        converted = config.roots.work / converted_path(manifest.id, tile)
        products = config.roots.work / products_path(manifest.id, tile)
        assert is_complete(converted) and is_complete(products), tile
        recipe = zarr.open_group(str(converted), mode="r").attrs
        assert recipe["layout"]["alines"] == raw.alines and recipe["calibration"], tile
        group = zarr.open_group(str(products), mode="r")
        assert group.attrs["raw_sha256"].startswith("sha256:")
        aip = np.asarray(group["aip"][:])
        assert aip.shape == (raw.bscans, raw.alines) and np.isfinite(aip).all()


def assert_mosaic_valid(config: Config, acq: str, slice_index: int) -> np.ndarray:
    store = config.roots.output / mosaic_path(acq, slice_index, 0)
    assert read_multiscale(store)["channel_names"][0] == "aip"
    level0 = np.asarray(open_level(store, 0)[:])
    assert np.isfinite(level0[0]).mean() > 0.5
    return level0
