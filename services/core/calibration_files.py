"""The lab's calibration files, read-only: wavelength maps and dispersion phases.

* ``wave-pixel.mat`` (psoct-toolbox, MATLAB v5/v7): ``mu`` (N x 2, the 1-based camera pixel
  positions of N known wavelengths, column 1 channel 1, column 2 channel 2 counted after the
  toolbox flips channel 2) and ``wave_prime`` (N wavelengths in nm; ``wave_sample`` is accepted
  as an alias). The toolbox fits a line, wavelength vs position, per channel
  (``interpolationwave_20201130``); :func:`wave_pixel_polynomials` does the same and returns it
  over 0-based pixels.
* A wavelength table (text): one wavelength in nm per camera pixel, one column (both channels)
  or two (channel 1, channel 2), channel 2 in the same order as the ``.mat`` positions.
* A dispersion file: raw little-endian float64, one phase [rad] per resampled sample
  (psoct-toolbox ``readDispersionFile``, e.g. ``LSM03_mineral_oil_placecorrectionmeanall2.dat``),
  or a text table with the same values.

Every reader raises :class:`CalibrationFileError` naming the file and what is wrong.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from services.core.errors import CalibrationFileError
from services.core.regular_files import read_regular

MAX_CALIBRATION_BYTES = 64 << 20


def _read(path: Path) -> bytes:
    """The bytes of a calibration file: a regular file only (never a blocking open), of at
    most MAX_CALIBRATION_BYTES."""
    path = Path(path)
    try:
        return read_regular(path, MAX_CALIBRATION_BYTES)
    except FileNotFoundError:
        raise CalibrationFileError(f"{path}: calibration file not found") from None
    except OSError as exc:
        raise CalibrationFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:  # not a regular file, or larger than a calibration file can be
        raise CalibrationFileError(str(exc)) from None


def read_wave_pixel_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(mu float64[N, 2], wave_prime float64[N]) from a toolbox ``wave-pixel.mat``."""
    import scipy.io

    blob = _read(path)
    try:
        data = scipy.io.loadmat(io.BytesIO(blob))
    except NotImplementedError:
        raise CalibrationFileError(
            f"{path}: MATLAB v7.3 (HDF5) file; save it with save(..., '-v7') to read it here"
        ) from None
    except Exception as exc:  # scipy raises ValueError, TypeError, MatReadError...
        raise CalibrationFileError(f"{path}: not a readable MATLAB file: {exc}") from None
    if "mu" not in data:
        keys = sorted(k for k in data if not k.startswith("__"))
        raise CalibrationFileError(f"{path}: no variable 'mu' (found {keys})")
    waves = data.get("wave_prime", data.get("wave_sample"))
    if waves is None:
        raise CalibrationFileError(f"{path}: no variable 'wave_prime' (or 'wave_sample')")
    try:
        mu = np.asarray(data["mu"], dtype=np.float64)
        wave = np.asarray(waves, dtype=np.float64).ravel()
    except (TypeError, ValueError) as exc:
        raise CalibrationFileError(f"{path}: mu / wave_prime are not numeric: {exc}") from None
    if mu.ndim != 2 or mu.shape[1] != 2:
        raise CalibrationFileError(
            f"{path}: mu must be N x 2 (one column per channel), got {mu.shape}"
        )
    if wave.size != mu.shape[0]:
        raise CalibrationFileError(
            f"{path}: {wave.size} wavelengths in wave_prime for {mu.shape[0]} rows of mu"
        )
    if mu.shape[0] < 2:
        raise CalibrationFileError(
            f"{path}: at least 2 calibration points needed, got {mu.shape[0]}"
        )
    if not (np.isfinite(mu).all() and np.isfinite(wave).all()):
        raise CalibrationFileError(f"{path}: mu / wave_prime hold NaN or infinite values")
    if not (wave > 0).all():
        raise CalibrationFileError(f"{path}: wavelengths must be positive (nm)")
    for ch in (0, 1):
        if np.ptp(mu[:, ch]) == 0:
            raise CalibrationFileError(f"{path}: channel {ch + 1} positions are all equal")
    return mu, wave


