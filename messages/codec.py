"""Decoding events on receipt: every rejection carries a short, countable reason."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Annotated, Union

from pydantic import Field, TypeAdapter, ValidationError

from messages.events import EVENT_TYPES, SCHEMA_VERSION, Event
from messages.subjects import SubjectMismatch, check_subject

MAX_PAYLOAD_BYTES = 256 * 1024


class InvalidEvent(ValueError):
    """A payload that is not a valid event; `reason` is a low-cardinality label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


_ANY_EVENT: TypeAdapter = TypeAdapter(
    Annotated[Union[tuple(EVENT_TYPES.values())], Field(discriminator="type")]  # noqa: UP007
)


def decode_event(
    data: bytes, accept: Iterable[str] | None = None, subject: str | None = None
) -> Event:
    """Parse and validate one event; raise InvalidEvent with a reason otherwise.

    With `subject` (the one the payload arrived on), an event that disagrees with it (another
    kind, acquisition, slice, tile or stage: `messages.subjects.check_subject`) is refused
    as `subject_mismatch`. The common case is one pass of pydantic's JSON parser over a
    discriminated union; only a payload that fails it is examined step by step to name the
    reason.
    """
    if len(data) <= MAX_PAYLOAD_BYTES:
        try:
            event = _ANY_EVENT.validate_json(data)
        except ValidationError:
            pass
        else:
            if accept is not None and event.kind not in accept:
                raise InvalidEvent("unexpected_type", f"{event.kind} is not consumed here")
            return event if subject is None else _on_its_subject(event, subject)
    event = _diagnose(data, accept)
    return event if subject is None else _on_its_subject(event, subject)


def _on_its_subject(event: Event, subject: str) -> Event:
    try:
        check_subject(event, subject)
    except SubjectMismatch as exc:
        raise InvalidEvent("subject_mismatch", str(exc)) from None
    return event


def _diagnose(data: bytes, accept: Iterable[str] | None) -> Event:
    """The slow path: why a payload is not a valid event."""
    if len(data) > MAX_PAYLOAD_BYTES:
        raise InvalidEvent("too_large", f"{len(data)} bytes > {MAX_PAYLOAD_BYTES}")
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, a 5000-digit number
        raise InvalidEvent("not_json", str(exc)[:200]) from None
    if not isinstance(raw, dict):
        raise InvalidEvent("not_object", f"top level is {type(raw).__name__}")
    kind = raw.get("type")
    if not isinstance(kind, str) or kind not in EVENT_TYPES:
        raise InvalidEvent("unknown_type", f"type={str(kind)[:64]!r}")
    accepted = set(accept) if accept is not None else None
    if accepted is not None and kind not in accepted:
        raise InvalidEvent("unexpected_type", f"{kind} is not consumed here")
    version = raw.get("v")
    if type(version) is not int or version != SCHEMA_VERSION:
        raise InvalidEvent("unsupported_version", f"v={str(version)[:16]!r}, want {SCHEMA_VERSION}")
    try:
        return EVENT_TYPES[kind].model_validate(raw)
    except ValidationError as exc:
        fields = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()[:5]
        )
        raise InvalidEvent("invalid_fields", fields[:1000]) from None


def json_schemas() -> dict[str, dict]:
    """JSON Schema of every event kind, keyed by kind."""
    return {kind: cls.model_json_schema() for kind, cls in EVENT_TYPES.items()}
