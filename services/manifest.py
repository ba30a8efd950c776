"""The acquisition manifest: one TOML file describing the lattice, files, format and calibration."""

from __future__ import annotations

import re
import string
import tomllib
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from messages.events import TileCoord
from services.config import format_validation_error

RawFormat = Literal["nifti-spectral", "raw12", "tiff"]
PATTERN_FIELDS = {"slice", "mosaic", "index", "row", "col"}


class ManifestError(ValueError):
    """A manifest that cannot be used, with field names and reasons."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Lattice(Strict):
    """Slices x mosaics x rows x cols, scan order and the nominal stage model."""

    slices: Annotated[int, Field(ge=1, le=100_000)]
    mosaics: Annotated[int, Field(ge=1, le=16)] = 1
    rows: Annotated[int, Field(ge=1, le=1000)]
    cols: Annotated[int, Field(ge=1, le=1000)]
    scan_order: Literal["raster", "serpentine"] = "serpentine"
    overlap: Annotated[float, Field(ge=0.0, lt=0.9)] = 0.2
    pixel_size_um: Annotated[float, Field(gt=0)] = 10.0
    slice_thickness_um: Annotated[float, Field(gt=0)] = 200.0
    stage_origin_um: tuple[float, float] = (0.0, 0.0)
    position_tolerance_px: Annotated[float, Field(gt=0)] = 10.0

    @property
    def tiles_per_mosaic(self) -> int:
        return self.rows * self.cols

    @property
    def tiles_per_slice(self) -> int:
        return self.tiles_per_mosaic * self.mosaics

    @property
    def tiles(self) -> int:
        return self.tiles_per_slice * self.slices

    def row_col(self, index: int) -> tuple[int, int]:
        """Row and column of the `index`-th tile in scan order."""
        if not 0 <= index < self.tiles_per_mosaic:
            raise ValueError(f"tile index {index} outside 0..{self.tiles_per_mosaic - 1}")
        row, col = divmod(index, self.cols)
        if self.scan_order == "serpentine" and row % 2 == 1:
            col = self.cols - 1 - col
        return row, col

    def index_of(self, row: int, col: int) -> int:
        """Scan-order index of a tile."""
        if not (0 <= row < self.rows and 0 <= col < self.cols):
            raise ValueError(f"tile r{row} c{col} outside {self.rows}x{self.cols}")
        if self.scan_order == "serpentine" and row % 2 == 1:
            col = self.cols - 1 - col
        return row * self.cols + col

    def coords(self) -> Iterator[TileCoord]:
        """Every tile of the acquisition, in acquisition order."""
        for s in range(self.slices):
            for m in range(self.mosaics):
                for i in range(self.tiles_per_mosaic):
                    r, c = self.row_col(i)
                    yield TileCoord(slice=s, mosaic=m, row=r, col=c, index=i)

    def neighbours(self, row: int, col: int) -> list[tuple[int, int]]:
        """Lattice neighbours (up, down, left, right) of a tile."""
        out = [(row + dr, col + dc) for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1))]
        return [(r, c) for r, c in out if 0 <= r < self.rows and 0 <= c < self.cols]


class RawLayout(Strict):
    """Raw tile format and size: `samples` per spectrum, A-lines per B-line, B-lines."""

    format: RawFormat = "nifti-spectral"
    samples: Annotated[int, Field(ge=16, le=16384)] = 2048
    alines: Annotated[int, Field(ge=1, le=10_000)] = 350
    bscans: Annotated[int, Field(ge=1, le=10_000)] = 350
    channels: Literal[2] = 2

    @property
    def values(self) -> int:
        return self.samples * self.alines * self.bscans * self.channels

    @property
    def expected_bytes(self) -> int:
        """Exact size of a complete tile file (TIFF: payload only, a lower bound)."""
        from services.rawio import NIFTI_HEADER_BYTES

        if self.format == "raw12":
            return (self.values * 3 + 1) // 2
        payload = self.values * 2
        return payload + (NIFTI_HEADER_BYTES if self.format == "nifti-spectral" else 0)


class Calibration(Strict):
    """Spectrometer calibration (see `kernels.calibration.SpectrometerCalibration` for units).

    `wavelength_file` (one wavelength in nm per camera pixel, text) and
    `dispersion_phase_file` (one phase in rad per resampled sample) are relative to the
    manifest's directory; they override the polynomial forms.
    """

    wavelength_poly_nm: tuple[float, ...] = (1220.0, 0.090376, -4.7731e-6)
    wavelength_file: str | None = None
    dispersion: tuple[float, float] = (0.0, 0.0)
    dispersion_phase_file: str | None = None
    autocorr_bins: Annotated[int, Field(ge=0)] = 24
    depth_range: tuple[int, int] | None = None
    interpolation: Literal["linear", "cubic"] = "cubic"
    window: Literal["hann", "none"] = "hann"
    flip_z: bool = False
    orientation_offset_deg: float = 0.0
    orientation_sign: Literal[1, -1] = 1
    background: Literal["mean", "median"] = "mean"


class Manifest(Strict):
    """One acquisition."""

    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: str = ""
    lattice: Lattice
    pattern: Annotated[str, Field(min_length=1, max_length=500)] = (
        "slice{slice:03d}/mosaic{mosaic}/tile_{index:04d}.nii"
    )
    raw: RawLayout = Field(default_factory=RawLayout)
    calibration: Calibration = Field(default_factory=Calibration)
    settle_s: Annotated[float, Field(ge=0, le=3600)] = 1.0
    ignore: list[str] = Field(
        default_factory=lambda: ["*.json", "*.txt", "*.csv", "*.md", "*.log", "calibration/*"],
        description="glob patterns (relative to the manifest's directory) the watcher skips",
    )
    source: Path | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _pattern_is_usable(self) -> Manifest:
        names = {f for _, f, _, _ in string.Formatter().parse(self.pattern) if f}
        unknown = names - PATTERN_FIELDS
        if unknown:
            raise ValueError(
                f"pattern uses unknown fields {sorted(unknown)}; allowed: {sorted(PATTERN_FIELDS)}"
            )
        if not ({"index"} <= names or {"row", "col"} <= names):
            raise ValueError("pattern must name the tile by {index} or by {row} and {col}")
        if self.lattice.slices > 1 and "slice" not in names:
            raise ValueError("pattern must contain {slice} when there are several slices")
        if self.lattice.mosaics > 1 and "mosaic" not in names:
            raise ValueError("pattern must contain {mosaic} when there are several mosaics")
        if self.pattern.startswith("/") or ".." in Path(self.pattern).parts:
            raise ValueError("pattern must be relative to the raw root, without '..'")
        return self

    # ---------------------------------------------------------------- file names <-> tiles
    def path_of(self, tile: TileCoord) -> str:
        """Raw-root-relative file name of a tile."""
        index = self.lattice.index_of(tile.row, tile.col)
        return self.pattern.format(
            slice=tile.slice, mosaic=tile.mosaic, index=index, row=tile.row, col=tile.col
        )

    @cached_property
    def _regex(self) -> re.Pattern[str]:
        out, seen = [], set()
        for literal, name, _spec, _ in string.Formatter().parse(self.pattern):
            out.append(re.escape(literal))
            if name is None:
                continue
            out.append(f"(?P={name})" if name in seen else rf"(?P<{name}>\d+)")
            seen.add(name)
        return re.compile("^" + "".join(out) + "$")

    def ignored(self, rel: str) -> bool:
        """Whether a file beside the tiles is a known sidecar (calibration, notes, truth)."""
        from fnmatch import fnmatch

        return any(fnmatch(rel, pattern) for pattern in self.ignore)

    def parse(self, rel: str) -> TileCoord | None:
        """The tile a raw-root-relative name belongs to, or None if it does not match.

        Raises ValueError for a name that matches the pattern but lies outside the lattice.
        """
        match = self._regex.match(rel)
        if match is None:
            return None
        fields = {k: int(v) for k, v in match.groupdict().items()}
        s, m = fields.get("slice", 0), fields.get("mosaic", 0)
        lat = self.lattice
        if not (0 <= s < lat.slices and 0 <= m < lat.mosaics):
            raise ValueError(f"{rel}: slice {s} / mosaic {m} outside the lattice")
        if "index" in fields:
            row, col = lat.row_col(fields["index"])
        else:
            row, col = fields["row"], fields["col"]
        index = lat.index_of(row, col)
        return TileCoord(slice=s, mosaic=m, row=row, col=col, index=index)

    # ------------------------------------------------------------------ stage model
    @property
    def step_px(self) -> tuple[float, float]:
        """Nominal stage step between neighbouring tiles in pixels (y, x)."""
        return (
            self.raw.bscans * (1 - self.lattice.overlap),
            self.raw.alines * (1 - self.lattice.overlap),
        )

    def nominal_position_px(self, row: int, col: int) -> tuple[float, float]:
        """Nominal top-left corner of a tile in mosaic pixels (y, x)."""
        dy, dx = self.step_px
        return row * dy, col * dx

    # ------------------------------------------------------------------ calibration
    def _calibration_file(self, name: str) -> np.ndarray:
        base = self.source.parent if self.source is not None else Path.cwd()
        path = (base / name).resolve()
        try:
            values = np.loadtxt(path, dtype=np.float64, ndmin=1)
        except (OSError, ValueError) as exc:
            raise ManifestError(f"calibration file {path}: {exc}") from None
        return values

    def spectrometer(self):
        """The kernel calibration (`kernels.calibration.SpectrometerCalibration`)."""
        from kernels.calibration import SpectrometerCalibration

        cal = self.calibration
        poly = cal.wavelength_poly_nm
        if cal.wavelength_file:
            table = self._calibration_file(cal.wavelength_file)
            if table.size != self.raw.samples:
                raise ManifestError(
                    f"{cal.wavelength_file}: {table.size} wavelengths for "
                    f"{self.raw.samples} camera pixels"
                )
            degree = 3
            pixels = np.arange(table.size, dtype=np.float64)
            poly = tuple(np.polynomial.polynomial.polyfit(pixels, table, degree))
        phase = None
        if cal.dispersion_phase_file:
            phase = tuple(self._calibration_file(cal.dispersion_phase_file))
        try:
            return SpectrometerCalibration(
                n_samples=self.raw.samples,
                wavelength_poly_nm=poly,
                dispersion_coeffs=cal.dispersion,
                dispersion_phase=phase,
                autocorr_bins=cal.autocorr_bins,
                depth_range=cal.depth_range,
                interpolation=cal.interpolation,
                window=cal.window,
                flip_z=cal.flip_z,
                orientation_offset_deg=cal.orientation_offset_deg,
                orientation_sign=cal.orientation_sign,
                background=cal.background,
            )
        except ValueError as exc:
            raise ManifestError(f"calibration: {exc}") from None


def load_manifest(path: Path) -> Manifest:
    """Read and validate a manifest; ManifestError lists every bad field."""
    path = Path(path)
    try:
        data: dict[str, Any] = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{path}: manifest not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: not valid TOML: {exc}") from None
    try:
        return Manifest.model_validate({**data, "source": path.resolve()})
    except ValidationError as exc:
        raise ManifestError(
            format_validation_error(exc, str(path)).replace(
                "invalid configuration", "invalid manifest"
            )
        ) from None


def dump_manifest(manifest: Manifest) -> str:
    """TOML text of a manifest (the simulator writes one next to its acquisition)."""
    from services.tomlio import to_toml

    return to_toml(manifest.model_dump(mode="json"))
