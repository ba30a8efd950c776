"""Rendering a Status for people (rich) and for scripts (JSON)."""

from __future__ import annotations

from dataclasses import asdict

from rich.console import Group
from rich.table import Table
from rich.text import Text

from services.state.status import GLYPH, STYLE, TILE_PROGRESS, Status


def status_json(status: Status) -> dict:
    counts = {kind: status.count(kind) for kind in TILE_PROGRESS}
    return {
        "acq": status.acq,
        "expected": status.expected,
        "started_at": status.started_at.isoformat() if status.started_at else None,
        "eta_s": status.eta_s(),
        "finished": status.finished,
        "missing_tiles": sorted(status.missing),
        "tiles": counts,
        "failed_tiles": sorted(status.failed_tiles),
        "mosaics": {kind: sorted(keys) for kind, keys in status.mosaics.items()},
        "stages": {name: asdict(c) for name, c in status.stages.items()},
    }


Grid = tuple[int, int, str]  # rows, cols, illumination of one mosaic


def lattice_text(status: Status, slices: int, grids: list[Grid]) -> Text:
    """One grid per slice and mosaic, each tile coloured by the furthest stage it reached."""
    text = Text()
    for s in range(slices):
        for m, (rows, cols, illumination) in enumerate(grids):
            text.append(f"slice {s} mosaic {m} ({illumination})\n", style="bold")
            for r in range(rows):
                for c in range(cols):
                    kind = status.tile_kind(s, m, r, c)
                    text.append(f"{GLYPH[kind]} ", style=STYLE[kind])
                text.append("\n")
        steps = [
            (name, f"{s}.m0" in status.mosaics.get(kind, set()))
            for name, kind in (("registered", "slice_registered"), ("axis", "slice_axis"))
            if status.mosaics.get(kind)
        ]
        if steps:  # the slice-level steps, once any slice has reached them
            text.append(f"slice {s}:", style="bold")
            for name, done in steps:
                text.append(f" {name} {'done' if done else '-'}", style="green" if done else "dim")
            text.append("\n")
    legend = "  ".join(
        f"{GLYPH[k]}={n}"
        for k, n in (
            (None, "missing"),
            ("tile_arrived", "arrived"),
            ("tile_converted", "converted"),
            ("tile_processed", "processed"),
            ("slice_stitched", "stitched"),
            ("failed", "failed"),
        )
    )
    text.append(legend + "\n", style="dim")
    return text


def _rate(status: Status, done: int) -> str:
    rate = status.rate_per_min(done)
    return "" if rate is None else f"{rate:.1f}"


def stage_table(status: Status) -> Table:
    eta = status.eta_s()
    caption = (
        None
        if eta is None
        else ("done" if eta == 0 else f"ETA {eta / 60:.1f} min at the average rate")
    )
    table = Table(
        title=f"acquisition {status.acq}",
        title_justify="left",
        caption=caption,
        caption_justify="left",
    )
    for column in ("stage", "done", "failed", "waiting", "in progress", "per min", "paused"):
        table.add_column(column, justify="right" if column != "stage" else "left")
    expected = status.expected
    arrived = status.count("tile_arrived")
    table.add_row(
        "arrived",
        f"{arrived}" + (f"/{expected}" if expected else ""),
        "",
        "",
        "",
        _rate(status, arrived),
        "",
    )
    for name, c in status.stages.items():
        table.add_row(
            name,
            str(c.done),
            str(c.failed) if c.failed else "",
            "" if c.waiting is None else str(c.waiting),
            "" if c.in_progress is None else str(c.in_progress),
            _rate(status, c.done),
            "yes" if c.paused else "",
        )
    return table


def render(status: Status, lattice: tuple[int, list[Grid]] | None = None):
    """The stage table, and the lattice (slices, one grid per mosaic) when known."""
    parts = [stage_table(status)]
    if lattice is not None:
        parts.append(lattice_text(status, *lattice))
    return Group(*parts)
