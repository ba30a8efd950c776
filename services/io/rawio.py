"""Raw tile formats, read-only: NIfTI spectral, 12-bit packed, TIFF, and complex NIfTI tiles.

Every spectral reader returns the C-order array `uint16[B, 2, A, S]` (B-lines, channels, A-lines,
spectral samples), which is the microscope's Fortran-order `(S, A, 2, B)` layout read as is.

- `nifti-spectral`: a 352-byte NIfTI-1 header (348 + 4 extension bytes) followed by the
  samples. Like the lab's readers, tilepipe reads the samples after byte 352 and accepts the
  header when the file's size is 352 + the manifest's payload and the header is a NIfTI-1
  header (sizeof_hdr 348) of 16-bit samples; dims or vox_offset that disagree with the manifest
  are reported by :func:`header_notes` (and `tilepipe check`), not refused.
- `raw12`: no header; samples in the same order packed two per three bytes, little-endian:
  s0 = b0 | (b1 & 0x0F) << 8, s1 = b1 >> 4 | b2 << 4 (psoct-toolbox's unpack12bits).
- `tiff`: one TIFF (tifffile) holding the array with its shape.
- `nifti-complex`: a complex tile as psoct-toolbox writes it (and the acquisition PC with
  `tile_saving_type = complex`): float32 NIfTI-1, dims (4*A, B, Z) in Fortran order stacking
  [J1 re; J1 im; J2 re; J2 im] along the first axis, depth reversed and J conjugated (MATLAB's
  ctranspose). :func:`read_tile` returns it as `complex64[B, 2, A, Z]` in tilepipe's
  convention: FFT bin order (depth index 0 = the shallowest kept bin) and not conjugated.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from services.core.errors import RawFormatError
from services.core.manifest import NIFTI_HEADER_BYTES, RawLayout
from services.core.regular_files import open_regular

NIFTI_UINT16 = 512
NIFTI_INT16 = 4
NIFTI_FLOAT32 = 16


def _shape(layout: RawLayout) -> tuple[int, int, int, int]:
    if layout.complex:
        return (layout.bscans, layout.channels, layout.alines, layout.complex_depth)
    return (layout.bscans, layout.channels, layout.alines, layout.samples)


@dataclass(frozen=True)
class NiftiHeader:
    """The fields of a NIfTI-1 header tilepipe looks at."""

    sizeof_hdr: int
    dims: tuple[int, ...]
    datatype: int
    bitpix: int
    vox_offset: float
    magic: bytes


def parse_nifti_header(header: bytes) -> NiftiHeader | None:
    """The header's fields, or None when the bytes are not a little-endian NIfTI-1 header."""
    if len(header) < 348:
        return None
    (sizeof_hdr,) = struct.unpack_from("<i", header, 0)
    if sizeof_hdr != 348:
        return None
    dim = struct.unpack_from("<8h", header, 40)
    ndim = max(0, min(7, dim[0]))
    datatype, bitpix = struct.unpack_from("<hh", header, 70)
    (vox_offset,) = struct.unpack_from("<f", header, 108)
    return NiftiHeader(
        sizeof_hdr, tuple(dim[1 : 1 + ndim]), datatype, bitpix, vox_offset, bytes(header[344:348])
    )


def nifti_header(dims: tuple[int, ...], datatype: int = NIFTI_UINT16, bitpix: int = 16) -> bytes:
    """A NIfTI-1 single-file header (352 bytes, vox_offset 352) for Fortran-order `dims`."""
    header = bytearray(NIFTI_HEADER_BYTES)
    struct.pack_into("<i", header, 0, 348)
    padded = (len(dims), *dims, *([1] * (7 - len(dims))))
    struct.pack_into("<8h", header, 40, *padded)
    struct.pack_into("<hh", header, 70, datatype, bitpix)
    struct.pack_into("<8f", header, 76, 1, 1, 1, 1, 1, 0, 0, 0)
    struct.pack_into("<f", header, 108, float(NIFTI_HEADER_BYTES))
    struct.pack_into("<f", header, 112, 1.0)  # scl_slope
    header[344:348] = b"n+1\x00"
    return bytes(header)


def _expected_dims(layout: RawLayout) -> tuple[int, ...]:
    b, c, a, s = _shape(layout)
    if layout.complex:
        return (4 * a, b, s)
    return (s, a, c, b)


