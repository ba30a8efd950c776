"""The operator commands of the CLI (thin wrappers around services/ops/control.py)."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime

from nats.js.errors import NotFoundError
from rich.console import Console
from rich.table import Table

from services.core.config import Config
from services.core.errors import ResetUnsupported
from services.ops import control as ops
from services.ops import repair
from services.runtime.bus import connect
from services.stages import stage_for
from services.state.status import failures


async def _run(config: Config, func, *args):
    nc = await connect(config.nats, name="tilepipe-ops", retry_for_s=10)
    try:
        return await func(nc.jetstream(), config.nats.stream, *args)
    finally:
        await nc.close()


def _tile_token(text: str) -> str:
    """`m0-r1-c2`, or `r1-c2` (mosaic 0)."""
    return text if text.startswith("m") else f"m0-{text}"


async def command(config: Config, args: argparse.Namespace) -> int:
    console = Console(width=None if sys.stdout.isatty() else 200)  # pipes get full rows
    try:
        if args.command == "pause" and args.acq:
            await _run(config, ops.hold, args.acq)
            console.print(f"acquisition {args.acq} held in every stage")
        elif args.command == "resume" and args.acq:
            count = await _run(config, ops.release, args.acq)
            console.print(f"acquisition {args.acq} released; {count} held inputs sent back")
        elif args.command == "pause":
            if not args.stage:
                raise ValueError("name a STAGE, or --acq ACQ")
            duration = ops.parse_duration(args.for_) if args.for_ else None
            until = await _run(config, ops.pause, args.stage, duration)
            console.print(f"{args.stage} paused until {until}")
        elif args.command == "resume":
            if not args.stage:
                raise ValueError("name a STAGE, or --acq ACQ")
            await _run(config, ops.resume, args.stage)
            console.print(f"{args.stage} resumed")
        elif args.command == "replay":
            since = datetime.fromisoformat(args.since) if args.since else None
            if since is not None and since.tzinfo is None:
                since = since.astimezone()
            if args.acq is None:
                if args.slice is not None:
                    raise ValueError("--slice selects within --acq ACQ (a targeted replay)")
                return await _rewind(config, console, args.stage, args.from_seq, since)
            if args.from_seq is not None:
                raise ValueError("--from-seq rewinds the whole stage: leave out --acq")
            kinds = [k.kind for k in stage_for(config, args.stage).consumes]
            sent = await _run(config, ops.replay, args.stage, kinds, args.acq, args.slice, since)
            console.print(f"replayed {len(sent)} events to {args.stage}")
        elif args.command in ("failed", "retry"):
            items = await _run(config, failures, args.acq)
            if args.command == "retry":
                if args.stage:
                    items = [i for i in items if i.event.stage == args.stage]
                count = await _run(config, ops.retry, items)
                console.print(f"re-queued {count} failed inputs")
                return 0
            table = Table("acq", "stage", "slice", "tile", "attempts", "when", "error")
            for item in items:
                e = item.event
                table.add_row(
                    e.acq,
                    e.stage,
                    e.slice_token(),
                    e.tile_token(),
                    str(e.attempts),
                    e.emitted_at.strftime("%Y-%m-%d %H:%M:%S"),
                    e.error[:100],
                )
            console.print(table if items else "no failed tiles")
        elif args.command == "repair":
            actions = await _run(config, lambda js, _s: repair.plan(js, config, args.acq))
            for action in actions:
                console.print(action.describe())
            if not actions:
                console.print("nothing to repair")
            elif args.apply:
                count = await _run(
                    config, lambda js, _s: repair.apply(js, config, args.acq, actions)
                )
                console.print(f"republished {count} inputs")
            else:
                console.print(f"{len(actions)} actions (dry run; --apply to republish)")
        elif args.command == "history":
            events = await _run(config, ops.history, args.acq, args.slice, _tile_token(args.tile))
            table = Table(
                "time",
                "stage",
                "what",
                "attempt",
                "host/worker",
                "outcome",
                "seconds",
                "error",
                title=f"{args.acq} slice {args.slice} {args.tile}",
            )
            for row in ops.history_rows(events):
                table.add_row(*row)
            console.print(table if events else "no events for this tile")
    except ResetUnsupported as exc:
        console.print(f"[red]{exc}[/red]")
        return 2
    except NotFoundError:
        console.print(f"[red]no such stage consumer: {getattr(args, 'stage', '?')}[/red]")
        return 2
    except ValueError as exc:
        console.print(f"[red]{exc}[/red]")
        return 2
    return 0


async def _rewind(
    config: Config, console: Console, stage: str, seq: int | None, since: datetime | None
) -> int:
    """`replay STAGE --from-seq N | --since T`: rewind the stage's consumer (consumer reset)."""
    if (seq is None) == (since is None):
        raise ValueError("replay needs --acq ACQ (targeted), or one of --from-seq N / --since T")
    if since is not None:
        seq = await _run(config, ops.first_seq_since, since)
        if seq is None:
            console.print(f"nothing logged since {since.isoformat()}: nothing to replay")
            return 0
    at, purged = await _run(config, ops.reset, stage, seq)
    if purged:
        console.print(f"removed {purged} targeted replays {stage} had handled")
    console.print(
        f"{stage} rewound: its inputs from stream sequence {at} are delivered again "
        "(outputs whose inputs and parameters are unchanged are not recomputed)"
    )
    return 0


def add_commands(add) -> None:
    """Register the operator subcommands with the CLI's `add` helper."""
    p = add("pause", "hold a stage (its consumer) until resumed or for a duration, or --acq")
    p.add_argument("stage", nargs="?", default=None)
    p.add_argument("--for", dest="for_", default=None, help="e.g. 30m, 1h30m, 2d")
    p.add_argument("--acq", default=None, help="hold one acquisition in every stage instead")
    p = add("resume", "release a paused stage, or a held acquisition (--acq)")
    p.add_argument("stage", nargs="?", default=None)
    p.add_argument("--acq", default=None)
    p = add(
        "replay",
        "reprocess one stage's inputs from the event log (only that stage): targeted (--acq, "
        "recomputes) or by rewinding its consumer (--from-seq / --since, recomputes what changed)",
    )
    p.add_argument("stage")
    p.add_argument("--acq", default=None, help="targeted: this acquisition's inputs")
    p.add_argument("--slice", type=int, default=None)
    p.add_argument("--since", default=None, help="ISO time: only inputs logged since then")
    p.add_argument(
        "--from-seq",
        type=int,
        default=None,
        help="rewind the stage's consumer to this stream sequence (nats consumer reset)",
    )
    p = add("failed", "list inputs a stage gave up on and that have not succeeded since")
    p.add_argument("acq", nargs="?", default=None)
    p = add("retry", "re-queue the failed inputs (optionally of one stage)")
    p.add_argument("acq", nargs="?", default=None)
    p.add_argument("--stage", default=None)
    p = add("repair", "republish exactly the missing work of each stage (dry run by default)")
    p.add_argument("acq")
    p.add_argument("--apply", action="store_true")
    p = add("history", "every event and attempt of one tile")
    p.add_argument("acq")
    p.add_argument("slice", type=int)
    p.add_argument("tile", help="m0-r1-c2 or r1-c2")
