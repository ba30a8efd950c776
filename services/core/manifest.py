"""The acquisition manifest: one TOML file describing the lattice, files, format and calibration.

Geometry: a slice holds ``lattice.mosaics`` mosaics (e.g. normal and tilted illumination); each
mosaic has its own grid, tile size and illumination (``[[mosaic]]`` tables, defaults from
``[lattice]`` and ``[raw]``); :meth:`Manifest.geometry` resolves one.

File names: ``pattern`` with the fields ``{slice}``, ``{mosaic}``, ``{index}`` (scan order),
``{row}``, ``{col}``, ``{file}`` (a running file number, mosaics of a slice interleaved) and
``{counter}`` (a number the microscope writes that tilepipe ignores), counted as
``[numbering]`` says: from 0 or 1, mosaics per slice or through the acquisition (the
instrument's ``mosaic_%03d``: slice s, counted from 1, holds mosaics 2s-1 and 2s).

Conventions: ``[processing] preset`` = "tilepipe" or "toolbox" (psoct-toolbox's chain step for
step); every field can be set on its own (see docs/conventions.md).
"""

from __future__ import annotations

import os
import re
import string
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, fields
from fnmatch import fnmatch
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kernels.calibration import SpectrometerCalibration
from kernels.pipeline import ProcessingParams
from messages.events import MAX_INDEX, TileCoord
from services.core.calibration_files import (
    read_dispersion,
    read_text_table,
    read_wave_pixel_mat,
    read_wavelength_table,
    wave_pixel_polynomials,
)
from services.core.config import format_validation_error
from services.core.errors import (
    CalibrationFileError,
    InvalidManifest,
    ManifestError,
    NotRegularFile,
)
from services.core.names import Names
from services.core.regular_files import open_regular
from services.core.tomlio import to_toml, toml_read_errors

# the processing conventions the spectrometer calibration takes (the others are the pipeline's)
SPECTROMETER_CONVENTIONS = frozenset(f.name for f in fields(SpectrometerCalibration))
RawFormat = Literal["nifti-spectral", "raw12", "tiff", "nifti-complex"]
SPECTRAL_FORMATS = ("nifti-spectral", "raw12", "tiff")
PATTERN_FIELDS = {"slice", "mosaic", "index", "row", "col", "file", "counter"}
NIFTI_HEADER_BYTES = 352  # 348-byte NIfTI-1 header + 4 extension bytes, as the microscope writes
MAX_TILES = MAX_INDEX  # tiles per acquisition: the events' bound (acq_started.tiles_expected)
MAX_MANIFEST_BYTES = 1 << 20
# files beside the tiles the watcher skips by default (notes, calibrations, manifests)
SIDECARS = (
    "*.json",
    "*.txt",
    "*.csv",
    "*.md",
    "*.log",
    "*.mat",
    "*.dat",
    "*.toml",
    "calibration/*",
)

_ROW_DIRECTIONS = ("right-down", "left-down", "right-up", "left-up")
_COL_DIRECTIONS = ("down-right", "down-left", "up-right", "up-left")
FIJI_ORDERS = tuple(
    [f"{kind}-{d}" for kind in ("row-by-row", "snake-by-rows") for d in _ROW_DIRECTIONS]
    + [f"{kind}-{d}" for kind in ("column-by-column", "snake-by-columns") for d in _COL_DIRECTIONS]
)
ScanOrder = Literal[
    "raster",
    "serpentine",
    "row-by-row-right-down",
    "row-by-row-left-down",
    "row-by-row-right-up",
    "row-by-row-left-up",
    "snake-by-rows-right-down",
    "snake-by-rows-left-down",
    "snake-by-rows-right-up",
    "snake-by-rows-left-up",
    "column-by-column-down-right",
    "column-by-column-down-left",
    "column-by-column-up-right",
    "column-by-column-up-left",
    "snake-by-columns-down-right",
    "snake-by-columns-down-left",
    "snake-by-columns-up-right",
    "snake-by-columns-up-left",
]
ALIASES = {"raster": "row-by-row-right-down", "serpentine": "snake-by-rows-right-down"}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------- grid orders
def glob_escape(text: str) -> str:
    """`text` as a literal in a glob pattern."""
    return re.sub(r"([*?\[])", r"[\1]", text)


def grid_position(order: str, k: int, rows: int, cols: int) -> tuple[int, int]:
    """(row, col) of the k-th tile (0-based) in a Fiji grid order; row 0 is the top row and
    column 0 the left column (e.g. "snake-by-columns-up-right": column 0 bottom to top, column
    1 top to bottom, ...)."""
    order = ALIASES.get(order, order)
    kind, first, second = _split_order(order)
    if kind in ("row-by-row", "snake-by-rows"):
        pos, q = divmod(k, cols)
        row = pos if second == "down" else rows - 1 - pos
        forward = first == "right"
        if kind == "snake-by-rows" and pos % 2 == 1:
            forward = not forward
        return row, q if forward else cols - 1 - q
    pos, q = divmod(k, rows)
    col = pos if second == "right" else cols - 1 - pos
    forward = first == "down"
    if kind == "snake-by-columns" and pos % 2 == 1:
        forward = not forward
    return (q if forward else rows - 1 - q), col


