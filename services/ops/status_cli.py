"""`tilepipe status [ACQ] [--watch] [--json]`."""

from __future__ import annotations

import asyncio
import contextlib
import json

from rich.console import Console
from rich.live import Live

from services.core.config import Config
from services.core.signals import stop_on_signals
from services.io.layout import index_path
from services.runtime.bus import connect
from services.runtime.transport import NatsTransport
from services.stages import configured_stages
from services.state.acquisitions import ACQ_BUCKET, lookup_acquisition, manifest_at
from services.state.status import snapshot
from services.state.status_view import render, status_json


async def latest_acquisition(js) -> str | None:
    """The acquisition whose KV record changed last."""
    kv = await js.key_value(ACQ_BUCKET)
    try:
        keys = await kv.keys()
    except Exception:  # nats-py raises NoKeysError on an empty bucket
        return None
    entries = [await kv.get(k) for k in keys]
    return max(entries, key=lambda e: e.revision).key if entries else None


async def status_command(config: Config, args) -> int:
    nc = await connect(config.nats, name="tilepipe-status", retry_for_s=10)
    try:
        js = nc.jetstream()
        acq = args.acq or await latest_acquisition(js)
        if acq is None:
            print("no acquisition known yet (the watcher records them)")
            return 1
        lattice = None
        record = await lookup_acquisition(NatsTransport(js, config.nats.stream), acq)
        if record is not None:
            try:
                lattice = manifest_at(config.roots.raw, record["manifest"]).grids()
            except (OSError, ValueError):
                lattice = None
        stages = configured_stages(config)

        async def current():
            return await snapshot(js, config.nats.stream, acq, stages)

        index = config.roots.output / index_path(acq)
        previews = f"previews: {index}" if index.is_file() else "previews: none yet"
        if args.json:
            doc = status_json(await current())
            doc["previews_index"] = str(index) if index.is_file() else None
            print(json.dumps(doc, indent=2))
            return 0
        console = Console()
        if not args.watch:
            console.print(render(await current(), lattice))
            console.print(previews, soft_wrap=True)
            return 0
        console.print(previews, soft_wrap=True)
        stop = stop_on_signals()
        with Live(console=console, refresh_per_second=2) as live:
            while not stop.is_set():
                live.update(render(await current(), lattice))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=1.0)
        return 0
    finally:
        await nc.close()