def header_notes(header: bytes, layout: RawLayout, name: str) -> list[str]:
    """Refuse a header the data cannot be read with (RawFormatError, saying what was expected
    and found); return notes on fields that disagree with the manifest but do not matter."""
    parsed = parse_nifti_header(header)
    if parsed is None:
        found = struct.unpack_from("<i", header, 0)[0] if len(header) >= 4 else None
        raise RawFormatError(
            f"{name}: not a NIfTI-1 header (sizeof_hdr {found}, expected 348 little-endian)"
        )
    want_bits = 32 if layout.complex else 16
    if parsed.bitpix != want_bits:
        kind = "float32" if layout.complex else "16-bit"
        raise RawFormatError(
            f"{name}: header says {parsed.bitpix}-bit values (datatype {parsed.datatype}), "
            f"expected {kind} samples"
        )
    notes = []
    want = _expected_dims(layout)
    if layout.complex:
        if parsed.dims[:2] != want[:2]:
            raise RawFormatError(
                f"{name}: complex tile dims {parsed.dims}, expected (4 x {want[0] // 4} A-lines, "
                f"{want[1]} B-lines, depth)"
            )
        if len(parsed.dims) < 3 or parsed.dims[2] != want[2]:
            raise RawFormatError(
                f"{name}: complex tile depth {parsed.dims[2:3]}, the manifest says {want[2]} "
                "(raw.depth)"
            )
    elif tuple(d for d in parsed.dims if d != 1) != tuple(d for d in want if d != 1):
        notes.append(f"header dims {parsed.dims} differ from the manifest's {want}")
    if int(parsed.vox_offset) != NIFTI_HEADER_BYTES:
        notes.append(
            f"header vox_offset {parsed.vox_offset:g}; data read after byte {NIFTI_HEADER_BYTES} "
            "as the lab's readers do"
        )
    if parsed.magic[:3] not in (b"n+1", b"ni1"):
        notes.append(f"header magic {parsed.magic!r} is not n+1")
    return notes


def pack12(values: np.ndarray) -> bytes:
    """Pack uint16 samples (< 4096) two per three bytes."""
    flat = np.ascontiguousarray(values, dtype=np.uint16).ravel()
    if flat.size and int(flat.max()) > 0x0FFF:
        raise ValueError("raw12 samples must be < 4096")
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint16)])
    pairs = flat.reshape(-1, 2).astype(np.uint32)
    out = np.empty((pairs.shape[0], 3), np.uint8)
    out[:, 0] = pairs[:, 0] & 0xFF
    out[:, 1] = ((pairs[:, 0] >> 8) & 0x0F) | ((pairs[:, 1] & 0x0F) << 4)
    out[:, 2] = pairs[:, 1] >> 4
    return out.tobytes()


def unpack12(data: bytes | np.ndarray, count: int) -> np.ndarray:
    """Inverse of `pack12`: `count` uint16 samples."""
    raw = np.frombuffer(data, np.uint8).reshape(-1, 3).astype(np.uint16)
    out = np.empty((raw.shape[0], 2), np.uint16)
    out[:, 0] = raw[:, 0] | ((raw[:, 1] & 0x0F) << 8)
    out[:, 1] = (raw[:, 1] >> 4) | (raw[:, 2] << 4)
    return out.ravel()[:count]


def encode_tile(data: np.ndarray, layout: RawLayout) -> bytes | None:
    """The bytes of a raw tile file (None for TIFF, which `write_tiff` writes itself).

    Spectral formats take `uint16[B, 2, A, S]`; `nifti-complex` takes `complex64[B, 2, A, Z]`
    in tilepipe's convention and writes it as the toolbox does (conjugated, depth reversed).
    """
    shape = _shape(layout)
    dtype = np.complex64 if layout.complex else np.uint16
    if data.shape != shape or data.dtype != dtype:
        raise ValueError(
            f"tile must be {np.dtype(dtype).name}{list(shape)}, got {data.dtype}{list(data.shape)}"
        )
    if layout.complex:
        toolbox = np.conj(data[..., ::-1])  # [B, 2, A, Z]
        parts = np.stack([toolbox.real, toolbox.imag], axis=2)  # [B, 2(ch), 2(re/im), A, Z]
        # Fortran (4A, B, Z) == C-order [Z, B, 4, A] with the 4 blocks J1re, J1im, J2re, J2im
        block = parts.reshape(shape[0], 4, shape[2], shape[3]).transpose(3, 0, 1, 2)
        payload = np.ascontiguousarray(block, dtype="<f4").tobytes()
        return nifti_header(_expected_dims(layout), NIFTI_FLOAT32, 32) + payload
    if layout.format == "nifti-spectral":
        return nifti_header(_expected_dims(layout)) + np.ascontiguousarray(data).tobytes()
    if layout.format == "raw12":
        return pack12(data)
    return None


def write_tiff(path: Path, data: np.ndarray) -> None:
    tifffile.imwrite(path, data, photometric="minisblack")