def grid_index(order: str, row: int, col: int, rows: int, cols: int) -> int:
    """Inverse of :func:`grid_position`."""
    order = ALIASES.get(order, order)
    kind, first, second = _split_order(order)
    if kind in ("row-by-row", "snake-by-rows"):
        pos = row if second == "down" else rows - 1 - row
        forward = first == "right"
        if kind == "snake-by-rows" and pos % 2 == 1:
            forward = not forward
        return pos * cols + (col if forward else cols - 1 - col)
    pos = col if second == "right" else cols - 1 - col
    forward = first == "down"
    if kind == "snake-by-columns" and pos % 2 == 1:
        forward = not forward
    return pos * rows + (row if forward else rows - 1 - row)


def _split_order(order: str) -> tuple[str, str, str]:
    if order not in FIJI_ORDERS:
        raise ValueError(f"unknown scan order {order!r}")
    kind, first, second = order.rsplit("-", 2)
    return kind, first, second


# ---------------------------------------------------------------------------- models
class Lattice(Strict):
    """Slices x mosaics x rows x cols, scan order and the nominal stage model (the defaults
    every mosaic inherits; ``[[mosaic]]`` overrides them per mosaic)."""

    slices: Annotated[int, Field(ge=1, le=100_000)]
    mosaics: Annotated[int, Field(ge=1, le=16)] = 1
    rows: Annotated[int, Field(ge=1, le=1000)]
    cols: Annotated[int, Field(ge=1, le=1000)]
    scan_order: ScanOrder = "serpentine"
    overlap: Annotated[float, Field(ge=0.0, lt=0.9)] = 0.2
    pixel_size_um: Annotated[float, Field(gt=0)] = 10.0
    axial_pixel_um: Annotated[float, Field(gt=0)] = 2.5
    slice_thickness_um: Annotated[float, Field(gt=0)] = 200.0
    stage_origin_um: tuple[float, float] = (0.0, 0.0)
    position_tolerance_px: Annotated[float, Field(gt=0)] = 10.0
    stage_repeatability_px: Annotated[float, Field(gt=0, le=1000)] | None = Field(
        default=None,
        description="how far a tile may land from its stage position (px, per axis); pairs "
        "then deviate from nominal by up to twice it, which replaces position_tolerance_px",
    )

    @property
    def pair_tolerance_px(self) -> float:
        """How far a neighbour pair's shift may deviate from the stage model (px, per axis)."""
        if self.stage_repeatability_px is not None:
            return 2.0 * self.stage_repeatability_px
        return self.position_tolerance_px


class RawLayout(Strict):
    """Raw tile format and size: `samples` per spectrum, A-lines per B-line, B-lines; complex
    tiles (``nifti-complex``) hold `depth` complex samples per A-line instead of spectra."""

    format: RawFormat = "nifti-spectral"
    samples: Annotated[int, Field(ge=16, le=16384)] = 2048
    alines: Annotated[int, Field(ge=1, le=10_000)] = 350
    bscans: Annotated[int, Field(ge=1, le=10_000)] = 350
    channels: Literal[2] = 2
    depth: Annotated[int, Field(ge=1, le=16384)] | None = None

    @property
    def complex(self) -> bool:
        return self.format == "nifti-complex"

    @property
    def values(self) -> int:
        """Stored values of a tile (uint16 samples, or float32 real and imaginary parts)."""
        if self.complex:
            return 2 * self.bscans * self.alines * self.channels * self.complex_depth
        return self.samples * self.alines * self.bscans * self.channels

    @property
    def complex_depth(self) -> int:
        """Complex samples per A-line (default: FFT bins 24 .. samples / 2 - 1)."""
        return self.depth if self.depth is not None else self.samples // 2 - 24

    @property
    def expected_bytes(self) -> int:
        """Exact size of a complete tile file (TIFF: payload only, a lower bound)."""
        if self.format == "raw12":
            return (self.values * 3 + 1) // 2
        if self.complex:
            return self.values * 4 + NIFTI_HEADER_BYTES
        payload = self.values * 2
        return payload + (NIFTI_HEADER_BYTES if self.format == "nifti-spectral" else 0)


class MosaicSpec(Strict):
    """One mosaic of every slice; unset fields inherit from ``[lattice]`` and ``[raw]``."""

    illumination: Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")] = "normal"
    tilt_deg: float = 0.0
    rows: Annotated[int, Field(ge=1, le=1000)] | None = None
    cols: Annotated[int, Field(ge=1, le=1000)] | None = None
    alines: Annotated[int, Field(ge=1, le=10_000)] | None = None
    bscans: Annotated[int, Field(ge=1, le=10_000)] | None = None
    scan_order: ScanOrder | None = None
    overlap: Annotated[float, Field(ge=0.0, lt=0.9)] | None = None
    mask_threshold_db: Annotated[float, Field(ge=-100.0, le=300.0)] | None = Field(
        default=None,
        description="AIP level [dB] above which the (Gaussian sigma 5 px smoothed) AIP mosaic "
        "is tissue; default 60 for normal illumination, 55 for a tilted one (the lab's)",
    )


