"""Event models: one pydantic model per event kind, versioned and validated on receipt."""

from __future__ import annotations

import hashlib
import json
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from messages.paths import RelPath
from messages.subjects import ANY, subject

SCHEMA_VERSION = 1
MAX_REPLAY_TAG = 64  # characters of a replay tag an event records (`origin`, attempts)
MAX_LIST = 100_000
MAX_INDEX = 1_000_000  # counts and lattice coordinates (an acquisition's tiles, too)

AcqId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
Name = Annotated[str, StringConstraints(min_length=1, max_length=200)]
Text = Annotated[str, StringConstraints(max_length=8000)]
Index = Annotated[int, Field(ge=0, le=MAX_INDEX)]
Digest = Annotated[str, StringConstraints(max_length=64)]  # what an output was computed from
VolumeProduct = Literal["dBI", "R3D", "O3D"]


def utcnow() -> datetime:
    """Timezone-aware now, the only clock events use."""
    return datetime.now(UTC)


class TileCoord(BaseModel):
    """Where a tile sits in the acquisition lattice."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    slice: Index
    mosaic: Index = 0
    row: Index
    col: Index
    index: Index | None = Field(default=None, description="scan order index within the mosaic")

    def token(self) -> str:
        """Subject token of the tile, e.g. `m0-r3-c4`."""
        return f"m{self.mosaic}-r{self.row}-c{self.col}"

    def log_context(self) -> dict[str, int]:
        return {"slice": self.slice, "mosaic": self.mosaic, "row": self.row, "col": self.col}


class Origin(BaseModel):
    """Which delivery of which input produced an event: the successful attempt's record."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stage: Annotated[str, StringConstraints(max_length=64)]
    input_type: Annotated[str, StringConstraints(max_length=64)]
    attempt: Annotated[int, Field(ge=0, le=1_000_000)]
    host: Annotated[str, StringConstraints(max_length=200)] = ""
    worker: Annotated[str, StringConstraints(max_length=200)] = ""
    started_at: datetime
    replay: Annotated[str, StringConstraints(max_length=MAX_REPLAY_TAG)] = ""
    arrived_at: datetime | None = Field(
        default=None, description="when the tile file this work derives from was complete"
    )


# The origin of the delivery being handled in this context (set by the stage runtime while
# a handler runs): an event built there carries it without a copy after the handler returns.
CURRENT_ORIGIN: ContextVar[Origin | None] = ContextVar("tilepipe_current_origin", default=None)


def current_origin() -> Origin | None:
    """The origin of the delivery being handled in this context, if any."""
    return CURRENT_ORIGIN.get()


