"""Archival copy of one raw tile: a gzip-compressed NIfTI-1 (.nii.gz) the lab opens with
nibabel or MATLAB, and the SHA-256 of both files, in ONE streaming read of the raw file.

The archive holds the tile's samples exactly, in the instrument's own array order:

- spectral tiles (``nifti-spectral``, ``raw12``, ``tiff``): uint16, dims
  ``(samples, A-lines, 2 channels, B-lines)`` (MATLAB/Fortran order, as the microscope writes
  ``*_spectral_*.nii``; 12-bit tiles are unpacked to 16 bits);
- complex tiles (``nifti-complex``): float32, dims ``(4 x A-lines, B-lines, depth)`` as written
  (J1 re, J1 im, J2 re, J2 im stacked along the first axis, depth reversed, conjugated).

The header is nibabel's (sizeof_hdr 348, 4 zero extension bytes, data at byte 352 like the
instrument's files, ``descrip`` naming the source); pixel sizes are 1 (units unknown: the
samples are spectral, not spatial). For a ``nifti-spectral`` tile the decompressed archive
differs from the raw file only in its header, whose dims are correct even where the
instrument's are not. gzip output is deterministic (mtime 0, no file name), so archiving the
same tile again gives the same bytes and SHA-256.

Memory: one block of B-lines (``block_mb``) at a time, never the whole tile.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import tifffile

from services.core.errors import RawFormatError
from services.core.manifest import NIFTI_HEADER_BYTES, RawLayout
from services.core.regular_files import open_regular
from services.io.atomic import atomic_file
from services.io.rawio import unpack12

MIB = 1 << 20
COMPRESS_LEVEL = 3  # the lab's archive_file (gzip level 3)


@dataclass(frozen=True)
class ArchiveReport:
    """What one archival copy holds: sizes and `sha256:<hex>` digests of both files."""

    raw_bytes: int
    raw_sha256: str
    archive_bytes: int
    archive_sha256: str
    shape: tuple[int, ...]
    dtype: str
    seconds: float


class _HashingWriter:
    """A binary sink that hashes and counts what passes through it to a file."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh, self.sha, self.size = fh, hashlib.sha256(), 0

    def write(self, data: bytes | memoryview) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.fh.write(data)

    def flush(self) -> None:
        self.fh.flush()


def archive_dims(layout: RawLayout) -> tuple[tuple[int, ...], np.dtype]:
    """NIfTI dims and dtype of a tile's archive (the instrument's array order)."""
    if layout.complex:
        return (4 * layout.alines, layout.bscans, layout.complex_depth), np.dtype("<f4")
    return (layout.samples, layout.alines, layout.channels, layout.bscans), np.dtype("<u2")


def nifti_header_bytes(layout: RawLayout, description: str) -> bytes:
    """The archive's 352-byte header (nibabel's NIfTI-1 header + 4 zero extension bytes)."""
    import nibabel as nib

    dims, dtype = archive_dims(layout)
    header = nib.Nifti1Header()
    header.set_data_shape(dims)
    header.set_data_dtype(dtype)
    header.set_zooms((1.0,) * len(dims))
    header["vox_offset"] = NIFTI_HEADER_BYTES
    header["descrip"] = description.encode()[:79]
    header.set_xyzt_units("unknown", "unknown")
    data = header.binaryblock + b"\0" * (NIFTI_HEADER_BYTES - 348)
    assert len(data) == NIFTI_HEADER_BYTES
    return data


