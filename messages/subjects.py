"""The subject scheme: `tp.<event>.<acq>.<slice>.<tile>`, and `.<stage>` after the tile for
the records a stage makes about its own inputs (`stage_failed`, `attempt`).

Operators filter with wildcards, e.g. `tp.*.ACQ.>` (one acquisition), `tp.*.ACQ.3.>` (its
slice 3), `tp.tile_processed.>` (one event kind), `tp.stage_failed.>` (every failure),
`tp.stage_failed.*.*.*.convert` (convert's failures). Tokens that do not apply are `_`.

A subject says what its payload must be: `parse_subject` reads its tokens and
`check_subject` refuses an event that disagrees with the subject it arrived on (another
kind, acquisition, slice, tile or stage), so a user allowed to publish on a subject cannot
make it carry another stage's event. Because failure and attempt subjects name their stage,
each stage's NATS user may publish only its own (services/local/natsauth.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

PREFIX = "tp"
STREAM = "TILEPIPE"
ANY = "_"
TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")  # whole token (fullmatch: no trailing newline)
_TOKENS_RE = {  # the n tokens after the prefix in one match: 4, or 5 with a stage
    n: re.compile(rf"[A-Za-z0-9_-]{{1,64}}(?:\.[A-Za-z0-9_-]{{1,64}}){{{n - 1}}}") for n in (4, 5)
}
STAGE_NAMED = frozenset({"stage_failed", "attempt"})  # subjects ending with the stage's name
REDO, HOLD = "redo_", "hold_"  # `redo_<stage>`, `hold_<stage>`: an input of that stage
# The built-in services in pipeline order: the watcher, then each built-in stage. The one
# definition of the order (stage registry, metrics ports, timeline, stitch's upstream).
PIPELINE_ORDER = ("watcher", "convert", "process", "stitch", "register", "upload")


class SubjectMismatch(ValueError):
    """An event that is not what the subject it arrived on says it is."""


def subject(
    event_type: str,
    acq: str,
    slice_token: str = ANY,
    tile_token: str = ANY,
    stage: str | None = None,
) -> str:
    """Build the subject of one event; every token is checked so no wildcard can slip in.

    `stage` is required for, and only allowed on, the kinds in `STAGE_NAMED`."""
    if (stage is not None) != (event_type in STAGE_NAMED):
        raise ValueError(f"{event_type} subjects {'need' if stage is None else 'take no'} stage")
    tokens = (event_type, acq, slice_token, tile_token) + ((stage,) if stage else ())
    tail = ".".join(tokens)
    if not _TOKENS_RE[len(tokens)].fullmatch(tail):
        bad = next((t for t in tokens if not TOKEN_RE.fullmatch(t)), tail)
        raise ValueError(f"invalid subject token {bad!r}")
    return f"{PREFIX}.{tail}"


@dataclass(frozen=True)
class Subject:
    """The tokens of an event subject."""

    kind: str  # an event kind, or `redo_<stage>` / `hold_<stage>`
    acq: str
    slice: str
    tile: str
    stage: str | None = None  # named by a stage_failed / attempt subject

    @property
    def target(self) -> str | None:
        """The stage a `redo_`/`hold_` subject carries an input of (None otherwise)."""
        for prefix in (REDO, HOLD):
            if self.kind.startswith(prefix):
                return self.kind[len(prefix) :]
        return None

    def key(self) -> str:
        """`<slice>.<tile>`: where in the acquisition the subject points."""
        return f"{self.slice}.{self.tile}"

    def where(self) -> str:
        """`<acq>.<slice>.<tile>[.<stage>]`: the subject without its prefix and kind."""
        return ".".join(t for t in (self.acq, self.slice, self.tile, self.stage) if t is not None)


def parse_subject(text: str) -> Subject:
    """The tokens of an event subject; ValueError for anything that is not one."""
    tokens = text.split(".")
    tail = _TOKENS_RE.get(len(tokens) - 1)
    if tail is not None and tokens[0] == PREFIX and tail.fullmatch(text, len(PREFIX) + 1):
        kind = tokens[1]
        if len(tokens) == 6 and kind in STAGE_NAMED:
            return Subject(kind, tokens[2], tokens[3], tokens[4], tokens[5])
        if len(tokens) == 5 and kind not in STAGE_NAMED:
            return Subject(kind, tokens[2], tokens[3], tokens[4])
    raise ValueError(f"not an event subject: {text[:200]!r}")


def event_subjects(subjects: Iterable[str]) -> Iterator[tuple[str, Subject]]:
    """(subject, its tokens) of the event subjects among `subjects`; others (one published by
    hand, a failure record of the scheme before the stage was its last token) are skipped."""
    for text in subjects:
        try:
            yield text, parse_subject(text)
        except ValueError:
            continue


class _Event(Protocol):
    kind: str
    acq: str

    def slice_token(self) -> str: ...
    def tile_token(self) -> str: ...
    def stage_token(self) -> str | None: ...


def check_subject(event: _Event, text: str) -> Subject:
    """The parsed subject, if `event` is what it says (its kind, acquisition, slice, tile and,
    for a failure or attempt record, stage; a `redo_<stage>`/`hold_<stage>` subject carries
    an input of that stage: any kind, the same acquisition, slice and tile); otherwise
    SubjectMismatch naming the first token that disagrees."""
    try:
        parsed = parse_subject(text)
    except ValueError as exc:
        raise SubjectMismatch(str(exc)) from None
    expected = (
        ("type", None if parsed.target else parsed.kind, event.kind),
        ("acq", parsed.acq, event.acq),
        ("slice", parsed.slice, event.slice_token()),
        ("tile", parsed.tile, event.tile_token()),
        ("stage", parsed.stage, event.stage_token() if parsed.stage else None),
    )
    for name, said, carried in expected:
        if said != carried and said is not None:
            raise SubjectMismatch(f"{name} {carried!r} on a subject for {name} {said!r}")
    return parsed


def event_filter(
    event_type: str,
    acq: str | None = None,
    slice_index: int | None = None,
    stage: str | None = None,
) -> str:
    """A filter subject for one event kind, optionally narrowed to an acquisition and slice
    (and, for failures and attempts, a stage)."""
    if acq is None and slice_index is None and stage is None:
        return f"{PREFIX}.{event_type}.>"
    parts = [PREFIX, event_type, acq or "*", "*" if slice_index is None else str(slice_index), "*"]
    if event_type in STAGE_NAMED:
        parts.append(stage or "*")
    return ".".join(parts)


def acq_filter(
    acq: str = "*",
    kind: str = "*",
    slice_token: str | int | None = None,
    tile_token: str | None = None,
    stage: str | None = None,
) -> str:
    """A filter for the subjects of an acquisition (`*`: any): of one kind, slice, tile; a
    part left out takes every subject below it (`>`). With a tile, `stage` picks the
    stage-named subjects of that tile (`*`: those of any stage). Tokens are checked, so an
    operator's acquisition id cannot widen the filter."""
    if stage is not None and tile_token is None:
        raise ValueError("a stage narrows a tile's subjects; give the tile")
    tokens = [kind, acq] + [str(t) for t in (slice_token, tile_token, stage) if t is not None]
    for token in tokens:
        if token != "*" and not TOKEN_RE.fullmatch(token):
            raise ValueError(f"invalid subject token {token!r}")
    return ".".join([PREFIX, *tokens, *([">"] if tile_token is None else [])])


def filter_matches(subject_filter: str, text: str) -> bool:
    """Whether a subject is selected by a NATS filter (`*` one token, a final `>` the rest)."""
    want, have = subject_filter.split("."), text.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or token not in ("*", have[i]):
            return False
    return len(want) == len(have)


def stream_subjects() -> list[str]:
    """Subjects bound to the event stream."""
    return [f"{PREFIX}.>"]


def redo_subject(stage: str, acq: str, slice_token: str = ANY, tile_token: str = ANY) -> str:
    """Where `tilepipe replay` / `retry` send an input for one stage only (`tp.redo_<stage>...`).

    Each stage's consumer also listens on `tp.redo_<stage>.>`; other stages never see it.
    """
    return subject(f"{REDO}{stage}", acq, slice_token, tile_token)


def hold_subject(stage: str, acq: str, slice_token: str = ANY, tile_token: str = ANY) -> str:
    """Where a stage parks the inputs of a held acquisition (`tp.hold_<stage>...`)."""
    return subject(f"{HOLD}{stage}", acq, slice_token, tile_token)
