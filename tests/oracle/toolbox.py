"""A NumPy transcription of the lab's MATLAB PS-OCT toolbox (``calvinchai/psoct-toolbox``).

The steps follow ``psoct.spectral.spectral2complex`` (with ``interpolationwave_20201130`` and the
legacy ``ZeroPadBuffer``), ``psoct.complex.complex2volumes``, ``psoct.surface.gradient``,
``psoct.recon.complex2processed`` and ``psoct.enface.vol2enface`` (``enfaceMean``,
``enfaceMax``, ``enfaceCircularMean``, ``biref.fitLinear``). Everything is float64.

Conventions (MATLAB 1-based indices are translated where noted):

* Raw tiles are ``uint16[B, 2, A, S]`` = [B-line, channel, A-line, spectral sample], S = 2048.
* Jones volumes are complex ``(A, B, Z)`` with Z = 1000: what ``spectral2complex`` returns in
  memory, i.e. the conjugate of the FFT (it stores ``Jones1'``) and depth index 0 = FFT bin 24.
* The complex NIfTI file written by ``spectral2complex`` is flipped in depth, and
  ``complex2volumes`` (lab option ``flipZ=true``) flips it back, so the products' depth index 0
  is FFT bin 24 as well. ``flip_z_net`` models a chain with one flip too many.
* Surfaces are 1-based depth indices, as in MATLAB.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io
from scipy import ndimage

N_SAMPLES = 2048  # AlineLength
AUTOCORR_CUT = 24  # AutoCorrPeakCut
N_DEPTH = N_SAMPLES // 2 - AUTOCORR_CUT  # DepthL = 1000
HEADER_BYTES = 352  # NIfTI-1 header + 4 extension bytes
EPS_SINGLE = float(np.finfo(np.float32).eps)  # eps('single')

__all__ = [
    "enface",
    "gradient_surface",
    "jones_to_volumes",
    "read_complex_nifti",
    "read_dispersion_file",
    "read_spectral",
    "read_wave_pixel_mat",
    "spectral_to_jones",
    "toolbox_k_grid",
    "toolbox_products",
    "toolbox_wavelengths",
    "write_complex_nifti",
]


# --------------------------------------------------------------------------- calibration


def read_wave_pixel_mat(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read ``wave-pixel.mat``: ``mu`` (N x 2, 1-based pixel positions) and ``wave_prime`` (nm).

    ``wave_sample`` is accepted as an alias of ``wave_prime``.
    """
    m = scipy.io.loadmat(str(path))
    mu = np.asarray(m["mu"], dtype=np.float64)
    if "wave_prime" in m:
        wave = m["wave_prime"]
    elif "wave_sample" in m:
        wave = m["wave_sample"]
    else:
        raise KeyError(f"{path}: neither 'wave_prime' nor 'wave_sample' in {sorted(m)}")
    wave = np.asarray(wave, dtype=np.float64).ravel()
    if mu.ndim != 2 or mu.shape[1] != 2 or mu.shape[0] != wave.size:
        raise ValueError(f"{path}: mu {mu.shape} does not match wave_prime ({wave.size},)")
    return mu, wave


def toolbox_wavelengths(
    mu: np.ndarray, wave_prime: np.ndarray, n: int = N_SAMPLES
) -> tuple[np.ndarray, np.ndarray]:
    """Degree-1 fits of wavelength vs 1-based pixel per channel, evaluated at pixels 1..n (nm).

    Channel 2's positions (``mu[:, 1]``) are expressed after the flip of its buffer.
    """
    mu = np.asarray(mu, dtype=np.float64)
    wave = np.asarray(wave_prime, dtype=np.float64).ravel()
    x = np.arange(1, n + 1, dtype=np.float64)
    lam_l = np.polyval(np.polyfit(mu[:, 0], wave, 1), x)
    lam_r = np.polyval(np.polyfit(mu[:, 1], wave, 1), x)
    return lam_l, lam_r


