"""The subject scheme: `tp.<event>.<acq>.<slice>.<tile>`.

Operators filter with wildcards, e.g. `tp.*.ACQ.>` (one acquisition), `tp.*.ACQ.3.>` (its
slice 3), `tp.tile_processed.>` (one event kind). Tokens that do not apply are `_`.
"""

from __future__ import annotations

import re

PREFIX = "tp"
STREAM = "TILEPIPE"
ANY = "_"
TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")  # whole token (fullmatch: no trailing newline)
_TOKENS_RE = re.compile(r"[A-Za-z0-9_-]{1,64}(?:\.[A-Za-z0-9_-]{1,64}){3}")  # four, one match


def subject(event_type: str, acq: str, slice_token: str = ANY, tile_token: str = ANY) -> str:
    """Build the subject of one event; every token is checked so no wildcard can slip in."""
    tail = f"{event_type}.{acq}.{slice_token}.{tile_token}"
    if not _TOKENS_RE.fullmatch(tail):
        tokens = (event_type, acq, slice_token, tile_token)
        bad = next(t for t in tokens if not TOKEN_RE.fullmatch(t))
        raise ValueError(f"invalid subject token {bad!r}")
    return f"{PREFIX}.{tail}"


def event_filter(event_type: str, acq: str | None = None, slice_index: int | None = None) -> str:
    """A filter subject for one event kind, optionally narrowed to an acquisition and slice."""
    parts = [PREFIX, event_type, acq or "*"]
    parts.append("*" if slice_index is None else str(slice_index))
    parts.append("*")
    if acq is None and slice_index is None:
        return f"{PREFIX}.{event_type}.>"
    return ".".join(parts)


def stream_subjects() -> list[str]:
    """Subjects bound to the event stream."""
    return [f"{PREFIX}.>"]


def redo_subject(stage: str, acq: str, slice_token: str = ANY, tile_token: str = ANY) -> str:
    """Where `tilepipe replay` / `retry` send an input for one stage only (`tp.redo_<stage>...`).

    Each stage's consumer also listens on `tp.redo_<stage>.>`; other stages never see it.
    """
    return subject(f"redo_{stage}", acq, slice_token, tile_token)


def hold_subject(stage: str, acq: str, slice_token: str = ANY, tile_token: str = ANY) -> str:
    """Where a stage parks the inputs of a held acquisition (`tp.hold_<stage>...`)."""
    return subject(f"hold_{stage}", acq, slice_token, tile_token)
