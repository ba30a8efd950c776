"""`tilepipe repair ACQ`: compare the manifest's lattice with the event log and the outputs on
disk, and republish exactly the missing work of each stage (dry run unless `--apply`).

Per tile, in pipeline order:
- raw file complete on disk, no `tile_arrived` in the log -> publish `tile_arrived`;
- `tile_arrived` logged, but no `tile_converted` or the converted store is missing -> convert;
- `tile_converted` logged, but no `tile_processed` or the products are missing -> process;
- `tile_processed` logged, but the slice's mosaic is not stitched or its store is missing
  -> stitch (one tile of the mosaic).
An input a stage gave up on (an unresolved `stage_failed`, as `tilepipe failed` lists them) is
left to `tilepipe retry`, except that a missing intermediate it depends on is rebuilt first:
a tile `process` failed on whose converted store is gone goes back to convert, and the rebuilt
store's `tile_converted` brings it to process again. Repaired deliveries carry a
`repair-` tag: stages only fill in what is missing (complete outputs are not recomputed), and
their outputs are published as new events, so deleted events come back too.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from nats.js import JetStreamContext

from messages.codec import decode_event
from messages.events import TileArrived, TileCoord
from messages.subjects import acq_filter, event_subjects, subject
from services.core.config import Config
from services.io.atomic import is_complete
from services.io.layout import converted_path, mosaic_path, products_path
from services.ops.control import republish
from services.runtime.bus import publish_event
from services.runtime.stage import REPAIR_PREFIX
from services.runtime.transport import NatsTransport
from services.state.acquisitions import acquisition_dir, lookup_acquisition, manifest_at, tile_key
from services.state.eventlog import subjects_seen
from services.state.status import failures


@dataclass
class Action:
    stage: str  # "watcher", "convert", "process", "stitch"
    tile: TileCoord
    reason: str
    input_subject: str = ""

    def describe(self) -> str:
        return f"{self.stage:<8} slice {self.tile.slice} {self.tile.token():<12} {self.reason}"


async def plan(js: JetStreamContext, config: Config, acq: str) -> list[Action]:
    """What is missing, stage by stage."""
    record = await lookup_acquisition(NatsTransport(js, config.nats.stream), acq)
    if record is None:
        raise ValueError(f"unknown acquisition {acq!r} (the watcher has not seen it)")
    manifest = manifest_at(config.roots.raw, record["manifest"])
    acq_dir = config.roots.resolve("raw", record["manifest"]).parent
    stream = config.nats.stream
    seen = await subjects_seen(js, stream, acq_filter(acq))
    by_kind: dict[str, set[str]] = {}
    for _subject, parsed in event_subjects(seen):
        by_kind.setdefault(parsed.kind, set()).add(parsed.key())
    failed = {}  # key -> stages with an unresolved failure on it
    if by_kind.get("stage_failed"):
        for failure in await failures(js, stream, acq):
            failed.setdefault(failure.where, set()).add(failure.event.stage)
    roots = config.roots
    actions: list[Action] = []
    stitched_needed: set[tuple[int, int]] = set()
    for tile in manifest.coords():
        key = tile_key(tile)

        def logged(kind: str, key: str = key) -> bool:
            return key in by_kind.get(kind, set())

        def subj(kind: str, tile: TileCoord = tile) -> str:
            return subject(kind, acq, str(tile.slice), tile.token())

        if not logged("tile_arrived"):
            raw = manifest.locate(acq_dir, tile)
            layout = manifest.geometry(tile.mosaic).raw
            if raw is not None and raw.stat().st_size >= layout.expected_bytes:
                actions.append(Action("watcher", tile, "raw file complete, no tile_arrived"))
            continue
        converted = roots.resolve("work", converted_path(acq, tile))
        if key in failed:  # a stage gave up: `tilepipe retry`, unless an intermediate is gone
            rebuild = "convert" not in failed[key] and logged("tile_converted")
            if rebuild and not is_complete(converted):
                why = f"store missing ({', '.join(sorted(failed[key]))} failed on it)"
                actions.append(Action("convert", tile, why, subj("tile_arrived")))
            continue
        if not logged("tile_converted") or not is_complete(converted):
            why = "no tile_converted" if not logged("tile_converted") else "store missing"
            actions.append(Action("convert", tile, why, subj("tile_arrived")))
            continue
        products = roots.resolve("work", products_path(acq, tile))
        if not logged("tile_processed") or not is_complete(products):
            why = "no tile_processed" if not logged("tile_processed") else "products missing"
            actions.append(Action("process", tile, why, subj("tile_converted")))
            continue
        mosaic_key = (tile.slice, tile.mosaic)
        mosaic_store = roots.resolve("output", mosaic_path(acq, tile.slice, tile.mosaic))
        mosaic_logged = f"{tile.slice}.m{tile.mosaic}" in by_kind.get("slice_stitched", set())
        if mosaic_key not in stitched_needed and (not mosaic_logged or not mosaic_store.exists()):
            stitched_needed.add(mosaic_key)
            why = "slice not stitched" if not mosaic_logged else "mosaic store missing"
            actions.append(Action("stitch", tile, why, subj("tile_processed")))
    return actions


async def apply(js: JetStreamContext, config: Config, acq: str, actions: list[Action]) -> int:
    """Republish the inputs of the planned actions."""
    tag = f"{REPAIR_PREFIX}{uuid.uuid4().hex[:8]}"
    record = await lookup_acquisition(NatsTransport(js, config.nats.stream), acq)
    manifest = manifest_at(config.roots.raw, record["manifest"]) if record else None
    for n, action in enumerate(actions):
        if action.stage == "watcher":
            base = acquisition_dir(record["manifest"])
            acq_dir = config.roots.resolve("raw", record["manifest"]).parent
            found = manifest.locate(acq_dir, action.tile)
            if found is None:
                continue  # gone since the plan was made
            raw_rel = "/".join(p for p in (base, found.relative_to(acq_dir).as_posix()) if p)
            stat = config.roots.resolve("raw", raw_rel).stat()
            event = TileArrived(
                acq=acq,
                tile=action.tile,
                path=raw_rel,
                manifest=record["manifest"],
                size_bytes=stat.st_size,
                raw_format=manifest.raw.format,
                producer="repair",
                completed_at=datetime.fromtimestamp(stat.st_mtime, UTC),
            )
            await publish_event(js, event, msg_id=f"{event.msg_id()}:{tag}")
            continue
        original = await js.get_last_msg(config.nats.stream, action.input_subject)
        await republish(js, action.stage, decode_event(original.data), tag, n)
    return len(actions)