def _interpolation_grid(
    mu: np.ndarray, wave_prime: np.ndarray, n: int = N_SAMPLES
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``interpolationwave_20201130`` (PaddingFactor 1): wavelengths in metres and Ks in rad/m.

    Returns ``(Wavelengths_l, Wavelengths_r, InterpolatedWavelengths, Ks)``; Ks is descending.
    """
    lam_l, lam_r = toolbox_wavelengths(mu, wave_prime, n)
    # interp1(1:n, W, linspace(1, n, n)) with PaddingLength == n is the identity.
    wl_l = 1e-9 * lam_l
    wl_r = 1e-9 * lam_r
    min_k = 2 * np.pi / min(wl_l[-1], wl_r[-1])
    max_k = 2 * np.pi / max(wl_l[0], wl_r[0])
    ks = np.linspace(min_k, max_k, n)[::-1]  # flipud: Ks(1) = maxK
    return wl_l, wl_r, 2 * np.pi / ks, ks


def toolbox_k_grid(mu: np.ndarray, wave_prime: np.ndarray, n: int = N_SAMPLES) -> np.ndarray:
    """The toolbox's interpolation grid ``Ks`` in rad/um (descending, index 0 = largest k)."""
    return _interpolation_grid(mu, wave_prime, n)[3] * 1e-6


def read_dispersion_file(path: str | Path, n: int = N_SAMPLES) -> np.ndarray:
    """Dispersion phase (rad): raw little-endian float64, one value per interpolated sample."""
    values = np.fromfile(str(path), dtype="<f8")
    if values.size != n:
        # the toolbox accepts multiples of n, but then fails to broadcast; only n works.
        raise ValueError(f"{path}: {values.size} float64 values, expected {n}")
    return values


# --------------------------------------------------------------------------- raw files


def _unpack12(raw: np.ndarray) -> np.ndarray:
    """``unpack12bits``: 3 bytes -> 2 samples (b0 | low nibble of b1 << 8, b1 >> 4 | b2 << 4)."""
    b = raw.reshape(-1, 3).astype(np.uint16)
    out = np.empty((b.shape[0], 2), dtype=np.uint16)
    out[:, 0] = b[:, 0] | ((b[:, 1] & 0x0F) << 8)
    out[:, 1] = (b[:, 1] >> 4) | (b[:, 2] << 4)
    return out.ravel()


def read_spectral(
    path: str | Path,
    alines: int,
    blines: int,
    raw12: bool = False,
    header_bytes: int = HEADER_BYTES,
) -> np.ndarray:
    """Read a spectral tile as ``uint16[B, 2, A, S]``.

    The ``nifti-spectral`` file is ``header_bytes`` of header then little-endian uint16 in
    MATLAB column-major order (S, A, 2, B); the 12-bit ``.raw`` file has no header and packs
    the same sample stream two samples per three bytes.
    """
    count = blines * 2 * alines * N_SAMPLES
    data = Path(path).read_bytes()
    if raw12:
        nbytes = count * 3 // 2
        if len(data) < nbytes:
            raise ValueError(f"{path}: {len(data)} bytes, expected {nbytes}")
        samples = _unpack12(np.frombuffer(data, dtype=np.uint8, count=nbytes))
    else:
        if len(data) < header_bytes + 2 * count:
            raise ValueError(f"{path}: {len(data)} bytes, expected {header_bytes + 2 * count}")
        samples = np.frombuffer(data, dtype="<u2", count=count, offset=header_bytes)
    return samples.astype(np.uint16).reshape(blines, 2, alines, N_SAMPLES)


# --------------------------------------------------------------------------- spectral -> Jones


def _zero_pad_buffer_factor1(buf: np.ndarray) -> np.ndarray:
    """Legacy ``ZeroPadBuffer`` with PaddingFactor 1, for buffers shaped (B, A, S).

    With factor 1 it is the identity except for a quirk: ``TransformedBuffer(MidLength)``
    is a linear index, so only the FIRST A-line of each B-line has its Nyquist bin halved.
    In the sample domain that subtracts ``X[S/2] * (-1)^n / (2S)`` from A-line 0.
    """
    out = buf.copy()
    alt = np.where(np.arange(buf.shape[-1]) % 2 == 0, 1.0, -1.0)
    nyquist = buf[:, 0, :] @ alt  # X[S/2] (real for real input)
    out[:, 0, :] -= nyquist[:, None] * alt[None, :] / (2 * buf.shape[-1])
    return out


def _interp1_linear_extrap(x: np.ndarray, y: np.ndarray, xq: np.ndarray) -> np.ndarray:
    """``interp1(x, y, xq, 'linear', 'extrap')`` along the last axis of ``y`` (x ascending)."""
    if not np.all(np.diff(x) > 0):
        raise ValueError("interp1 needs strictly increasing sample wavelengths")
    i = np.clip(np.searchsorted(x, xq, side="right"), 1, x.size - 1)
    x0, x1 = x[i - 1], x[i]
    w = (xq - x0) / (x1 - x0)
    return y[..., i - 1] + (y[..., i] - y[..., i - 1]) * w


def spectral_to_jones(
    raw_BCAS: np.ndarray,
    mu: np.ndarray,
    wave_prime: np.ndarray,
    dispersion_rad: np.ndarray,
    nyquist_quirk: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """``spectral2complex`` on a ``[B, 2, A, S]`` tile -> ``(J1, J2)``, complex (A, B, 1000).

    Per B-line: channel 2 flipped along samples; mean over A-lines subtracted per sample;
    ``ZeroPadBuffer`` (factor 1, see ``nyquist_quirk``); linear interpolation of each channel
    from its fitted wavelengths onto ``2*pi/Ks``; median over A-lines subtracted per sample;
    times ``exp(-1i*dispersion)``; FFT over 2048 samples, bins 24..1023 kept; conjugated.
    """
    raw = np.asarray(raw_BCAS)
    if raw.ndim != 4 or raw.shape[1] != 2 or raw.shape[3] != N_SAMPLES:
        raise ValueError(f"expected [B, 2, A, {N_SAMPLES}], got {raw.shape}")
    disp = np.asarray(dispersion_rad, dtype=np.float64).ravel()
    if disp.size != N_SAMPLES:
        raise ValueError(f"dispersion must have {N_SAMPLES} values, got {disp.size}")
    wl_l, wl_r, wl_interp, _ = _interpolation_grid(mu, wave_prime)
    correction = np.exp(-1j * disp)

    jones = []
    for c, wl in ((0, wl_l), (1, wl_r)):
        buf = raw[:, c].astype(np.float64)  # (B, A, S)
        if c == 1:
            buf = buf[..., ::-1]  # flipud of the channel-2 buffer
        buf = buf - buf.mean(axis=1, keepdims=True)  # reference: mean over A-lines
        if nyquist_quirk:
            buf = _zero_pad_buffer_factor1(buf)
        buf = _interp1_linear_extrap(wl, buf, wl_interp)
        buf = buf - np.median(buf, axis=1, keepdims=True)  # DC: median over A-lines
        spec = np.fft.fft(buf * correction, n=N_SAMPLES, axis=-1)
        spec = spec[..., AUTOCORR_CUT : N_SAMPLES // 2]  # (B, A, 1000)
        jones.append(np.conj(spec).transpose(1, 0, 2))  # Jones' -> (A, B, Z)
    return jones[0], jones[1]


# --------------------------------------------------------------------------- volumes


def jones_to_volumes(
    J1: np.ndarray,
    J2: np.ndarray,
    flip_phase: bool = False,
    phase_offset_deg: float = 100.0,
    flip_z_net: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``complex2volumes`` -> ``(dBI, R, O)``: dB, retardance (deg), optic axis (deg).

    ``flip_z_net=False`` is the lab's file chain (two depth flips in total).
    """
    a1 = np.abs(J1).astype(np.float64)
    a2 = np.abs(J2).astype(np.float64)
    dbi = 10 * np.log10(np.maximum(a1**2 + a2**2, EPS_SINGLE))
    ret = np.arctan(a1 / np.maximum(a2, EPS_SINGLE)) / np.pi * 180
    phi = np.angle(J1) - np.angle(J2)
    if flip_phase:
        phi = -phi
    offset = np.deg2rad(phase_offset_deg)
    if offset != 0:
        phi = phi + 2 * offset
    phi = np.where(phi > np.pi, phi - 2 * np.pi, phi)  # one wrapping step only
    phi = np.where(phi < -np.pi, phi + 2 * np.pi, phi)
    ori = phi / (2 * np.pi) * 180
    if flip_z_net:
        dbi, ret, ori = (v[..., ::-1] for v in (dbi, ret, ori))
    return np.ascontiguousarray(dbi), np.ascontiguousarray(ret), np.ascontiguousarray(ori)


# --------------------------------------------------------------------------- surface


def _gaussian_kernel(sigma: float) -> np.ndarray:
    """``imgaussfilt`` kernel: size 2*ceil(2*sigma)+1, normalised."""
    half = int(np.ceil(2 * sigma))
    x = np.arange(-half, half + 1, dtype=np.float64)
    k = np.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def gradient_surface(dBI: np.ndarray, window: int = 5, kernel: int = 5) -> np.ndarray:
    """``psoct.surface.gradient`` then the rounding/clamping of ``complex2processed``.

    Per A-line: ``valid_len`` = count of samples > 0.01 (anywhere); the first ``valid_len``
    samples are Gaussian-smoothed (sigma 5, replicate padding); ``grad = -conv(data, k,
    'valid')`` with ``k = [-ones(w)/w, ones(w2)/w2]``, i.e. mean of the next w2 samples minus
    mean of the w samples before; the surface is the 1-based position ``w + m`` of the first
    maximum (1 when ``valid_len <= w + w2``). Then a 3x3 median filter with symmetric padding,
    rounding and clamping to [1, nz]. Returns int64 (A, B), 1-based.
    """
    vol = np.asarray(dBI, dtype=np.float64)
    nx, ny, nz = vol.shape
    w, w2 = window, kernel
    gk = _gaussian_kernel(5.0)
    box = np.concatenate([-np.ones(w) / w, np.ones(w2) / w2])
    valid_len = np.count_nonzero(vol > 0.01, axis=2)
    surf = np.ones((nx, ny), dtype=np.float64)
    for length in np.unique(valid_len):
        if length <= w + w2:
            continue
        sel = valid_len == length
        data = ndimage.correlate1d(vol[sel][:, :length], gk, axis=1, mode="nearest")
        # conv(data, box, 'valid') is a correlation with the reversed kernel.
        windows = np.lib.stride_tricks.sliding_window_view(data, box.size, axis=1)
        grad = -(windows @ box[::-1])
        positions = np.arange(w + 1, length - w + 2)  # (w+1):(valid_len-w+1)
        surf[sel] = positions[np.argmax(grad, axis=1)]
    surf = ndimage.median_filter(surf, size=(3, 3), mode="reflect")  # 'symmetric'
    surf = np.floor(surf + 0.5)  # MATLAB round (values are positive)
    return np.clip(surf, 1, nz).astype(np.int64)


# --------------------------------------------------------------------------- en face


def _window_mask(surf: np.ndarray, nz: int, offset: int, depth: int) -> np.ndarray:
    """Boolean (A, B, Z) mask of the 1-based inclusive window z1..z2 of ``enfaceReduce``."""
    s = np.clip(np.floor(np.asarray(surf, dtype=np.float64) + 0.5), 1, nz)  # vol2enface clamp
    z1 = np.maximum(1, s + offset)
    z2 = np.minimum(nz, z1 + depth)
    z = np.arange(1, nz + 1)
    return (z >= z1[..., None]) & (z <= z2[..., None])


def _fit_linear(r_deg: np.ndarray, mask: np.ndarray, z_size_um: float, lam_um: float) -> np.ndarray:
    """``biref.fitLinear``: slope of OPD (R/360*lambda) vs depth (z_size*(0:n-1)) per A-line.

    The window is cut at (and including) its first exact zero; the slope is used when
    n >= 3 and any(OPD) and any(depth), else 0.
    """
    nx, ny, _ = r_deg.shape
    out = np.zeros((nx, ny), dtype=np.float64)
    for ix in range(nx):
        for iy in range(ny):
            rp = r_deg[ix, iy, mask[ix, iy]]
            if rp.size == 0:
                out[ix, iy] = np.nan  # MATLAB errors here (window below the volume)
                continue
            zeros = np.flatnonzero(rp == 0)
            if zeros.size:
                rp = rp[: zeros[0] + 1]
            opd = rp / 360 * lam_um
            depth_um = z_size_um * np.arange(rp.size, dtype=np.float64)
            if rp.size >= 3 and np.any(opd) and np.any(depth_um):
                out[ix, iy] = np.polyfit(depth_um, opd, 1)[0]
    return out


def enface(
    dBI: np.ndarray,
    R: np.ndarray,
    O: np.ndarray,  # noqa: E741 (the toolbox's name)
    surf: np.ndarray,
    offset: int = 0,
    depth: int = 70,
    wavelength_um: float = 1.3,
    z_size_um: float = 2.5,
) -> dict[str, np.ndarray]:
    """``vol2enface``: aip/mip (mean/max omitnan of dB), ret (mean omitnan of R), ori
    (circular mean of 180-periodic O), biref (``fitLinear``) over z1..z2 inclusive with
    z1 = max(1, surf+offset), z2 = min(nz, z1+depth). Empty windows give NaN."""
    dbi = np.asarray(dBI, dtype=np.float64)
    ret = np.asarray(R, dtype=np.float64)
    ori = np.asarray(O, dtype=np.float64)
    nz = dbi.shape[2]
    mask = _window_mask(surf, nz, offset, depth)
    empty = ~mask.any(axis=2)

    def masked(v: np.ndarray, fill: float) -> np.ndarray:
        return np.where(mask, v, fill)

    with np.errstate(invalid="ignore", divide="ignore"):
        d = masked(dbi, np.nan)
        n_ok = np.count_nonzero(~np.isnan(d), axis=2)
        aip = np.where(n_ok > 0, np.nansum(d, axis=2) / np.maximum(n_ok, 1), np.nan)
        mip = np.where(n_ok > 0, np.max(np.where(np.isnan(d), -np.inf, d), axis=2), np.nan)
        r = masked(ret, np.nan)
        n_r = np.count_nonzero(~np.isnan(r), axis=2)
        ret_map = np.where(n_r > 0, np.nansum(r, axis=2) / np.maximum(n_r, 1), np.nan)
        t = np.deg2rad(ori)
        s2 = np.sum(np.where(mask, np.sin(2 * t), 0.0), axis=2)  # plain sum: NaN propagates
        c2 = np.sum(np.where(mask, np.cos(2 * t), 0.0), axis=2)
        ori_map = 0.5 * np.arctan2(s2, c2) / np.pi * 180
    ori_map[empty] = np.nan
    biref = _fit_linear(ret, mask, z_size_um, wavelength_um)
    return {"aip": aip, "mip": mip, "ret": ret_map, "ori": ori_map, "biref": biref}


# --------------------------------------------------------------------------- whole chain


def toolbox_products(
    raw_path: str | Path,
    alines: int,
    blines: int,
    mat_path: str | Path,
    dispersion_path: str | Path,
    raw12: bool = False,
    **opts: Any,
) -> dict[str, np.ndarray]:
    """Spectral file -> products, in the toolbox's (A, B, Z) / (A, B) orientation.

    ``opts``: ``flip_phase``, ``phase_offset_deg``, ``flip_z_net`` (volumes), ``offset``,
    ``depth``, ``wavelength_um``, ``z_size_um`` (en face), ``header_bytes``,
    ``nyquist_quirk``. Keys: dBI3D, R3D, O3D, surf (1-based), aip, mip, ret, ori, biref.
    """
    vol_keys = {"flip_phase", "phase_offset_deg", "flip_z_net"}
    enf_keys = {"offset", "depth", "wavelength_um", "z_size_um"}
    unknown = set(opts) - vol_keys - enf_keys - {"header_bytes", "nyquist_quirk"}
    if unknown:
        raise TypeError(f"unknown options: {sorted(unknown)}")
    read_kw = {"header_bytes": opts["header_bytes"]} if "header_bytes" in opts else {}
    raw = read_spectral(raw_path, alines, blines, raw12=raw12, **read_kw)
    mu, wave = read_wave_pixel_mat(mat_path)
    disp = read_dispersion_file(dispersion_path)
    j1, j2 = spectral_to_jones(raw, mu, wave, disp, opts.get("nyquist_quirk", True))
    dbi, ret, ori = jones_to_volumes(j1, j2, **{k: v for k, v in opts.items() if k in vol_keys})
    surf = gradient_surface(dbi)
    maps = enface(dbi, ret, ori, surf, **{k: v for k, v in opts.items() if k in enf_keys})
    return {"dBI3D": dbi, "R3D": ret, "O3D": ori, "surf": surf, **maps}


# --------------------------------------------------------------------------- complex NIfTI

_NIFTI_DTYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2"}


def _parse_nifti1(data: bytes) -> tuple[tuple[int, ...], np.dtype, int]:
    """Parse the 348-byte NIfTI-1 header: (dims, dtype, vox_offset)."""
    for endian in "<>":
        if struct.unpack_from(endian + "i", data, 0)[0] == 348:
            break
    else:
        raise ValueError("not a NIfTI-1 file (sizeof_hdr != 348)")
    if data[344:347] not in (b"n+1", b"ni1"):
        raise ValueError(f"bad NIfTI magic {data[344:348]!r}")
    dim = struct.unpack_from(endian + "8h", data, 40)
    datatype = struct.unpack_from(endian + "h", data, 70)[0]
    vox_offset = int(struct.unpack_from(endian + "f", data, 108)[0])
    if datatype not in _NIFTI_DTYPES:
        raise ValueError(f"unsupported NIfTI datatype {datatype}")
    dims = tuple(int(d) for d in dim[1 : 1 + dim[0]])
    return dims, np.dtype(endian + _NIFTI_DTYPES[datatype]), vox_offset


def read_complex_nifti(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a toolbox complex tile -> ``(J1, J2)`` complex128 (A, B, Z), in-memory convention.

    The file holds float32 ``(4A, B, Z)`` column-major, ``[J1 re; J1 im; J2 re; J2 im]``
    stacked on axis 0, depth flipped by ``spectral2complex``; the flip is undone here so the
    result equals what ``spectral_to_jones`` returns (depth index 0 = FFT bin 24).
    """
    data = Path(path).read_bytes()
    dims, dtype, vox = _parse_nifti1(data)
    dims = (*dims, 1, 1, 1)[:3] if len(dims) < 3 else dims
    if len(dims) > 3 and any(d != 1 for d in dims[3:]):
        raise ValueError(f"expected a 3-D complex stack, got dims {dims}")
    n4, nb, nzz = dims[:3]
    if n4 % 4:
        raise ValueError(f"first dimension {n4} is not a multiple of 4")
    v = np.frombuffer(data, dtype=dtype, count=n4 * nb * nzz, offset=vox)
    v = v.reshape(nzz, nb, n4).transpose(2, 1, 0).astype(np.float64)  # column-major
    na = n4 // 4
    j1 = v[:na] + 1j * v[na : 2 * na]
    j2 = v[2 * na : 3 * na] + 1j * v[3 * na :]
    return j1[..., ::-1].copy(), j2[..., ::-1].copy()


def _nifti1_header(dims: tuple[int, ...], datatype: int, bitpix: int) -> bytes:
    """A minimal NIfTI-1 single-file header (348 bytes) plus 4 zero extension bytes."""
    hdr = bytearray(348)
    struct.pack_into("<i", hdr, 0, 348)
    struct.pack_into("<c", hdr, 38, b"r")
    struct.pack_into("<8h", hdr, 40, len(dims), *dims, *([1] * (7 - len(dims))))
    struct.pack_into("<hh", hdr, 70, datatype, bitpix)
    struct.pack_into("<8f", hdr, 76, 1.0, *([1.0] * 7))  # qfac 1, unit voxels
    struct.pack_into("<f", hdr, 108, 352.0)  # vox_offset
    struct.pack_into("<ff", hdr, 112, 1.0, 0.0)  # scl_slope, scl_inter
    struct.pack_into("<4s", hdr, 344, b"n+1\0")
    return bytes(hdr) + b"\0\0\0\0"


def write_complex_nifti(path: str | Path, J1: np.ndarray, J2: np.ndarray) -> None:
    """Write ``(J1, J2)`` (A, B, Z), in-memory convention, as ``spectral2complex`` does."""
    stack = np.concatenate([J1.real, J1.imag, J2.real, J2.imag], axis=0)[..., ::-1]
    stack = stack.astype("<f4")
    header = _nifti1_header(stack.shape, 16, 32)
    Path(path).write_bytes(header + stack.tobytes(order="F"))
