"""Where stages put their outputs, relative to the work and output roots (one place)."""

from __future__ import annotations

from messages.events import TileCoord


def _tile_dir(acq: str, kind: str, tile: TileCoord) -> str:
    return f"{acq}/{kind}/slice{tile.slice:04d}/{tile.token()}.zarr"


def converted_path(acq: str, tile: TileCoord) -> str:
    """Work-root-relative Zarr store of a converted raw tile."""
    return _tile_dir(acq, "converted", tile)


def products_path(acq: str, tile: TileCoord) -> str:
    """Work-root-relative Zarr group of a processed tile's products."""
    return _tile_dir(acq, "products", tile)


def archive_path(acq: str, tile: TileCoord) -> str:
    """Work-root-relative archival copy (.nii.gz) of a raw tile, kept until it is uploaded;
    its record (sizes, SHA-256) stays beside it as `<name>.json`."""
    return f"{acq}/archive/slice{tile.slice:04d}/{tile.token()}.nii.gz"


def mosaic_path(acq: str, slice_index: int, mosaic: int) -> str:
    """Output-root-relative OME-Zarr mosaic of one slice."""
    return f"{acq}/mosaics/slice{slice_index:04d}-m{mosaic}.ome.zarr"


def volume_of(mosaic_rel: str) -> str:
    """The fused 3-D dB volume (dBI) beside a slice's en-face mosaic."""
    return volume_product_of(mosaic_rel, "dBI")


def volume_path(acq: str) -> str:
    """Output-root-relative OME-Zarr of an acquisition's registered volume."""
    return f"{acq}/volume/registered.ome.zarr"


def axis_path(acq: str, slice_index: int) -> str:
    """Output-root-relative OME-Zarr of one slice's 3-D optic-axis products (thru-plane)."""
    return f"{acq}/axis/slice{slice_index:04d}.ome.zarr"


def axis_volume_path(acq: str) -> str:
    """Output-root-relative OME-Zarr of the acquisition's stacked axis products."""
    return f"{acq}/volume/axis.ome.zarr"


VOLUME_PRODUCTS = ("dBI", "R3D", "O3D")  # the lab's names of the 3-D volume products


def volume_product_of(mosaic_rel: str, product: str) -> str:
    """A 3-D volume mosaic (dBI, R3D or O3D) beside a slice's en-face mosaic."""
    if product not in VOLUME_PRODUCTS:
        raise ValueError(f"unknown volume product {product!r}; known: {VOLUME_PRODUCTS}")
    return mosaic_rel.replace(".ome.zarr", f"-{product}.ome.zarr")


def focus_plane_path(acq: str, illumination: str) -> str:
    """Output-root-relative record of an illumination's focus plane (found once, reused)."""
    return f"{acq}/focus/focus-{illumination}.json"


def exports_dir(store_rel: str) -> str:
    """The NIfTI files of an OME-Zarr store, in a directory beside it
    (`.../slice0001-m0.ome.zarr` -> `.../slice0001-m0/`)."""
    return store_rel.removesuffix(".ome.zarr")


def previews_dir(acq: str, slice_index: int, label: str) -> str:
    """Output-root-relative directory of one slice's previews (`label`: `m<M>` or `axis`)."""
    return f"{acq}/previews/slice{slice_index:04d}-{label}"


def index_path(acq: str) -> str:
    """Output-root-relative static HTML index of an acquisition's newest previews."""
    return f"{acq}/index.html"
