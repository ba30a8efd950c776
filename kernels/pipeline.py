"""Whole-tile processing: raw spectra (or complex Jones tiles) -> PS volumes -> surface -> en-face.

One maths path (:func:`batch_volumes`) runs on every batch of B-lines. On NumPy batches are
spread over a thread pool (the kernels release the GIL). On CuPy the tile is streamed through
pinned host buffers with a copy stream and a compute stream, so the host->device copy of batch
i+1 overlaps the compute of batch i; the batch size keeps device memory within the budget.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from .backend import ArrayModule, array_module, device_name, is_numpy, resolve_xp, to_host
from .calibration import SpectrometerCalibration
from .enface import (
    enface_products,
    gradient_surface_candidates,
    median_filter_2d,
    surface_candidates,
)
from .psoct import ps_products
from .spectral import (
    as_background,
    bscans_to_complex,
    estimate_background,
    jones_to_output_depth,
    output_depth,
    validate_input,
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
        batch_bscans: B-lines per batch; None picks one (CPU: 1, GPU: from the memory budget).
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


@dataclass(frozen=True)
class TileProducts:
    """Host results of one tile: volumes float32 ``[B, A, Z]``, maps ``[B, A]`` (birefringence
    as delta-n, surface as a 0-based depth index)."""

    db: np.ndarray
    retardance: np.ndarray
    orientation: np.ndarray
    aip: np.ndarray
    mip: np.ndarray
    enface_retardance: np.ndarray
    enface_orientation: np.ndarray
    birefringence: np.ndarray
    surface: np.ndarray
    device: str


def batch_volumes(
    x: Any,
    cal: SpectrometerCalibration,
    params: ProcessingParams,
    background: Any | None = None,
    xp: ArrayModule | None = None,
) -> tuple[Any, Any, Any, Any]:
    """(dB, retardance, orientation ``[b, A, Z]``, surface candidates ``[b, A]``) of a batch of
    raw spectra ``uint16[b, 2, A, S]`` or of complex Jones B-lines ``complex64[b, 2, A, Z]``."""
    xp = resolve_xp(xp, x)
    if x.dtype.kind == "c":
        jones = jones_to_output_depth(x, cal, xp)
    else:
        jones = bscans_to_complex(x, cal, background, xp)
    vols = ps_products(jones, cal, xp)
    if params.surface_method == "gradient":
        cand = gradient_surface_candidates(vols.db, xp=xp)
    else:
        cand = surface_candidates(
            vols.db, params.surface_threshold_db, params.surface_smoothing, xp=xp
        )
    return vols.db, vols.retardance, vols.orientation, cand


def bytes_per_bscan(a_lines: int, cal: SpectrometerCalibration) -> int:
    """Rough peak device memory per B-line in a batch (inputs, temporaries, products)."""
    area_s = a_lines * cal.n_samples
    area_z = a_lines * cal.n_depth
    return 42 * area_s + 68 * area_z


def choose_batch_bscans(
    n_bscans: int, a_lines: int, cal: SpectrometerCalibration, budget_bytes: int
) -> int:
    """Largest batch (>= 1, <= n_bscans) whose working set fits ``budget_bytes``."""
    return max(1, min(n_bscans, int(budget_bytes) // bytes_per_bscan(a_lines, cal)))


def _finish(
    db: Any, ret: Any, ori: Any, cand: Any, params: ProcessingParams, xp: ArrayModule
) -> tuple[Any, Any]:
    surface = median_filter_2d(cand, params.surface_median, xp)
    maps = enface_products(
        db,
        ret,
        ori,
        surface,
        params.enface_offset,
        params.enface_thickness,
        xp,
        window=params.enface_window,
        wavelength_um=params.wavelength_um,
        axial_pixel_um=params.axial_pixel_um,
    )
    return surface, maps


def _products(vols: tuple[Any, Any, Any], surface: Any, maps: Any, device: str) -> TileProducts:
    return TileProducts(
        db=to_host(vols[0]),
        retardance=to_host(vols[1]),
        orientation=to_host(vols[2]),
        aip=to_host(maps.aip),
        mip=to_host(maps.mip),
        enface_retardance=to_host(maps.retardance),
        enface_orientation=to_host(maps.orientation),
        birefringence=to_host(maps.birefringence),
        surface=to_host(surface),
        device=device,
    )


def _background_for(
    raw: Any, cal: SpectrometerCalibration, background: Any | None, xp: ArrayModule
) -> Any | None:
    """Explicit background as ``float32[2, 1, S]`` on ``xp``, the tile estimate, or None."""
    if raw.dtype.kind == "c":
        return None  # complex tiles: the spectral step (and its background) already ran
    if background is not None:
        return as_background(background, cal, xp)
    if cal.background_scope == "tile":
        return xp.asarray(estimate_background(raw, cal, array_module(raw)))
    return None


def _process_host(
    raw: np.ndarray, cal: SpectrometerCalibration, params: ProcessingParams, bg: Any | None
) -> TileProducts:
    n_b, _, n_a, _ = raw.shape
    shape = (n_b, n_a, output_depth(raw, cal))
    db, ret, ori = (np.empty(shape, np.float32) for _ in range(3))
    cand = np.empty((n_b, n_a), np.int32)
    step = max(1, int(params.batch_bscans or 1))
    bounds = [(b0, min(n_b, b0 + step)) for b0 in range(0, n_b, step)]

    def work(b: tuple[int, int]) -> None:
        sl = slice(*b)
        db[sl], ret[sl], ori[sl], cand[sl] = batch_volumes(raw[sl], cal, params, bg, np)

    threads = min(len(bounds), params.cpu_threads or os.cpu_count() or 1)
    if threads > 1:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(work, bounds))
    else:
        for b in bounds:
            work(b)
    surface, maps = _finish(db, ret, ori, cand, params, np)
    return _products((db, ret, ori), surface, maps, "cpu")


def _process_device(
    raw: Any,
    cal: SpectrometerCalibration,
    params: ProcessingParams,
    bg: Any | None,
    xp: ArrayModule,
) -> TileProducts:
    import cupyx  # only reached with CuPy

    n_b, _, n_a, n_s = raw.shape
    in_dtype = raw.dtype
    n_z = output_depth(raw, cal)
    shape = (n_b, n_a, n_z)
    vol_bytes = 3 * 4 * n_b * n_a * n_z
    budget = int(params.gpu_memory_budget_bytes)
    keep_on_device = vol_bytes <= budget // 2
    batch_budget = budget - (vol_bytes if keep_on_device else 0)
    step = params.batch_bscans or choose_batch_bscans(n_b, n_a, cal, batch_budget)
    bounds = [(b0, min(n_b, b0 + step)) for b0 in range(0, n_b, step)]
    on_device_input = not isinstance(raw, np.ndarray)

    if keep_on_device:
        vols = tuple(xp.empty(shape, xp.float32) for _ in range(3))
    else:
        vols = tuple(cupyx.empty_pinned(shape, np.float32) for _ in range(3))
    cand = xp.empty((n_b, n_a), xp.int32)

    copy_stream = xp.cuda.Stream(non_blocking=True)
    compute_stream = xp.cuda.Stream(non_blocking=True)
    entry = xp.cuda.Event(disable_timing=True)
    entry.record()  # work already queued on the caller's stream (device input, background)
    compute_stream.wait_event(entry)
    slots = 2
    copied = [xp.cuda.Event(disable_timing=True) for _ in range(slots)]
    released = [xp.cuda.Event(disable_timing=True) for _ in range(slots)]
    if not on_device_input:
        pinned = [cupyx.empty_pinned((step, 2, n_a, n_s), in_dtype) for _ in range(slots)]
        staged = [xp.empty((step, 2, n_a, n_s), in_dtype) for _ in range(slots)]

    def stage(i: int) -> Any:
        b0, b1 = bounds[i]
        if on_device_input:
            return raw[b0:b1]
        s, n = i % slots, b1 - b0
        copied[s].synchronize()  # the previous copy out of pinned[s] has finished
        np.copyto(pinned[s][:n], raw[b0:b1])
        copy_stream.wait_event(released[s])  # compute no longer reads staged[s]
        staged[s][:n].set(pinned[s][:n], stream=copy_stream)
        copied[s].record(copy_stream)
        return staged[s][:n]

    pending = stage(0)
    for i, (b0, b1) in enumerate(bounds):
        x = pending
        if i + 1 < len(bounds):
            pending = stage(i + 1)  # H2D of the next batch runs while this one computes
        compute_stream.wait_event(copied[i % slots])
        with compute_stream:
            db, ret, ori, c = batch_volumes(x, cal, params, bg, xp)
            released[i % slots].record(compute_stream)
            cand[b0:b1] = c
            for dst, src in zip(vols, (db, ret, ori), strict=True):
                if keep_on_device:
                    dst[b0:b1] = src
                else:
                    src.get(stream=compute_stream, out=dst[b0:b1])
    compute_stream.synchronize()

    with compute_stream:
        if keep_on_device:
            surface, maps = _finish(*vols, cand, params, xp)
        else:
            surface, maps = _finish(*vols, to_host(cand), params, np)
        result = _products(vols, surface, maps, device_name(xp))
    compute_stream.synchronize()
    return result


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
    if is_numpy(xp):
        host = to_host(raw)
        return _process_host(host, cal, params, _background_for(host, cal, background, np))
    return _process_device(raw, cal, params, _background_for(raw, cal, background, xp), xp)
