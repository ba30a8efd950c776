"""Raw tile formats, read-only: NIfTI spectral, 12-bit packed, TIFF.

Every reader returns the C-order array `uint16[B, 2, A, S]` (B-lines, channels, A-lines,
spectral samples), which is the microscope's Fortran-order `(S, A, 2, B)` layout read as is.

- `nifti-spectral`: a 352-byte NIfTI-1 header (348 + 4 extension bytes, magic `n+1`,
  datatype 512 = uint16, dim = [4, S, A, 2, B]) followed by the samples.
- `raw12`: no header; samples in the same order packed two per three bytes, little-endian:
  s0 = b0 | (b1 & 0x0F) << 8, s1 = b1 >> 4 | b2 << 4 (an odd count pads the last byte pair).
- `tiff`: one TIFF (tifffile) holding the array with its shape.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from services.manifest import RawLayout

NIFTI_HEADER_BYTES = 352
NIFTI_UINT16 = 512


class RawFormatError(ValueError):
    """A raw tile that is truncated, corrupt, or not what the manifest says."""


def _shape(layout: RawLayout) -> tuple[int, int, int, int]:
    return (layout.bscans, layout.channels, layout.alines, layout.samples)


def nifti_header(shape: tuple[int, int, int, int]) -> bytes:
    """A NIfTI-1 single-file header for uint16 data of C-order shape [B, 2, A, S]."""
    b, c, a, s = shape
    header = bytearray(NIFTI_HEADER_BYTES)
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, 4, s, a, c, b, 1, 1, 1)
    struct.pack_into("<hh", header, 70, NIFTI_UINT16, 16)
    struct.pack_into("<8f", header, 76, 1, 1, 1, 1, 1, 0, 0, 0)
    struct.pack_into("<f", header, 108, float(NIFTI_HEADER_BYTES))
    struct.pack_into("<f", header, 112, 1.0)  # scl_slope
    header[344:348] = b"n+1\x00"
    return bytes(header)


def _check_nifti_header(header: bytes, layout: RawLayout, name: str) -> None:
    if len(header) < NIFTI_HEADER_BYTES:
        raise RawFormatError(f"{name}: truncated header ({len(header)} bytes)")
    (sizeof_hdr,) = struct.unpack_from("<i", header, 0)
    if sizeof_hdr != 348 or header[344:347] != b"n+1":
        raise RawFormatError(f"{name}: not a NIfTI-1 single file (bad header size or magic)")
    dims = struct.unpack_from("<8h", header, 40)
    datatype, bitpix = struct.unpack_from("<hh", header, 70)
    (vox_offset,) = struct.unpack_from("<f", header, 108)
    b, c, a, s = _shape(layout)
    if tuple(dims[1:5]) != (s, a, c, b):
        raise RawFormatError(f"{name}: dims {dims[1:5]} but the manifest says {(s, a, c, b)}")
    if datatype != NIFTI_UINT16 or bitpix != 16:
        raise RawFormatError(f"{name}: datatype {datatype}/{bitpix} bits, expected uint16")
    if int(vox_offset) != NIFTI_HEADER_BYTES:
        raise RawFormatError(f"{name}: vox_offset {vox_offset}, expected {NIFTI_HEADER_BYTES}")


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
    """The bytes of a raw tile file (None for TIFF, which `write_tile` writes itself)."""
    if data.shape != _shape(layout) or data.dtype != np.uint16:
        raise ValueError(
            f"tile must be uint16{list(_shape(layout))}, got {data.dtype}{list(data.shape)}"
        )
    if layout.format == "nifti-spectral":
        return nifti_header(data.shape) + np.ascontiguousarray(data).tobytes()
    if layout.format == "raw12":
        return pack12(data)
    return None


def write_tiff(path: Path, data: np.ndarray) -> None:
    import tifffile

    tifffile.imwrite(path, data, photometric="minisblack")


def read_tile(path: Path, layout: RawLayout) -> np.ndarray:
    """Read a raw tile read-only and check it against the manifest's layout."""
    path = Path(path)
    name = path.name
    shape = _shape(layout)
    if layout.format == "tiff":
        import tifffile

        try:
            data = tifffile.imread(path)
        except Exception as exc:  # tifffile raises many types for corrupt files
            raise RawFormatError(f"{name}: unreadable TIFF: {exc}") from None
        if data.shape != shape or data.dtype != np.uint16:
            raise RawFormatError(
                f"{name}: {data.dtype}{list(data.shape)}, expected uint16{list(shape)}"
            )
        return data
    size = path.stat().st_size
    expected = layout.expected_bytes
    if size != expected:
        kind = "truncated" if size < expected else "too large"
        raise RawFormatError(f"{name}: {kind}: {size} bytes, expected {expected}")
    with open(path, "rb") as fh:
        blob = fh.read()
    if layout.format == "nifti-spectral":
        _check_nifti_header(blob[:NIFTI_HEADER_BYTES], layout, name)
        return np.frombuffer(blob, np.uint16, offset=NIFTI_HEADER_BYTES).reshape(shape)
    return unpack12(blob, layout.values).reshape(shape)