# the lab's mask thresholds [dB] on the smoothed AIP mosaic (psoct-toolbox thruplane defaults
# as the lab runs them: 60 normal, 55 tilted)
MASK_THRESHOLD_DB = {"normal": 60.0, "tilted": 55.0}


def default_mask_threshold(illumination: str, tilt_deg: float) -> float:
    """The lab's threshold for a mosaic: 55 dB for a tilted beam, 60 dB otherwise."""
    tilted = tilt_deg != 0.0 or illumination == "tilted"
    return MASK_THRESHOLD_DB["tilted" if tilted else "normal"]


class Numbering(Strict):
    """How the numbers in file names count."""

    base: Literal[0, 1] = 0
    mosaic: Literal["per-slice", "global"] = "per-slice"
    slice_offset: Annotated[int, Field(ge=0, le=1_000_000)] = 0


class Calibration(Strict):
    """Spectrometer calibration of the instrument (units: ``kernels.calibration``).

    Wavelengths come from, by precedence: ``wave_pixel_mat`` (the toolbox's ``mu`` /
    ``wave_prime``, fitted linearly like the toolbox), ``wavelength_file`` (nm per pixel, one
    column or two), the polynomials. ``channel2_reversed``: channel 2's pixels are stored in
    reverse order (the toolbox flips them first); the ``.mat`` positions and a table's second
    column count channel 2 after that flip. ``wavelength_poly_nm_ch2`` is in stored order.
    Dispersion: ``dispersion_file`` (raw float64 ``.dat`` or text), one phase per resampled
    sample, else the polynomial ``dispersion``. Files are relative to the manifest.
    """

    wavelength_poly_nm: tuple[float, ...] = (1220.0, 0.090376, -4.7731e-6)
    wavelength_poly_nm_ch2: tuple[float, ...] | None = None
    wavelength_file: str | None = None
    wavelength_fit_degree: Annotated[int, Field(ge=1, le=5)] = 3
    wave_pixel_mat: str | None = None
    channel2_reversed: bool | None = None
    dispersion: tuple[float, float] = (0.0, 0.0)
    dispersion_file: str | None = None
    dispersion_phase_file: str | None = None
    autocorr_bins: Annotated[int, Field(ge=0)] = 24
    depth_range: tuple[int, int] | None = None
    center_wavelength_um: Annotated[float, Field(gt=0, le=20)] = 1.3

    def files(self) -> dict[str, str]:
        """Every calibration file the manifest names, by field."""
        names = ("wave_pixel_mat", "wavelength_file", "dispersion_file", "dispersion_phase_file")
        return {n: getattr(self, n) for n in names if getattr(self, n)}


class Processing(Strict):
    """Processing conventions: a preset, and any field set on its own (None = the preset's)."""

    preset: Literal["tilepipe", "toolbox"] = "tilepipe"
    interpolation: Literal["linear", "cubic"] | None = None
    window: Literal["hann", "none"] | None = None
    background: Literal["mean", "median"] | None = None
    background_after: Literal["none", "median"] | None = None
    flip_z: bool | None = None
    orientation_offset_deg: float | None = None
    orientation_sign: Literal[1, -1] | None = None
    orientation_wrap: Literal["full", "once"] | None = None
    surface_method: Literal["threshold", "gradient"] | None = None
    enface_offset: Annotated[int, Field(ge=-1000, le=1000)] | None = None
    enface_thickness: Annotated[int, Field(ge=1, le=10_000)] | None = None
    enface_window: Literal["half-open", "inclusive"] | None = None

    def resolved(self) -> dict[str, Any]:
        """Every convention, explicit fields over the preset's values."""
        out = {k: v for k, v in PRESETS[self.preset].items() if k in Processing.model_fields}
        for name in out:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


PRESETS: dict[str, dict[str, Any]] = {
    "tilepipe": {
        "interpolation": "cubic",
        "window": "hann",
        "background": "mean",
        "background_after": "none",
        "flip_z": False,
        "orientation_offset_deg": 0.0,
        "orientation_sign": 1,
        "orientation_wrap": "full",
        "surface_method": "threshold",
        "enface_offset": 0,
        "enface_thickness": 70,
        "enface_window": "half-open",
        "channel2_reversed": False,
    },
    "toolbox": {  # psoct-toolbox spectral2complex -> complex2volumes -> vol2enface
        "interpolation": "linear",
        "window": "none",
        "background": "mean",
        "background_after": "median",
        "flip_z": False,  # its flipZ = true undoes the flip of its complex files: no net flip
        "orientation_offset_deg": 100.0,  # phaseOffset
        "orientation_sign": -1,  # it conjugates J; flipPhase = false
        "orientation_wrap": "once",
        "surface_method": "gradient",
        "enface_offset": 0,
        "enface_thickness": 70,  # Depth = 70: surface .. surface + 70 inclusive
        "enface_window": "inclusive",
        "channel2_reversed": True,
    },
}