class Event(BaseModel):
    """Common header of every event."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: ClassVar[str]
    v: Literal[1] = SCHEMA_VERSION
    acq: AcqId
    emitted_at: datetime = Field(default_factory=utcnow)
    producer: Annotated[str, StringConstraints(max_length=200)] = ""
    origin: Origin | None = Field(
        default_factory=current_origin,
        description="the delivery that produced this event (stamped by the runtime)",
    )

    @field_validator("v", mode="before")
    @classmethod
    def _exact_version(cls, value: object) -> object:
        """`1` only: lax mode would also read `true` or `1.0` as version 1."""
        if type(value) is not int:
            raise ValueError(f"v must be the integer {SCHEMA_VERSION}")
        return value

    def slice_token(self) -> str:
        return ANY

    def tile_token(self) -> str:
        return ANY

    def stage_token(self) -> str | None:
        """The stage a failure or attempt record names in its subject (None for others)."""
        return None

    def subject(self) -> str:
        """`tp.<event>.<acq>.<slice>.<tile>[.<stage>]`, computed once per event (fields are
        frozen)."""
        cache = self.__dict__
        try:
            return cache["_subject"]
        except KeyError:
            value = cache["_subject"] = subject(
                self.kind, self.acq, self.slice_token(), self.tile_token(), self.stage_token()
            )
            return value

    def msg_id(self) -> str:
        """Identity used for `Nats-Msg-Id` de-duplication: same work, same id."""
        return self.subject()

    def _id_with(self, basis: str) -> str:
        """`<subject>:<basis>` (the subject alone without a basis): the same output
        recomputed from other inputs or parameters is a new event; the same work again, a
        duplicate."""
        return f"{self.subject()}:{basis}" if basis else self.subject()

    def log_context(self) -> dict[str, object]:
        """Structured-log context: acquisition, event kind and lattice coordinates (`kind`,
        not `event`: structlog puts the log message's name there)."""
        return {"acq": self.acq, "kind": self.kind}

    def to_json(self) -> bytes:
        """The event's JSON, as bytes straight from pydantic's serializer."""
        return self.__pydantic_serializer__.to_json(self)


class TileEvent(Event):
    """An event about one tile."""

    tile: TileCoord

    def slice_token(self) -> str:
        return str(self.tile.slice)

    def tile_token(self) -> str:
        return self.tile.token()

    def log_context(self) -> dict[str, object]:
        return {**super().log_context(), **self.tile.log_context()}


class SliceEvent(Event):
    """An event about one mosaic of one slice."""

    slice: Index
    mosaic: Index = 0

    def slice_token(self) -> str:
        return str(self.slice)

    def tile_token(self) -> str:
        return f"m{self.mosaic}"

    def log_context(self) -> dict[str, object]:
        return {**super().log_context(), "slice": self.slice, "mosaic": self.mosaic}


class AcquisitionStarted(Event):
    """The watcher saw the first tile of an acquisition (or was told it started)."""

    kind: ClassVar[str] = "acq_started"
    type: Literal["acq_started"] = "acq_started"
    manifest: RelPath
    slices: Index
    mosaics: Index
    rows: Index
    cols: Index
    tiles_expected: Index


class AcquisitionFinished(Event):
    """The lattice is complete, or an operator declared the acquisition finished."""

    kind: ClassVar[str] = "acq_finished"
    type: Literal["acq_finished"] = "acq_finished"
    complete: bool
    tiles_arrived: Index
    missing: list[TileCoord] = Field(default_factory=list, max_length=MAX_LIST)
    reason: Text = ""


class TileArrived(TileEvent):
    """A raw tile is complete on disk (size reached and stable, or renamed into place)."""

    kind: ClassVar[str] = "tile_arrived"
    type: Literal["tile_arrived"] = "tile_arrived"
    path: RelPath
    manifest: RelPath
    size_bytes: Annotated[int, Field(ge=0)]
    completed_at: datetime
    raw_format: Name = "nifti-spectral"


class TileConverted(TileEvent):
    """A raw tile was validated and written as a chunked Zarr store under the work root."""

    kind: ClassVar[str] = "tile_converted"
    type: Literal["tile_converted"] = "tile_converted"
    path: RelPath
    raw_path: RelPath
    shape: list[Index] = Field(max_length=8)
    dtype: Name
    completed_at: datetime | None = None
    basis: Digest = Field(
        default="", description="digest of the raw tile's identity, calibration and conventions"
    )

    def msg_id(self) -> str:
        return self._id_with(self.basis)


class TileProcessed(TileEvent):
    """PS-OCT products of a tile were written under the work root."""

    kind: ClassVar[str] = "tile_processed"
    type: Literal["tile_processed"] = "tile_processed"
    products: dict[Name, RelPath] = Field(max_length=64)
    device: Name
    seconds: Annotated[float, Field(ge=0)]
    completed_at: datetime | None = None
    basis: Digest = Field(
        default="", description="digest of the recipe's basis and the kernels' version"
    )

    def msg_id(self) -> str:
        return self._id_with(self.basis)


class TilePairAligned(SliceEvent):
    """Two neighbouring tiles were aligned (or rejected in favour of the stage model)."""

    kind: ClassVar[str] = "pair_aligned"
    type: Literal["pair_aligned"] = "pair_aligned"
    a: TileCoord
    b: TileCoord
    shift_px: tuple[float, float]
    confidence: float
    accepted: bool
    reason: Text = ""
    basis: Digest = Field(default="", description="digest of the two tiles' bases")

    def tile_token(self) -> str:
        return f"{self.a.token()}-{self.b.token()}"

    def msg_id(self) -> str:
        return self._id_with(self.basis)


class TilePosition(BaseModel):
    """Solved global position of one tile in mosaic pixels."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    row: Index
    col: Index
    y: float
    x: float


class PairRejection(BaseModel):
    """A neighbour pair the mosaic solve did not use, and why."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    a: tuple[Index, Index] = Field(description="(row, col) of the upper / left tile")
    b: tuple[Index, Index]
    reason: Annotated[str, StringConstraints(max_length=200)]


class SliceStitched(SliceEvent):
    """A slice's mosaic was solved and fused into an OME-Zarr under the output root."""

    kind: ClassVar[str] = "slice_stitched"
    type: Literal["slice_stitched"] = "slice_stitched"
    path: RelPath
    positions: list[TilePosition] = Field(default_factory=list, max_length=MAX_LIST)
    residual_rms_px: float = 0.0
    missing: list[TileCoord] = Field(default_factory=list, max_length=MAX_LIST)
    inputs: Digest = Field(
        default="", description="digest of the tiles and pairs it was stitched from"
    )
    rejected: list[PairRejection] = Field(default_factory=list, max_length=MAX_LIST)
    stage_placed: list[tuple[Index, Index]] = Field(
        default_factory=list,
        max_length=MAX_LIST,
        description="(row, col) of tiles without an accepted pair, placed by the stage model",
    )
    volumes: dict[VolumeProduct, RelPath] = Field(
        default_factory=dict,
        description="3-D volume mosaics fused beside the en-face one (dBI, R3D, O3D -> path "
        "under the output root); empty when volumes are not fused",
    )
    exports: dict[Name, RelPath] = Field(
        default_factory=dict,
        max_length=64,
        description="NIfTI copies and previews of the mosaic (nifti.<key>, preview.<key>)",
    )

    def msg_id(self) -> str:
        """The same mosaic stitched again from other inputs (a late tile) is a new event."""
        return f"{self.subject()}:{self.inputs}"


class SliceRegistered(SliceEvent):
    """A slice was registered to the previous one and appended to the volume."""

    kind: ClassVar[str] = "slice_registered"
    type: Literal["slice_registered"] = "slice_registered"
    path: RelPath
    transform: list[list[float]] = Field(min_length=3, max_length=3)
    quality: float
    accepted: bool
    basis: Digest = Field(
        default="", description="digest of the inputs (own mosaic, predecessor, options)"
    )

    def msg_id(self) -> str:
        """Includes the inputs and the result: a slice redone with other inputs (a late tile
        restitched into it) is a new event even when the transform is the same; a
        redelivery of the same work is a duplicate."""
        body = json.dumps([self.path, self.transform, self.quality, self.accepted, self.basis])
        return f"{self.subject()}:{hashlib.sha256(body.encode()).hexdigest()[:16]}"


class SliceAxis(SliceEvent):
    """A slice's tilted-illumination mosaic was registered onto its normal one (`mosaic`) and
    the 3-D optic axis fitted per pixel; the products are an OME-Zarr under the output root."""

    kind: ClassVar[str] = "slice_axis"
    type: Literal["slice_axis"] = "slice_axis"
    path: RelPath
    tilted_mosaic: Index
    transform: list[list[float]] = Field(
        min_length=3,
        max_length=3,
        description="3x3 (y, x, 1): tilted mosaic pixel -> normal mosaic pixel (level 0)",
    )
    quality: float = Field(description="registration: weighted NCC of the band-passed maps")
    overlap: float = 0.0
    accepted: bool = Field(description="false: low quality, the stage geometry was used")
    reason: Text = ""
    gamma_deg: float
    fitted_px: Annotated[int, Field(ge=0, le=10**12)] = 0
    fitted_fraction: float = Field(default=0.0, description="of the normal mosaic's mask")
    residual_median: float | None = Field(
        default=None, description="fit residual, relative (sqrt(cost) / |(b_n, b_t)|)"
    )
    residual_p95: float | None = None
    delta_n_median: float | None = None
    basis: Digest = Field(default="", description="digest of the inputs (both mosaics, options)")
    exports: dict[Name, RelPath] = Field(
        default_factory=dict,
        max_length=64,
        description="NIfTI copies and previews of the axis products (nifti.<key>, preview.<key>)",
    )

    def msg_id(self) -> str:
        """Same slice redone from other inputs or with another result: a new event; a
        redelivery of the same work: a duplicate."""
        body = json.dumps([self.path, self.transform, self.quality, self.accepted, self.basis])
        return f"{self.subject()}:{hashlib.sha256(body.encode()).hexdigest()[:16]}"


class TileOrSliceEvent(Event):
    """An event about one tile, or about a whole slice when `tile` is None."""

    tile: TileCoord | None = None
    slice: Index | None = None

    def slice_token(self) -> str:
        if self.tile is not None:
            return str(self.tile.slice)
        return ANY if self.slice is None else str(self.slice)

    def tile_token(self) -> str:
        return self.tile.token() if self.tile is not None else ANY


class RawArchival(BaseModel):
    """The raw tile behind an archival copy (`artifact_uploaded` of product `rawarchive`,
    whose `bytes` and `checksum` are the archive's)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: RelPath = Field(description="the raw tile, relative to the raw root")
    bytes: Annotated[int, Field(ge=0)]
    sha256: Annotated[str, StringConstraints(pattern=r"^sha256:[0-9a-f]{64}$")]
    shape: Annotated[list[Index], Field(max_length=8)]
    dtype: Annotated[str, StringConstraints(max_length=32)]
    verified: Literal["read-back", "etag", "read"] = Field(
        description="how the stored archive was checked: read back and hashed, or the "
        "storage's check after the PUT (ETag, or read back by the storage layer)"
    )
    raw_deleted: bool = Field(
        default=False, description="the local raw file was deleted after the read-back check"
    )


class ArtifactUploaded(TileOrSliceEvent):
    """One artifact reached object storage and was verified."""

    kind: ClassVar[str] = "artifact_uploaded"
    type: Literal["artifact_uploaded"] = "artifact_uploaded"
    product: Name
    source: RelPath
    key: Annotated[str, StringConstraints(min_length=1, max_length=1024)]
    bytes: Annotated[int, Field(ge=0)]
    checksum: Name
    seconds: Annotated[float, Field(ge=0)]
    raw: RawArchival | None = Field(
        default=None, description="for a raw tile's archival copy: the raw file it holds"
    )

    def msg_id(self) -> str:
        """Another object (a slice's second mosaic) or other content (a re-upload after a
        re-stitch) is a new event; the same object with the same content is a duplicate (a
        raw archive's later deletion of its raw file is a new event too)."""
        deleted = "\nraw-deleted" if self.raw is not None and self.raw.raw_deleted else ""
        body = f"{self.key}\n{self.checksum}{deleted}".encode()
        return f"{self.subject()}:{self.product}:{hashlib.sha256(body).hexdigest()[:16]}"


class StageFailed(TileOrSliceEvent):
    """A stage gave up on an input after its retries, or refused it."""

    kind: ClassVar[str] = "stage_failed"
    type: Literal["stage_failed"] = "stage_failed"
    stage: Annotated[str, StringConstraints(pattern=r"^[a-z0-9_-]{1,64}$")]
    input_type: Name
    input_subject: Annotated[str, StringConstraints(max_length=512)]
    error: Text
    attempts: Index

    def stage_token(self) -> str:
        return self.stage

    def msg_id(self) -> str:
        return f"{self.subject()}:{self.stage}:{self.input_type}"


class Attempt(TileOrSliceEvent):
    """One delivery of an input to a stage and how it ended (the per-tile attempt history)."""

    kind: ClassVar[str] = "attempt"
    type: Literal["attempt"] = "attempt"
    stage: Annotated[str, StringConstraints(pattern=r"^[a-z0-9_-]{1,64}$")]
    input_type: Name
    input_subject: Annotated[str, StringConstraints(max_length=512)]
    attempt: Index
    outcome: Literal["ok", "retry", "failed", "held"]
    host: Annotated[str, StringConstraints(max_length=200)] = ""
    worker: Annotated[str, StringConstraints(max_length=200)] = ""
    started_at: datetime
    ended_at: datetime
    error: Text = ""
    detail: Text = ""
    replay: Annotated[str, StringConstraints(max_length=MAX_REPLAY_TAG)] = ""

    def stage_token(self) -> str:
        return self.stage

    def msg_id(self) -> str:
        return f"{self.subject()}:{self.stage}:{self.started_at.timestamp()}:{self.attempt}"


EVENT_TYPES: dict[str, type[Event]] = {
    cls.kind: cls
    for cls in (
        AcquisitionStarted,
        AcquisitionFinished,
        TileArrived,
        TileConverted,
        TileProcessed,
        TilePairAligned,
        SliceStitched,
        SliceRegistered,
        SliceAxis,
        ArtifactUploaded,
        StageFailed,
        Attempt,
    )
}