def archive_tile(
    raw: Path,
    layout: RawLayout,
    target: Path,
    *,
    level: int = COMPRESS_LEVEL,
    block_mb: float = 16.0,
    threads: int = 1,
) -> ArchiveReport:
    """Write `target` (.nii.gz, atomically) from the raw tile `raw` (read once, read-only).

    `threads` > 1 compresses blocks in parallel, each block its own gzip member (a
    multi-member .gz, which gzip, nibabel and MATLAB read as one stream); at most
    `threads` + 1 blocks are in flight."""
    started = time.perf_counter()
    raw = Path(raw)
    dims, dtype = archive_dims(layout)
    raw_sha = hashlib.sha256()
    with open_regular(raw, raw.name) as src:
        size = os.fstat(src.fileno()).st_size
        if layout.format != "tiff" and size != layout.expected_bytes:
            raise RawFormatError(
                f"{raw.name}: {size} bytes, expected {layout.expected_bytes}: not archived"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(target) as tmp, open(tmp, "wb") as out:
            sink = _HashingWriter(out)
            with _compressor(sink, level, threads) as gz:
                gz.write(nifti_header_bytes(layout, f"tilepipe raw archive of {raw.name}"))
                if layout.format in ("nifti-spectral", "nifti-complex"):
                    raw_sha.update(_read_exact(src, NIFTI_HEADER_BYTES, raw.name))
                _copy_payload(src, gz, layout, raw_sha, int(block_mb * MIB), raw.name)
    return ArchiveReport(
        raw_bytes=size,
        raw_sha256="sha256:" + raw_sha.hexdigest(),
        archive_bytes=sink.size,
        archive_sha256="sha256:" + sink.sha.hexdigest(),
        shape=dims,
        dtype=dtype.name,
        seconds=time.perf_counter() - started,
    )


class _ParallelMembers:
    """Compresses each write as its own gzip member on a thread pool (zlib releases the
    GIL), writing the members to `sink` in order; bounded in-flight blocks."""

    def __init__(self, sink: _HashingWriter, level: int, threads: int) -> None:
        self.sink, self.level, self.threads = sink, level, threads
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="tp-archive")
        self.pending: deque[Future[bytes]] = deque()

    def write(self, data: bytes) -> None:
        self.pending.append(self.pool.submit(gzip.compress, data, self.level, mtime=0))
        while len(self.pending) > self.threads:
            self.sink.write(self.pending.popleft().result())

    def __enter__(self) -> _ParallelMembers:
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        try:
            while self.pending:
                member = self.pending.popleft().result()
                if exc_type is None:
                    self.sink.write(member)
        finally:
            self.pool.shutdown(wait=True)


def _compressor(sink: _HashingWriter, level: int, threads: int):
    """One gzip stream (threads 1, as gzip writes it) or parallel gzip members."""
    if threads > 1:
        return _ParallelMembers(sink, level, threads)
    return gzip.GzipFile(filename="", mode="wb", compresslevel=level, fileobj=sink, mtime=0)


def _copy_payload(src: BinaryIO, gz, layout: RawLayout, sha, block: int, name: str) -> None:
    """Stream the samples from `src` into `gz` in whole B-lines, hashing the raw bytes."""
    if layout.format == "tiff":  # one TIFF: read whole (not the instrument's format)
        data = src.read()
        sha.update(data)
        array = tifffile.imread(io.BytesIO(data))
        gz.write(np.ascontiguousarray(array, dtype="<u2").tobytes())
        return
    if layout.complex:  # float32 as written: any byte block is whole values
        remaining = layout.expected_bytes - NIFTI_HEADER_BYTES
        while remaining:
            chunk = _read_exact(src, min(max(4, block // 4 * 4), remaining), name)
            sha.update(chunk)
            gz.write(chunk)
            remaining -= len(chunk)
        return
    per_line = layout.channels * layout.alines * layout.samples
    line_bytes = per_line * 3 // 2 if layout.format == "raw12" else per_line * 2
    step = max(1, block // line_bytes)
    for b0 in range(0, layout.bscans, step):
        n = min(step, layout.bscans - b0)
        chunk = _read_exact(src, n * line_bytes, name)
        sha.update(chunk)
        if layout.format == "raw12":
            gz.write(unpack12(chunk, n * per_line).astype("<u2", copy=False).tobytes())
        else:
            gz.write(chunk)


def _read_exact(src: BinaryIO, count: int, name: str) -> bytes:
    data = src.read(count)
    if len(data) != count:
        raise RawFormatError(f"{name}: shorter than when it was checked (changed while read)")
    return data