@dataclass(frozen=True)
class MosaicGeometry:
    """One mosaic's grid and tiles, resolved from the manifest."""

    index: int
    illumination: str
    tilt_deg: float
    rows: int
    cols: int
    scan_order: str
    overlap: float
    raw: RawLayout
    pixel_size_um: float
    position_tolerance_px: float
    mask_threshold_db: float  # the manifest's, else default_mask_threshold()

    @property
    def tiles(self) -> int:
        return self.rows * self.cols

    def row_col(self, index: int) -> tuple[int, int]:
        """Row and column of the `index`-th tile in scan order."""
        if not 0 <= index < self.tiles:
            raise ValueError(f"tile index {index} outside 0..{self.tiles - 1}")
        return grid_position(self.scan_order, index, self.rows, self.cols)

    def index_of(self, row: int, col: int) -> int:
        """Scan-order index of a tile."""
        if not (0 <= row < self.rows and 0 <= col < self.cols):
            raise ValueError(f"tile r{row} c{col} outside {self.rows}x{self.cols}")
        return grid_index(self.scan_order, row, col, self.rows, self.cols)

    def neighbours(self, row: int, col: int) -> list[tuple[int, int]]:
        """Lattice neighbours (up, down, left, right) of a tile."""
        out = [(row + dr, col + dc) for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1))]
        return [(r, c) for r, c in out if 0 <= r < self.rows and 0 <= c < self.cols]

    @property
    def step_px(self) -> tuple[float, float]:
        """Nominal stage step between neighbouring tiles in pixels (y, x)."""
        return self.raw.bscans * (1 - self.overlap), self.raw.alines * (1 - self.overlap)

    def nominal_position_px(self, row: int, col: int) -> tuple[float, float]:
        """Nominal top-left corner of a tile in mosaic pixels (y, x)."""
        dy, dx = self.step_px
        return row * dy, col * dx


