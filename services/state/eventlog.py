"""Reading the event log (the stream) without consuming it."""

from __future__ import annotations

from nats.js import JetStreamContext


async def subjects_seen(js: JetStreamContext, stream: str, subject_filter: str) -> dict[str, int]:
    """Subjects in the stream matching `subject_filter`, with their message counts."""
    info = await js.stream_info(stream, subjects_filter=subject_filter)
    return dict(info.state.subjects or {})
