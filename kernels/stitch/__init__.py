"""Mosaic stitching numerics: pair registration, global positions, fusion (NumPy; ``xp``-ready).

Conventions: coordinates ``(y, x)`` in pixels; a tile's position is the global coordinate of
its pixel ``[0, 0]``; a pair shift is ``position(moving) - position(fixed)`` (total offset).
Lattice tiles are indexed row-major (``r * cols + c``).
"""

from .fuse import Mosaic, feather_weights, fuse, fuse_products, mosaic_frame
from .lattice import align_lattice, lattice_pairs, nominal_lattice
from .phasecorr import PairAlignment, align_pair, bandpass, ncc
from .solve import Layout, PairMeasurement, remove_global_offset, solve_positions

__all__ = [
    "Layout",
    "Mosaic",
    "PairAlignment",
    "PairMeasurement",
    "align_lattice",
    "align_pair",
    "bandpass",
    "feather_weights",
    "fuse",
    "fuse_products",
    "lattice_pairs",
    "mosaic_frame",
    "ncc",
    "nominal_lattice",
    "remove_global_offset",
    "solve_positions",
]
