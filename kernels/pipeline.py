"""Whole-tile processing: raw spectra (or complex Jones tiles) -> PS volumes -> surface -> en-face.

One maths path (:func:`batch_volumes`) runs on every batch of B-lines, driven block by block by
:func:`kernels.streaming.stream_tile` (thread pool on NumPy, pinned buffers and two streams on
CuPy); :func:`process_tile` is that engine with the volumes kept in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from .backend import ArrayModule, is_numpy, resolve_xp, to_host
from .calibration import SpectrometerCalibration
from .spectral import output_depth, tile_background, validate_input
from .streaming import (
    VOLUMES,
    TileMaps,
    batch_volumes,
    bytes_per_bscan,
    choose_batch_bscans,
    stream_tile,
)

__all__ = [
    "ProcessingParams",
    "TileProducts",
    "batch_volumes",
    "bytes_per_bscan",
    "choose_batch_bscans",
    "process_tile",
]


@dataclass(frozen=True)
class ProcessingParams:
    """Knobs of :func:`process_tile` that are not spectrometer calibration.

    Attributes:
        enface_offset: first en-face bin relative to the surface.
        enface_thickness: en-face window length in bins ("inclusive" windows hold one more).
        enface_window: "half-open" (tilepipe) or "inclusive" (psoct-toolbox), see kernels.enface.
        surface_method: "threshold" (tilepipe) or "gradient" (psoct-toolbox).
        surface_threshold_db: surface = first depth this far above the A-line's noise floor.
        surface_smoothing: axial moving-average length for surface detection (bins).
        surface_median: lateral median filter size applied to the surface map.
        wavelength_um: centre wavelength for birefringence as delta-n [um].
        axial_pixel_um: depth per output bin for birefringence as delta-n [um].
        batch_bscans: B-lines per block; None picks one (CPU: 16, GPU: from the memory budget).
        gpu_memory_budget_bytes: device memory the GPU path may use.
        cpu_threads: worker threads on the CPU path; None uses all cores.
    """

    enface_offset: int = 0
    enface_thickness: int = 70
    enface_window: Literal["half-open", "inclusive"] = "half-open"
    surface_method: Literal["threshold", "gradient"] = "threshold"
    surface_threshold_db: float = 20.0
    surface_smoothing: int = 7
    surface_median: int = 3
    wavelength_um: float = 1.3
    axial_pixel_um: float = 2.5
    batch_bscans: int | None = None
    gpu_memory_budget_bytes: int = 4 << 30
    cpu_threads: int | None = None


@dataclass(frozen=True, kw_only=True)
class TileProducts(TileMaps):
    """Host results of one tile: the maps of :class:`~kernels.streaming.TileMaps` ``[B, A]``
    (birefringence as delta-n, surface as a 0-based depth index) and the volumes float32
    ``[B, A, Z]``."""

    db: np.ndarray
    retardance: np.ndarray
    orientation: np.ndarray


def process_tile(
    raw: Any,
    cal: SpectrometerCalibration,
    params: ProcessingParams | None = None,
    xp: ArrayModule | None = None,
    background: Any | None = None,
) -> TileProducts:
    """Full chain for one tile: raw spectra ``uint16[B, 2, A, S]`` or complex Jones B-lines
    ``complex64[B, 2, A, Z]`` (a complex tile: Z = the calibration's full depth, FFT bin order,
    see :func:`kernels.spectral.jones_to_output_depth`); results are host NumPy arrays.

    ``xp`` selects the backend (default: the module of ``raw``; pass ``get_xp("auto")`` to use a
    GPU when present). ``background`` is an optional measured per-channel spectrum ``[2, S]``
    subtracted instead of the estimate from the A-lines. Results do not depend on batch size.
    """
    validate_input(raw, cal)
    params = params or ProcessingParams()
    xp = resolve_xp(xp, raw)
    source = to_host(raw) if is_numpy(xp) else raw
    n_b, _, n_a, _ = raw.shape
    shape = (n_b, n_a, output_depth(raw, cal))
    vols = {name: np.empty(shape, np.float32) for name in VOLUMES}

    def keep(b0: int, b1: int, block: Any) -> None:
        for name, values in block.items():
            vols[name][b0:b1] = values

    # complex tiles: the spectral step (and its background) already ran
    bg = None if raw.dtype.kind == "c" else tile_background(source, cal, background, xp)
    maps = stream_tile(source, cal, params, keep, xp=xp, background=bg)
    return TileProducts(**vars(maps), **vols)
