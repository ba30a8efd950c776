"""tilepipe events: versioned pydantic models, the subject scheme and safe paths."""

from messages.codec import InvalidEvent, decode_event, json_schemas
from messages.events import (
    EVENT_TYPES,
    SCHEMA_VERSION,
    AcquisitionFinished,
    AcquisitionStarted,
    ArtifactUploaded,
    Attempt,
    Event,
    SliceRegistered,
    SliceStitched,
    StageFailed,
    TileArrived,
    TileConverted,
    TileCoord,
    TilePairAligned,
    TilePosition,
    TileProcessed,
    utcnow,
)
from messages.paths import PathEscapeError, RelPath, relative_to_root, resolve_in_root
from messages.subjects import STREAM, event_filter, subject

__all__ = [
    "EVENT_TYPES",
    "SCHEMA_VERSION",
    "STREAM",
    "AcquisitionFinished",
    "AcquisitionStarted",
    "ArtifactUploaded",
    "Attempt",
    "Event",
    "InvalidEvent",
    "PathEscapeError",
    "RelPath",
    "SliceRegistered",
    "SliceStitched",
    "StageFailed",
    "TileArrived",
    "TileConverted",
    "TileCoord",
    "TilePairAligned",
    "TilePosition",
    "TileProcessed",
    "decode_event",
    "event_filter",
    "json_schemas",
    "relative_to_root",
    "resolve_in_root",
    "subject",
    "utcnow",
]