def wave_pixel_polynomials(
    mu: np.ndarray, wave_nm: np.ndarray, n_samples: int, channel2_reversed: bool
) -> tuple[tuple[float, float], tuple[float, float]]:
    """Linear wavelength maps (nm, ascending powers of the 0-based STORED pixel index) of both
    channels, as the toolbox fits them.

    The toolbox fits lambda = a + b * p1 over 1-based positions p1 = p + 1; channel 2's
    positions count its pixels after the flip, so in stored order lambda = a + b * (n - p)
    when ``channel2_reversed``.
    """
    out = []
    for ch in (0, 1):
        b, a = np.polyfit(mu[:, ch], wave_nm, 1)
        if ch == 1 and channel2_reversed:
            out.append((float(a + b * n_samples), float(-b)))
        else:
            out.append((float(a + b), float(b)))
    return out[0], out[1]


def read_text_table(path: Path, what: str) -> np.ndarray:
    """A numeric text table (whitespace or comma separated), float64 with ndim 1 or 2."""
    blob = _read(path)
    try:
        text = blob.decode()
    except UnicodeDecodeError:
        raise CalibrationFileError(f"{path}: {what}: not a text file") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].replace(",", " ").strip()
        if not line:
            continue
        try:
            rows.append([float(v) for v in line.split()])
        except ValueError:
            raise CalibrationFileError(f"{path}: {what}: line {n} is not numeric") from None
    if not rows:
        raise CalibrationFileError(f"{path}: {what}: no values")
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise CalibrationFileError(f"{path}: {what}: rows have different numbers of columns")
    table = np.asarray(rows, dtype=np.float64)
    if not np.isfinite(table).all():
        raise CalibrationFileError(f"{path}: {what}: NaN or infinite values")
    return table[:, 0] if table.shape[1] == 1 else table


def read_wavelength_table(path: Path, n_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """(channel 1, channel 2) wavelengths in nm per pixel from a 1- or 2-column text table;
    channel 2 as listed (flip it with ``channel2_reversed``)."""
    table = read_text_table(path, "wavelength table")
    if table.ndim == 1:
        table = np.stack([table, table], axis=1)
    if table.shape[1] != 2:
        raise CalibrationFileError(
            f"{path}: wavelength table: 1 or 2 columns (nm per pixel), got {table.shape[1]}"
        )
    if table.shape[0] != n_samples:
        raise CalibrationFileError(
            f"{path}: wavelength table: {table.shape[0]} rows for {n_samples} camera pixels"
        )
    return table[:, 0], table[:, 1]


def read_dispersion(path: Path, n_samples: int) -> np.ndarray:
    """Dispersion phase [rad] per resampled sample: raw little-endian float64 (``.dat``,
    ``.bin``, ``.raw``) or a one-column text table (``.txt``, ``.csv``)."""
    path = Path(path)
    if path.suffix.lower() in (".txt", ".csv", ".tsv"):
        values = read_text_table(path, "dispersion table")
        if values.ndim != 1:
            raise CalibrationFileError(f"{path}: dispersion table must have one column")
    else:
        blob = _read(path)
        if len(blob) % 8:
            raise CalibrationFileError(
                f"{path}: {len(blob)} bytes is not a whole number of float64 values (8 bytes each)"
            )
        values = np.frombuffer(blob, dtype="<f8")
        if not np.isfinite(values).all():
            raise CalibrationFileError(
                f"{path}: NaN or infinite phases (is it really raw little-endian float64?)"
            )
    if values.size != n_samples:
        raise CalibrationFileError(
            f"{path}: {values.size} dispersion phases for {n_samples} samples per spectrum"
        )
    return values
