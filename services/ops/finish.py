"""`tilepipe finish ACQ`: declare an acquisition finished, possibly with tiles missing."""

from __future__ import annotations

from messages.events import AcquisitionFinished
from services.core.config import Config
from services.runtime.bus import connect, publish_event
from services.runtime.transport import NatsTransport
from services.state.acquisitions import (
    arrived_tiles,
    lookup_acquisition,
    manifest_at,
    missing_tiles,
)


async def finish(config: Config, acq: str) -> AcquisitionFinished:
    nc = await connect(config.nats, name="tilepipe-finish", retry_for_s=10)
    try:
        js = nc.jetstream()
        record = await lookup_acquisition(NatsTransport(js, config.nats.stream), acq)
        if record is None:
            raise SystemExit(f"unknown acquisition {acq!r} (the watcher has not seen it)")
        manifest = manifest_at(config.roots.raw, record["manifest"])
        arrived = await arrived_tiles(js, config.nats.stream, acq)
        missing = missing_tiles(manifest, arrived)
        event = AcquisitionFinished(
            acq=acq,
            complete=not missing,
            tiles_arrived=len(arrived),
            missing=missing,
            reason="declared by operator",
            producer="operator",
        )
        await publish_event(js, event, msg_id=f"{event.msg_id()}:operator")
        return event
    finally:
        await nc.close()