class Manifest(Strict):
    """One acquisition."""

    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: Annotated[str, Field(max_length=4000)] = ""
    lattice: Lattice
    mosaic: Annotated[list[MosaicSpec], Field(max_length=16)] = Field(default_factory=list)
    numbering: Numbering = Field(default_factory=Numbering)
    pattern: Annotated[str, Field(min_length=1, max_length=500)] = (
        "slice{slice:03d}/mosaic{mosaic}/tile_{index:04d}.nii"
    )
    alt_patterns: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=500)]], Field(max_length=8)
    ] = Field(
        default_factory=list,
        description="other names the same tiles may have (same fields), e.g. _processed_cropped",
    )
    raw: RawLayout = Field(default_factory=RawLayout)
    calibration: Calibration = Field(default_factory=Calibration)
    processing: Processing = Field(default_factory=Processing)
    settle_s: Annotated[float, Field(ge=0, le=3600)] = 1.0
    names: Names = Field(
        default_factory=Names, description="published file names (services/core/names.py)"
    )
    ignore: Annotated[list[Annotated[str, Field(max_length=500)]], Field(max_length=100)] = Field(
        default_factory=lambda: list(SIDECARS),
        description="glob patterns (relative to the manifest's directory) the watcher skips",
    )
    source: Path | None = Field(default=None, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _complex_depth(cls, data: Any) -> Any:
        """A complex tile's depth defaults to every FFT bin from the autocorrelation cut."""
        if not isinstance(data, dict):
            return data
        raw, cal = data.get("raw"), data.get("calibration")
        if isinstance(raw, RawLayout):
            raw = raw.model_dump()
        if isinstance(cal, Calibration):
            cal = cal.model_dump()
        if (
            isinstance(raw, dict)
            and raw.get("format") == "nifti-complex"
            and raw.get("depth") is None
        ):
            samples = raw.get("samples", RawLayout.model_fields["samples"].default)
            cut = (cal or {}).get(
                "autocorr_bins", Calibration.model_fields["autocorr_bins"].default
            )
            if isinstance(samples, int) and isinstance(cut, int):
                data = {**data, "raw": {**raw, "depth": max(1, samples // 2 - cut)}}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        names = self._fields
        for alt in self.alt_patterns:
            alt_names = {f for _, f, _, _ in string.Formatter().parse(alt) if f}
            if alt_names != names:
                raise ValueError(
                    f"alt_patterns entry {alt!r} uses fields {sorted(alt_names)}; the pattern "
                    f"uses {sorted(names)}"
                )
            if alt.startswith("/") or ".." in Path(alt).parts:
                raise ValueError("alt_patterns must be relative to the raw root, without '..'")
        unknown = names - PATTERN_FIELDS
        if unknown:
            raise ValueError(
                f"pattern uses unknown fields {sorted(unknown)}; allowed: {sorted(PATTERN_FIELDS)}"
            )
        for pattern in self.patterns:
            for _, name, spec, conv in string.Formatter().parse(pattern):
                if name is not None and (conv or (spec and not re.fullmatch(r"0?\d{0,2}d", spec))):
                    raise ValueError(f"pattern field {{{name}}}: only integer formats like :04d")
        if not ({"index"} <= names or {"row", "col"} <= names or "file" in names):
            raise ValueError("pattern must name the tile by {index}, by {row} and {col}, or {file}")
        global_mosaic = "mosaic" in names and self.numbering.mosaic == "global"
        if self.lattice.slices > 1 and not ({"slice", "file"} & names or global_mosaic):
            raise ValueError(
                "pattern must tell slices apart when there are several: {slice}, {file}, or "
                "{mosaic} with numbering.mosaic = 'global'"
            )
        if self.lattice.mosaics > 1 and not ({"mosaic", "file"} & names):
            raise ValueError("pattern must contain {mosaic} (or {file}) with several mosaics")
        if self.pattern.startswith("/") or ".." in Path(self.pattern).parts:
            raise ValueError("pattern must be relative to the raw root, without '..'")
        if self.mosaic and len(self.mosaic) != self.lattice.mosaics:
            raise ValueError(
                f"{len(self.mosaic)} [[mosaic]] tables for lattice.mosaics = {self.lattice.mosaics}"
            )
        if "file" in names:
            sizes = {self.geometry(m).tiles for m in range(self.lattice.mosaics)}
            if len(sizes) > 1:
                raise ValueError("{file} interleaves mosaics: they need the same number of tiles")
        if self.tiles > MAX_TILES:
            raise ValueError(f"{self.tiles} tiles; an acquisition holds at most {MAX_TILES}")
        self.names.check(
            self.project,
            [self.acq_label(m) for m in range(self.lattice.mosaics)],
            max_slice=self.lattice.slices + self.numbering.slice_offset,
            max_tile=max(g.tiles for g in self._geometries),
        )
        return self

    # ---------------------------------------------------------------- published names
    @property
    def project(self) -> str:
        """The project name in published file names (``[names] project``, else the id)."""
        return self.names.label(self.id)[0]

    @property
    def subject(self) -> str:
        """The DANDI/BIDS subject label (``[names] subject``, else the project's letters and
        digits)."""
        return self.names.label(self.id)[1]

    def acq_label(self, mosaic: int) -> str:
        """A mosaic's ``{acq}`` in names: its illumination, with its index appended when
        another mosaic of the slice has the same illumination."""
        labels = [g.illumination for g in self._geometries]
        label = labels[mosaic]
        return label if labels.count(label) == 1 else f"{label}{mosaic}"

    def published_name(
        self,
        kind: str,
        *,
        slice_index: int | None = None,
        mosaic: int | None = None,
        tile: TileCoord | None = None,
        modality: str | None = None,
    ) -> str:
        """The file name ``[names] <kind>`` gives one artifact (tilepipe's 0-based slice
        and mosaic indices in, the lab's numbers out)."""
        if tile is not None:
            slice_index, mosaic = tile.slice, tile.mosaic
        fields: dict[str, Any] = {"project": self.project}
        if slice_index is not None:
            fields["slice"] = slice_index + self.numbering.slice_offset + 1
        if mosaic is not None:
            fields.update(mosaic=mosaic, acq=self.acq_label(mosaic))
        if tile is not None:
            fields["tile"] = self.geometry(tile.mosaic).index_of(tile.row, tile.col) + 1
        if modality is not None:
            fields["modality"] = modality
        return self.names.render(kind, fields)

    # ---------------------------------------------------------------- geometry
    @cached_property
    def _geometries(self) -> tuple[MosaicGeometry, ...]:
        lat, raw = self.lattice, self.raw
        out = []
        for m in range(lat.mosaics):
            spec = self.mosaic[m] if self.mosaic else MosaicSpec()
            layout = raw.model_copy(
                update={
                    "alines": spec.alines or raw.alines,
                    "bscans": spec.bscans or raw.bscans,
                }
            )
            out.append(
                MosaicGeometry(
                    index=m,
                    illumination=spec.illumination,
                    tilt_deg=spec.tilt_deg,
                    rows=spec.rows or lat.rows,
                    cols=spec.cols or lat.cols,
                    scan_order=spec.scan_order or lat.scan_order,
                    overlap=lat.overlap if spec.overlap is None else spec.overlap,
                    raw=layout,
                    pixel_size_um=lat.pixel_size_um,
                    position_tolerance_px=lat.pair_tolerance_px,
                    mask_threshold_db=(
                        default_mask_threshold(spec.illumination, spec.tilt_deg)
                        if spec.mask_threshold_db is None
                        else spec.mask_threshold_db
                    ),
                )
            )
        return tuple(out)

    def geometry(self, mosaic: int = 0) -> MosaicGeometry:
        """The resolved geometry of one mosaic of every slice."""
        if not 0 <= mosaic < self.lattice.mosaics:
            raise ValueError(f"mosaic {mosaic} outside 0..{self.lattice.mosaics - 1}")
        return self._geometries[mosaic]

    @property
    def tiles_per_slice(self) -> int:
        return sum(g.tiles for g in self._geometries)

    @property
    def tiles(self) -> int:
        """Tiles of the whole acquisition."""
        return self.tiles_per_slice * self.lattice.slices

    def coords(self) -> Iterator[TileCoord]:
        """Every tile of the acquisition, in acquisition order."""
        for s in range(self.lattice.slices):
            for g in self._geometries:
                for i in range(g.tiles):
                    r, c = g.row_col(i)
                    yield TileCoord(slice=s, mosaic=g.index, row=r, col=c, index=i)

    def grids(self) -> tuple[int, list[tuple[int, int, str]]]:
        """(slices, [(rows, cols, illumination) per mosaic]): the lattice as status draws it."""
        return self.lattice.slices, [(g.rows, g.cols, g.illumination) for g in self._geometries]

    def contains(self, tile: TileCoord) -> bool:
        """Whether a tile lies inside the lattice."""
        if not (0 <= tile.slice < self.lattice.slices and 0 <= tile.mosaic < self.lattice.mosaics):
            return False
        g = self.geometry(tile.mosaic)
        return 0 <= tile.row < g.rows and 0 <= tile.col < g.cols

    def lattice_text(self) -> str:
        """The lattice in words: "2 slices x 2 mosaics (m0 20x20, m1 20x24 tiles)"."""
        n, m = self.lattice.slices, self.lattice.mosaics
        grids = ", ".join(f"m{g.index} {g.rows}x{g.cols}" for g in self._geometries)
        return f"{n} slice{'s' * (n > 1)} x {m} mosaic{'s' * (m > 1)} ({grids} tiles)"

    def outside(self, tile: TileCoord) -> str | None:
        """Why a tile lies outside the lattice (naming the tile and the lattice), or None."""
        if self.contains(tile):
            return None
        return (
            f"tile {tile.token()} of slice {tile.slice} is outside the lattice of {self.id}: "
            f"{self.lattice_text()}, slices and rows counted from 0"
        )

    # ---------------------------------------------------------------- file names <-> tiles
    @property
    def patterns(self) -> list[str]:
        """The pattern, then every alternative name pattern."""
        return [self.pattern, *self.alt_patterns]

    @cached_property
    def _fields(self) -> set[str]:
        return {f for _, f, _, _ in string.Formatter().parse(self.pattern) if f}

    def _ordinal(self, tile: TileCoord) -> int:
        """0-based position of a tile's file in acquisition order (for {counter})."""
        before = tile.slice * self.tiles_per_slice
        before += sum(self._geometries[m].tiles for m in range(tile.mosaic))
        return before + self.geometry(tile.mosaic).index_of(tile.row, tile.col)

    def name_fields(self, tile: TileCoord) -> dict[str, int]:
        """The numbers a tile's file name carries, counted as ``numbering`` says."""
        num, lat = self.numbering, self.lattice
        g = self.geometry(tile.mosaic)
        k = g.index_of(tile.row, tile.col)
        section = tile.slice + num.slice_offset
        mosaic = tile.mosaic + (lat.mosaics * section if num.mosaic == "global" else 0)
        file = lat.mosaics * k + tile.mosaic
        global_mosaic = "mosaic" in self._fields and num.mosaic == "global"
        if "slice" not in self._fields and not global_mosaic:  # the file number runs on
            file += section * self.tiles_per_slice
        return {
            "slice": section + num.base,
            "mosaic": mosaic + num.base,
            "index": k + num.base,
            "row": tile.row + num.base,
            "col": tile.col + num.base,
            "file": file + num.base,
            "counter": self._ordinal(tile) + num.base,
        }

    def longest_names(self) -> list[str]:
        """Per name pattern, a name at least as long as any tile's: every field at the
        largest number it can carry (the event rules bound the paths of tiles)."""
        num, lat, geoms = self.numbering, self.lattice, self._geometries
        sections = lat.slices + num.slice_offset
        mosaics = lat.mosaics * sections if num.mosaic == "global" else lat.mosaics
        largest = {
            "slice": sections - 1,
            "mosaic": mosaics - 1,
            "index": max(g.tiles for g in geoms) - 1,
            "row": max(g.rows for g in geoms) - 1,
            "col": max(g.cols for g in geoms) - 1,
            "file": sections * self.tiles_per_slice - 1,
            "counter": sections * self.tiles_per_slice - 1,
        }
        fields = {name: value + num.base for name, value in largest.items()}
        return [pattern.format(**fields) for pattern in self.patterns]

    def path_of(self, tile: TileCoord) -> str:
        """Raw-root-relative file name of a tile ({counter}: its position in acquisition
        order, as the microscope's running file counter would be in one session)."""
        return self.pattern.format(**self.name_fields(tile))

    def locate(self, acq_dir: Path, tile: TileCoord) -> Path | None:
        """The existing file of a tile under its acquisition directory, or None. With a
        {counter} in the pattern (a number tilepipe cannot predict) the candidates are globbed
        and parsed back."""
        fields = self.name_fields(tile)
        for pattern in self.patterns:
            if "counter" not in self._fields:
                path = Path(acq_dir) / pattern.format(**fields)
                if path.exists():
                    return path
                continue
            glob = "".join(
                glob_escape(literal)
                + (
                    ""
                    if name is None
                    else "[0-9]*"
                    if name == "counter"
                    else format(fields[name], spec or "")
                )
                for literal, name, spec, _ in string.Formatter().parse(pattern)
            )
            for path in sorted(Path(acq_dir).glob(glob)):
                try:
                    if self.parse(path.relative_to(acq_dir).as_posix()) == tile:
                        return path
                except ValueError:
                    continue
        return None

    @cached_property
    def _regexes(self) -> list[re.Pattern[str]]:
        regexes = []
        for pattern in self.patterns:
            out, seen = [], set()
            for literal, name, _spec, _ in string.Formatter().parse(pattern):
                out.append(re.escape(literal))
                if name is None:
                    continue
                out.append(f"(?P={name})" if name in seen else rf"(?P<{name}>[0-9]{{1,9}})")
                seen.add(name)
            regexes.append(re.compile("^" + "".join(out) + r"\Z"))
        return regexes

    def ignored(self, rel: str) -> bool:
        """Whether a file beside the tiles is a known sidecar (calibration, notes, truth)."""
        return any(fnmatch(rel, pattern) for pattern in self.ignore)

    def parse(self, rel: str) -> TileCoord | None:
        """The tile a raw-root-relative name belongs to, or None if it does not match.

        Raises ValueError for a name that matches the pattern but lies outside the lattice.
        """
        match = next((m for m in (r.match(rel) for r in self._regexes) if m), None)
        if match is None:
            return None
        fields = {k: int(v) - self.numbering.base for k, v in match.groupdict().items()}
        lat, num = self.lattice, self.numbering
        section = fields.get("slice")
        mosaic = fields.get("mosaic")
        index = fields.get("index")
        if mosaic is not None and num.mosaic == "global":
            mosaic_section, mosaic = divmod(mosaic, lat.mosaics)
            if section is not None and section != mosaic_section:
                raise ValueError(
                    f"{rel}: mosaic number {fields['mosaic'] + num.base} belongs to slice "
                    f"{mosaic_section + num.base}, not {section + num.base}"
                )
            section = mosaic_section
        if "file" in fields:
            per_slice = lat.mosaics * self.geometry(0).tiles
            rest = fields["file"]
            if section is None:
                section, rest = divmod(rest, per_slice)
            elif rest >= per_slice:
                raise ValueError(f"{rel}: file number beyond the {per_slice} files of a slice")
            index, m = divmod(rest, lat.mosaics)
            if mosaic is not None and mosaic != m:
                raise ValueError(f"{rel}: file number and mosaic number disagree")
            mosaic = m
        s = (section or 0) - num.slice_offset
        m = mosaic or 0
        if not (0 <= s < lat.slices and 0 <= m < lat.mosaics):
            first = num.slice_offset + num.base
            raise ValueError(
                f"{rel}: slice {s + first} / mosaic {m + num.base} (counted as in the names) "
                f"is outside the lattice: slices {first}..{first + lat.slices - 1}, "
                f"mosaics {num.base}..{num.base + lat.mosaics - 1}"
            )
        g = self.geometry(m)
        if index is not None:
            row, col = g.row_col(index)
            if "row" in fields and (fields["row"], fields["col"]) != (row, col):
                raise ValueError(f"{rel}: tile index and row/col disagree")
        else:
            row, col = fields["row"], fields["col"]
        tile = TileCoord(slice=s, mosaic=m, row=row, col=col, index=g.index_of(row, col))
        return tile

    # ---------------------------------------------------------------- calibration
    def _calibration_path(self, name: str) -> Path:
        base = self.source.parent if self.source is not None else Path.cwd()
        return (base / name).resolve()

    def conventions(self) -> dict[str, Any]:
        """Every processing convention after the preset and explicit fields (and
        ``calibration.channel2_reversed``)."""
        out = self.processing.resolved()
        out["channel2_reversed"] = (
            PRESETS[self.processing.preset]["channel2_reversed"]
            if self.calibration.channel2_reversed is None
            else self.calibration.channel2_reversed
        )
        return out

    def _wavelength_polys(self) -> tuple[tuple[float, ...], tuple[float, ...] | None]:
        cal, n = self.calibration, self.raw.samples
        reversed_ch2 = self.conventions()["channel2_reversed"]
        if cal.wave_pixel_mat:
            mu, wave = read_wave_pixel_mat(self._calibration_path(cal.wave_pixel_mat))
            return wave_pixel_polynomials(mu, wave, n, reversed_ch2)
        if cal.wavelength_file:
            ch1, ch2 = read_wavelength_table(self._calibration_path(cal.wavelength_file), n)
            if reversed_ch2:
                ch2 = ch2[::-1]
            pixels = np.arange(n, dtype=np.float64)
            fit = np.polynomial.polynomial.polyfit
            deg = cal.wavelength_fit_degree
            p1, p2 = tuple(fit(pixels, ch1, deg)), tuple(fit(pixels, ch2, deg))
            return p1, (None if p1 == p2 else p2)
        if cal.wavelength_poly_nm_ch2 is not None:
            return cal.wavelength_poly_nm, cal.wavelength_poly_nm_ch2
        if reversed_ch2:  # same mapping, channel 2 stored backwards: lambda2(p) = lambda1(n-1-p)
            poly = np.polynomial.Polynomial(cal.wavelength_poly_nm)
            flipped = poly(np.polynomial.Polynomial([n - 1.0, -1.0]))
            return cal.wavelength_poly_nm, tuple(float(c) for c in flipped.coef)
        return cal.wavelength_poly_nm, None

    def _dispersion_phase(self) -> tuple[float, ...] | None:
        cal = self.calibration
        name = cal.dispersion_file or cal.dispersion_phase_file
        if not name:
            return None
        if cal.dispersion_phase_file and not cal.dispersion_file:
            values = read_text_table(self._calibration_path(name), "dispersion table")
            if values.ndim != 1 or values.size != self.raw.samples:
                raise CalibrationFileError(
                    f"{name}: {values.size} dispersion phases for {self.raw.samples} samples"
                )
            return tuple(float(v) for v in values)
        return tuple(
            float(v) for v in read_dispersion(self._calibration_path(name), self.raw.samples)
        )

    def spectrometer(self):
        """The kernel calibration (`kernels.calibration.SpectrometerCalibration`)."""

        cal, conv = self.calibration, self.conventions()
        try:
            poly1, poly2 = self._wavelength_polys()
            phase = self._dispersion_phase()
            return SpectrometerCalibration(
                n_samples=self.raw.samples,
                wavelength_poly_nm=poly1,
                wavelength_poly_nm_ch2=poly2,
                dispersion_coeffs=cal.dispersion,
                dispersion_phase=phase,
                autocorr_bins=cal.autocorr_bins,
                depth_range=cal.depth_range,
                **{k: v for k, v in conv.items() if k in SPECTROMETER_CONVENTIONS},
            )
        except CalibrationFileError as exc:
            raise ManifestError(f"calibration: {exc}") from None
        except ValueError as exc:
            raise ManifestError(f"calibration: {exc}") from None

    def processing_params(self, **runtime: Any):
        """Kernel ``ProcessingParams``: this acquisition's conventions plus runtime knobs
        (batch_bscans, gpu_memory_budget_bytes, cpu_threads)."""

        conv = self.conventions()
        return ProcessingParams(
            enface_offset=conv["enface_offset"],
            enface_thickness=conv["enface_thickness"],
            enface_window=conv["enface_window"],
            surface_method=conv["surface_method"],
            wavelength_um=self.calibration.center_wavelength_um,
            axial_pixel_um=self.lattice.axial_pixel_um,
            **runtime,
        )


def load_manifest(path: Path) -> Manifest:
    """Read and validate a manifest; ManifestError lists every bad field (InvalidManifest for
    anything but a missing or unreadable file)."""
    path = Path(path)
    try:
        with toml_read_errors(path, "manifest", ManifestError, InvalidManifest):
            with open_regular(path) as fh:  # a FIFO or device in its place must not hang us
                size = os.fstat(fh.fileno()).st_size
                if size > MAX_MANIFEST_BYTES:
                    raise InvalidManifest(
                        f"{path}: {size} bytes; a manifest is at most {MAX_MANIFEST_BYTES}"
                    )
                text = fh.read(MAX_MANIFEST_BYTES + 1).decode()
            data: dict[str, Any] = tomllib.loads(text)
    except NotRegularFile as exc:
        raise InvalidManifest(str(exc)) from None
    try:
        return Manifest.model_validate({**data, "source": path.resolve()})
    except ValidationError as exc:
        raise InvalidManifest(
            format_validation_error(exc, str(path)).replace(
                "invalid configuration", "invalid manifest"
            )
        ) from None
    except RecursionError:
        raise InvalidManifest(f"{path}: invalid manifest: nested too deeply") from None


def dump_manifest(manifest: Manifest) -> str:
    """TOML text of a manifest (the simulator and import-opticstream write one)."""

    return to_toml(manifest.model_dump(mode="json", exclude_defaults=False))