class TileSource:
    """A raw tile opened read-only, read in B-line blocks: ``shape``, ``dtype``,
    ``source[b0:b1]`` (a new host array of those B-lines, in the layout :func:`read_tile`
    returns) and ``sha256`` (the file's digest, complete once every block was read in order,
    else None). Only what is asked for is read; the file is checked when it is opened (size,
    header; a FIFO, a device or a corrupt header fails at once)."""

    def __init__(self, path: Path, layout: RawLayout) -> None:
        self.path, self.layout = Path(path), layout
        self.name = self.path.name
        self.shape = _shape(layout)
        self.dtype = np.dtype(np.complex64 if layout.complex else np.uint16)
        self.ndim = 4
        self._fh = open_regular(self.path, self.name)
        self._hash: Any = hashlib.sha256()
        self._next = 0  # the next B-line a sequential reader asks for
        self._whole: np.ndarray | None = None
        try:
            self._open()
        except BaseException:
            self._fh.close()
            raise

    def _open(self) -> None:
        layout, name = self.layout, self.name
        if layout.format == "tiff":
            try:
                data = tifffile.imread(self._fh)
            except Exception as exc:  # tifffile raises many types for corrupt files
                raise RawFormatError(f"{name}: unreadable TIFF: {exc}") from None
            if data.shape != self.shape or data.dtype != np.uint16:
                raise RawFormatError(
                    f"{name}: {data.dtype}{list(data.shape)}, expected uint16{list(self.shape)}"
                )
            self._whole, self._hash = data, None
            return
        size = os.fstat(self._fh.fileno()).st_size
        expected = layout.expected_bytes
        if size != expected:
            kind = "truncated" if size < expected else "too large"
            raise RawFormatError(
                f"{name}: {kind}: {size} bytes, expected {expected} ({_describe(layout)})"
            )
        self._start = 0
        if layout.format != "raw12":
            header = self._pread(0, NIFTI_HEADER_BYTES)
            header_notes(bytes(header), layout, name)
            self._hash.update(header)
            self._start = NIFTI_HEADER_BYTES
        if layout.complex:
            self._hash = None  # a B-line block is not contiguous in the file
            b, _, a, z = self.shape
            self._map = np.memmap(self._fh, dtype=np.uint8, mode="r", shape=(size,))
            self._complex = self._map[self._start :].view("<f4").reshape(z, b, 4, a)
        b, c, a, s = self.shape
        self._bline_bytes = (c * a * s * 3) // 2 if layout.format == "raw12" else c * a * s * 2

    def __getitem__(self, rows: slice) -> np.ndarray:
        b0, b1, step = rows.indices(self.shape[0])
        if step != 1:
            raise ValueError("TileSource reads contiguous B-line blocks")
        if self._whole is not None:
            return np.array(self._whole[b0:b1])
        if b0 != self._next:
            self._hash = None  # out of order: no digest of the file
        self._next = b1
        if self.layout.complex:
            return self._complex_lines(b0, b1)
        raw = self._pread(self._start + b0 * self._bline_bytes, (b1 - b0) * self._bline_bytes)
        if self._hash is not None:
            self._hash.update(raw)
        n = b1 - b0
        if self.layout.format == "raw12":
            count = n * self._bline_bytes * 2 // 3
            return unpack12(raw, count).reshape(n, *self.shape[1:])
        return raw.view("<u2").reshape(n, *self.shape[1:]).astype(np.uint16, copy=False)

    def _pread(self, offset: int, count: int) -> np.ndarray:
        """`count` bytes at `offset` into a new buffer. Plain reads, not a memory map: the
        process's resident memory is the blocks it holds, not the pages of the file it has
        touched (a 1 GB tile read through a map counts 1 GB against the worker)."""
        out = np.empty(count, np.uint8)
        view, fd, done = memoryview(out), self._fh.fileno(), 0
        while done < count:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                raise RawFormatError(f"{self.name}: truncated while reading")
            done += n
        return out

    def _complex_lines(self, b0: int, b1: int) -> np.ndarray:
        """B-lines of a complex tile in tilepipe's convention (unflipped, not conjugated)."""
        block = self._complex[:, b0:b1]  # [Z, b, 4, A]
        out = np.empty((b1 - b0, *self.shape[1:]), np.complex64)
        for ch in (0, 1):
            re, im = block[:, :, 2 * ch], block[:, :, 2 * ch + 1]  # [Z, b, A]
            out[:, ch].real = re.transpose(1, 2, 0)[..., ::-1]
            out[:, ch].imag = -im.transpose(1, 2, 0)[..., ::-1]  # undo the conjugation
        return out

    @property
    def sha256(self) -> str | None:
        """`sha256:<hex>` of the whole file once it was read in order, else None."""
        if self._hash is None or self._next < self.shape[0]:
            return None
        return "sha256:" + self._hash.hexdigest()

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def close(self) -> None:
        self._map = self._complex = None
        self._fh.close()

    def __enter__(self) -> TileSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_tile(path: Path, layout: RawLayout) -> TileSource:
    """A raw tile opened read-only for block reading (see :class:`TileSource`)."""
    return TileSource(path, layout)


def read_tile(path: Path, layout: RawLayout) -> np.ndarray:
    """Read a whole raw tile read-only and check it against the manifest's layout. Only a
    regular file is opened (`NotRegularFile` otherwise, never a blocking open or read)."""
    with open_tile(path, layout) as tile:
        return tile[0 : tile.shape[0]]


def _describe(layout: RawLayout) -> str:
    """What a complete tile holds, in words."""
    b, c, a, s = _shape(layout)
    if layout.complex:
        return f"{NIFTI_HEADER_BYTES}-byte header + float32 4x{a} x {b} x {s}"
    per = "1.5 bytes" if layout.format == "raw12" else "2 bytes"
    head = f"{NIFTI_HEADER_BYTES}-byte header + " if layout.format == "nifti-spectral" else ""
    return f"{head}{s} samples x {a} A-lines x {c} channels x {b} B-lines, {per} each"
