"""`tilepipe up --demo`: a small simulated acquisition end to end, with live progress.

The demo writes 2 slices of small tiles into the raw root as the microscope writes them (a
normal-illumination mosaic of 3x3 tiles and a tilted one of 3x3 half-width tiles per slice,
instrument file names, the lab's calibration files), shows the status lattice while
every service works on them, and stops once every tile is processed and every slice stitched,
registered, its 3-D optic axis fitted from the two illuminations (the register stage's
thru-plane step) and (when the upload stage runs) uploaded. Its figures come from the event log
(`services.state.timeline`), the same computation as `bench/realtime.py`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.live import Live

from services.core.config import Config, StageSettings
from services.core.manifest import Manifest
from services.io.exports import AXIS_EXPORT_FILES, MOSAIC_EXPORT_FILES
from services.io.layout import axis_volume_path, index_path, volume_path
from services.local.simulate import (
    TILTED_VIEW,
    PhantomParams,
    simulate,
    small_manifest,
    write_manifest,
)
from services.local.supervisor import Supervisor
from services.runtime.bus import connect
from services.stages import stage_options
from services.state.status import Status, snapshot
from services.state.status_view import render
from services.state.timeline import BacklogSampler, Timeline, figures, read_timeline, tail_slack

DEMO_SETTLE_S = 0.3
OBJECT_STORE = "object-store"


def demo_acquisition(raw_root: Path) -> tuple[Path, Manifest]:
    """Write a fresh demo manifest (2 slices, normal and tilted illumination, 3x3 tiles of
    64x64 and 32x64 A-lines x 512 samples) with its calibration files."""
    acq = "demo-" + datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    manifest = small_manifest(acq, slices=2, rows=3, cols=3, settle_s=DEMO_SETTLE_S, mosaics=2)
    return write_manifest(manifest, raw_root / acq), manifest


def demo_config(config: Config, work: Path) -> Config:
    """`config` with the upload stage on, into a local object store under `work`, unless
    upload is already configured or explicitly off (the demo needs no external service)."""
    given = config.stages.get("upload")
    if given is not None and (
        given.options.get("url") or ("enabled" in given.model_fields_set and not given.enabled)
    ):
        return config
    store = (work / OBJECT_STORE).resolve()
    store.mkdir(parents=True, exist_ok=True)
    base = given.model_dump(exclude_unset=True) if given is not None else {}
    upload = StageSettings.model_validate(
        {**base, "enabled": True, "options": {"url": store.as_uri()}}
    )
    return config.model_copy(update={"stages": {**config.stages, "upload": upload}})


def has_axis(manifest: Manifest) -> bool:
    """Whether a slice holds a tilted mosaic besides mosaic 0 (register fits the 3-D axis)."""
    return any(manifest.geometry(m).tilt_deg != 0.0 for m in range(1, manifest.lattice.mosaics))


def expected_uploads(manifest: Manifest, stages: list[str], exports: bool = True) -> int:
    """artifact_uploaded events of a complete acquisition, at least: tiles, mosaics, volume
    planes, each slice's axis products (the stacked axis volume comes on top, once or twice
    per slice depending on which of its two events comes last), and with `exports` the
    mosaics' and axis products' NIfTI copies and previews."""
    if "upload" not in stages:
        return 0
    lat = manifest.lattice
    register = "register" in stages
    mosaic = 1 + MOSAIC_EXPORT_FILES * exports
    axis = (1 + AXIS_EXPORT_FILES * exports) * (register and has_axis(manifest))
    per_slice = lat.mosaics * ("stitch" in stages) * mosaic + register + axis
    return manifest.tiles * ("process" in stages) + lat.slices * per_slice


def finished(
    status: Status, manifest: Manifest, stages: list[str], uploaded: int, exports: bool = True
) -> bool:
    """Every tile through the tile stages, every slice through stitch, register and upload."""
    lat = manifest.lattice
    last = "tile_processed" if "process" in stages else "tile_converted"
    return (
        status.count(last) + len(status.failed_tiles) >= manifest.tiles
        and (
            "stitch" not in stages
            or len(status.mosaics.get("slice_stitched", ())) >= lat.slices * lat.mosaics
        )
        and (
            "register" not in stages
            or len(status.mosaics.get("slice_registered", ())) >= lat.slices
        )
        and (
            "register" not in stages
            or not has_axis(manifest)
            or len(status.mosaics.get("slice_axis", ())) >= lat.slices
        )
        and uploaded >= expected_uploads(manifest, stages, exports)
    )


async def run_demo(
    config: Config,
    supervisor: Supervisor,
    stages: list[str],
    rate: float,
    stop: asyncio.Event,
    console: Console | None = None,
) -> dict:
    """Simulate, show the live lattice until the acquisition is done; return the figures."""
    console = console or Console()
    path, manifest = demo_acquisition(Path(config.roots.raw))
    params = PhantomParams(scatterers=12, tilted_affine=TILTED_VIEW)
    sim = threading.Thread(
        target=simulate, args=(path, manifest, rate), daemon=True, kwargs={"params": params}
    )
    started = time.monotonic()
    sim.start()
    nc = await connect(config.nats, name="tilepipe-demo")
    js = nc.jetstream()
    services = list(stages)
    stages = [s for s in stages if s != "watcher"]
    backlog = BacklogSampler(stages)
    stream = config.nats.stream
    status: Status | None = None
    uploaded = 0
    upload = stage_options(config, "upload") if "upload" in stages else None
    exports = upload is None or upload.include_exports
    try:
        with Live(console=console, refresh_per_second=4) as live:
            while not stop.is_set():
                status = await snapshot(js, stream, manifest.id, stages)
                uploaded = status.stages["upload"].done if "upload" in status.stages else 0
                for name, counts in status.stages.items():
                    if counts.waiting is not None and name in backlog.samples:
                        backlog.record(name, counts.waiting + (counts.in_progress or 0))
                live.update(render(status, manifest.grids()))
                if finished(status, manifest, stages, uploaded, exports):
                    break
                supervisor.check(console.print)
                await asyncio.sleep(0.5)
        timeline = await read_timeline(js, stream, manifest.id)
    finally:
        await nc.close()
    output = Path(config.roots.output)
    volume = output / volume_path(manifest.id)
    axis_volume = output / axis_volume_path(manifest.id)
    index = output / index_path(manifest.id)
    return {
        "acq": manifest.id,
        "wall_s": time.monotonic() - started,
        "timeline": timeline,
        "complete": status is not None and finished(status, manifest, stages, uploaded, exports),
        "figures": figures(timeline, tail_slack(manifest.settle_s, services), backlog.max()),
        "mosaics": sorted(str(output / s.path) for s in timeline.slices.values() if s.path),
        "volume": str(volume) if volume.exists() else None,
        "axis": sorted(str(output / s.axis_path) for s in timeline.slices.values() if s.axis_path),
        "axis_volume": str(axis_volume) if axis_volume.exists() else None,
        "index": str(index) if index.exists() else None,
        "object_store": upload.url if upload is not None else None,
    }


def summary(figures: dict, config: Config, work: Path) -> list[str]:
    """The lines the demo prints at the end: where everything is, then the figures."""
    tl: Timeline = figures["timeline"]
    rows = figures["figures"]
    state = "done" if figures["complete"] else "stopped before the end"
    lines = [
        f"\ndemo {figures['acq']}: {len(tl.tiles)} tiles, {len({s for s, _ in tl.slices})} "
        f"slices ({len(tl.slices)} mosaics), "
        f"{state} in {figures['wall_s']:.1f} s",
        f"  raw tiles:      {config.roots.raw / figures['acq']}",
        f"  tile products:  {config.roots.work / figures['acq']}",
        *(f"  mosaic:         {m}" for m in figures["mosaics"]),
    ]
    if figures["volume"]:
        lines.append(f"  volume:         {figures['volume']}")
    lines += [f"  axis (3-D):     {a}" for a in figures.get("axis", [])]
    if figures.get("axis_volume"):
        lines.append(f"  axis volume:    {figures['axis_volume']}")
    if figures.get("index"):
        lines.append(f"  previews:       {figures['index']}")
    if figures["object_store"]:
        lines.append(f"  uploaded to:    {figures['object_store']}")
    else:
        lines.append("  uploaded to:    (upload stage not running: no upload figures)")
    lines += [
        f"  event log:      stream {config.nats.stream} (store {work / 'nats'})",
        f"  service logs:   {work / 'logs'}",
        "",
        "real time (seconds; 'complete' = the tile file's last write):",
    ]
    width = max(len(label) for label in rows)
    lines += [f"  {label:<{width}}  {value}" for label, value in rows.items()]
    return lines
