"""One tile in B-line blocks, end to end, with memory set by the block size (issue 20).

``stream_tile(source, cal, params, sink)`` reads ``source[b0:b1]`` block by block (a NumPy
array, a read-only ``np.memmap`` of the raw file, a Zarr array: anything sliceable along
B-lines), computes the block's volumes, hands them to ``sink(b0, b1, volumes)`` (e.g. writes
them into a Zarr store) and keeps only what the en-face maps need: the surface of a block needs
its neighbours' surface candidates (the lateral median filter), so each block's maps are
computed one block later, from its own volumes, while the next block is being computed. Peak
memory: a few blocks of volumes plus the [B, A] maps, whatever the tile size.

On the CPU the blocks are read ahead by one thread, computed by ``cpu_threads`` threads (one
B-line batch each; the kernels release the GIL) and written by one thread, so reading, compute
and writing of consecutive blocks overlap. On a GPU (CuPy) each block is staged through two
pinned host buffers on a copy stream while the previous block computes on a compute stream;
the volumes come back into pinned buffers that the writer thread hands to ``sink`` once their
copy has finished; device memory is the block's working set plus two blocks of volumes and
the tile's surface candidates (int32 [B, A], kept on the device for the lateral median).
Results do not depend on the block size.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

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
from .spectral import bscans_to_complex, jones_to_output_depth, output_depth

VOLUMES = ("db", "retardance", "orientation")
MAPS = ("aip", "mip", "enface_retardance", "enface_orientation", "birefringence")
VolumeSink = Callable[[int, int, Mapping[str, np.ndarray]], None]
CPU_BLOCK_BSCANS = 16

__all__ = [
    "VOLUMES",
    "TileMaps",
    "VolumeSink",
    "batch_volumes",
    "bytes_per_bscan",
    "choose_batch_bscans",
    "stream_tile",
]


@dataclass(frozen=True)
class TileMaps:
    """The en-face results of a streamed tile (host arrays ``[B, A]``) and its device."""

    aip: np.ndarray
    mip: np.ndarray
    enface_retardance: np.ndarray
    enface_orientation: np.ndarray
    birefringence: np.ndarray
    surface: np.ndarray
    device: str
    surface_raw: np.ndarray | None = None  # the candidates before the lateral median


class _Finisher:
    """Surface (median of the candidates) and en-face maps of each block, as soon as the
    candidates of the rows around it exist; holds at most the blocks still waiting. The
    candidates stay on ``xp``'s device; only the surface and the maps come to the host."""

    def __init__(self, n_b: int, n_a: int, params: Any, xp: ArrayModule) -> None:
        self.n_b, self.params, self.xp = n_b, params, xp
        self.radius = max(0, int(params.surface_median) // 2)
        self.cand = xp.empty((n_b, n_a), xp.int32)  # stays on the device: no round trip
        self.maps = {name: np.empty((n_b, n_a), np.float32) for name in MAPS}
        self.surface = np.empty((n_b, n_a), np.int32)
        self.surface_raw = np.empty((n_b, n_a), np.int32)
        self.pending: deque[tuple[int, int, tuple[Any, Any, Any]]] = deque()
        self.rows = 0

    def add(self, b0: int, b1: int, vols: tuple[Any, Any, Any], cand: Any) -> None:
        self.cand[b0:b1] = cand
        self.rows = b1
        self.pending.append((b0, b1, vols))
        while self.pending and (
            self.pending[0][1] + self.radius <= self.rows or self.rows == self.n_b
        ):
            self._finish(*self.pending.popleft())

    def _finish(self, b0: int, b1: int, vols: tuple[Any, Any, Any]) -> None:
        xp, p = self.xp, self.params
        lo, hi = max(0, b0 - self.radius), min(self.n_b, b1 + self.radius)
        strip = median_filter_2d(self.cand[lo:hi], p.surface_median, xp)
        surface = strip[b0 - lo : b1 - lo]
        maps = enface_products(
            *vols,
            surface,
            p.enface_offset,
            p.enface_thickness,
            xp,
            window=p.enface_window,
            wavelength_um=p.wavelength_um,
            axial_pixel_um=p.axial_pixel_um,
        )
        self.surface[b0:b1] = to_host(surface)
        self.surface_raw[b0:b1] = to_host(self.cand[b0:b1])  # for the focus plane
        for name, value in zip(
            MAPS,
            (maps.aip, maps.mip, maps.retardance, maps.orientation, maps.birefringence),
            strict=True,
        ):
            self.maps[name][b0:b1] = to_host(value)

    def result(self, device: str) -> TileMaps:
        assert not self.pending, "blocks left unfinished"
        return TileMaps(
            **self.maps, surface=self.surface, device=device, surface_raw=self.surface_raw
        )


def batch_volumes(
    x: Any,
    cal: SpectrometerCalibration,
    params: Any,
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


def _read(source: Any, b0: int, b1: int) -> np.ndarray:
    """One block of the source in host memory (a copy out of a memmap or a store)."""
    return np.ascontiguousarray(source[b0:b1])


def stream_tile(
    source: Any,
    cal: SpectrometerCalibration,
    params: Any,
    sink: VolumeSink | None = None,
    *,
    xp: ArrayModule | None = None,
    background: Any | None = None,
    block_bscans: int | None = None,
) -> TileMaps:
    """Process a tile block by block (see the module docstring); the volumes of each block
    go to ``sink`` (host float32 ``[b, A, Z]``, which the sink must copy or write before it
    returns), the en-face maps come back. ``source`` is ``uint16[B, 2, A, S]`` spectra or
    ``complex64[B, 2, A, Z]`` Jones B-lines (validated by the caller)."""
    n_b, _, n_a, _ = source.shape
    xp = xp if xp is not None else resolve_xp(None, source)
    finisher = _Finisher(n_b, n_a, params, xp)
    if is_numpy(xp):
        step = max(1, int(block_bscans or params.batch_bscans or CPU_BLOCK_BSCANS))
        _stream_host(source, cal, params, background, sink, finisher, step)
        return finisher.result("cpu")
    budget = int(params.gpu_memory_budget_bytes)
    # the block's working set plus two blocks of volumes held for the maps
    step = block_bscans or params.batch_bscans or choose_batch_bscans(n_b, n_a, cal, budget // 2)
    _stream_device(source, cal, params, background, sink, finisher, int(step), xp)
    return finisher.result(device_name(xp))


def _stream_host(source, cal, params, background, sink, finisher, step) -> None:
    n_b, _, n_a, _ = source.shape
    n_z = output_depth(source, cal)
    bounds = [(b0, min(n_b, b0 + step)) for b0 in range(0, n_b, step)]
    threads = max(1, min(step, params.cpu_threads or os.cpu_count() or 1))
    with (
        ThreadPoolExecutor(1, thread_name_prefix="tile-read") as reader,
        ThreadPoolExecutor(1, thread_name_prefix="tile-write") as writer,
        ThreadPoolExecutor(threads, thread_name_prefix="tile-compute") as pool,
    ):
        ahead = reader.submit(_read, source, *bounds[0])
        written: Future | None = None
        for k, (b0, b1) in enumerate(bounds):
            block = ahead.result()
            if k + 1 < len(bounds):
                ahead = reader.submit(_read, source, *bounds[k + 1])
            vols = tuple(np.empty((b1 - b0, n_a, n_z), np.float32) for _ in VOLUMES)
            cand = np.empty((b1 - b0, n_a), np.int32)

            def work(i: int, block=block, vols=vols, cand=cand) -> None:
                out = batch_volumes(block[i : i + 1], cal, params, background, np)
                for dst, src in zip((*vols, cand), out, strict=True):
                    dst[i : i + 1] = src

            list(pool.map(work, range(b1 - b0)))
            finisher.add(b0, b1, vols, cand)
            if sink is not None:
                if written is not None:
                    written.result()  # at most one block waiting to be written
                written = writer.submit(sink, b0, b1, dict(zip(VOLUMES, vols, strict=True)))
        if written is not None:
            written.result()


def _stream_device(source, cal, params, background, sink, finisher, step, xp) -> None:
    import cupyx  # only reached with CuPy

    n_b, _, n_a, last = source.shape
    in_dtype = source.dtype
    on_device_input = not is_numpy(array_module(source))  # else: host array, memmap, store
    bounds = [(b0, min(n_b, b0 + step)) for b0 in range(0, n_b, step)]
    copy_stream = xp.cuda.Stream(non_blocking=True)
    compute_stream = xp.cuda.Stream(non_blocking=True)
    entry = xp.cuda.Event(disable_timing=True)
    entry.record()  # work already queued on the caller's stream (device input, background)
    compute_stream.wait_event(entry)
    slots = 2
    copied = [xp.cuda.Event(disable_timing=True) for _ in range(slots)]
    released = [xp.cuda.Event(disable_timing=True) for _ in range(slots)]
    returned = [xp.cuda.Event(disable_timing=True) for _ in range(slots)]
    if not on_device_input:
        pinned = [cupyx.empty_pinned((step, 2, n_a, last), in_dtype) for _ in range(slots)]
        staged = [xp.empty((step, 2, n_a, last), in_dtype) for _ in range(slots)]
    n_z = None
    out_pinned: list[tuple] = []
    writes: list[Future | None] = [None] * slots

    def stage(i: int) -> Any:
        b0, b1 = bounds[i]
        if on_device_input:
            return source[b0:b1]
        s, n = i % slots, b1 - b0
        copied[s].synchronize()  # the previous copy out of pinned[s] has finished
        np.copyto(pinned[s][:n], source[b0:b1])
        copy_stream.wait_event(released[s])  # compute no longer reads staged[s]
        staged[s][:n].set(pinned[s][:n], stream=copy_stream)
        copied[s].record(copy_stream)
        return staged[s][:n]

    def write(s: int, b0: int, b1: int) -> None:
        returned[s].synchronize()  # the device -> host copies of this slot have finished
        n = b1 - b0
        sink(b0, b1, {name: out_pinned[s][v][:n] for v, name in enumerate(VOLUMES)})

    with ThreadPoolExecutor(1, thread_name_prefix="tile-write") as writer:
        pending = stage(0)
        for i, (b0, b1) in enumerate(bounds):
            x = pending
            if i + 1 < len(bounds):
                pending = stage(i + 1)  # H2D of the next block runs while this one computes
            s = i % slots
            compute_stream.wait_event(copied[s])
            with compute_stream:
                db, ret, ori, c = batch_volumes(x, cal, params, background, xp)
                released[s].record(compute_stream)
                if sink is not None:
                    if n_z is None:
                        n_z = db.shape[-1]
                        out_pinned.extend(
                            tuple(cupyx.empty_pinned((step, n_a, n_z), np.float32) for _ in VOLUMES)
                            for _ in range(slots)
                        )
                    if writes[s] is not None:
                        writes[s].result()  # the writer is done with this slot's buffers
                    n = b1 - b0
                    for v, src in enumerate((db, ret, ori)):
                        src.get(stream=compute_stream, out=out_pinned[s][v][:n], blocking=False)
                    returned[s].record(compute_stream)
                    writes[s] = writer.submit(write, s, b0, b1)
                finisher.add(b0, b1, (db, ret, ori), c)
        compute_stream.synchronize()
        for future in writes:
            if future is not None:
                future.result()
