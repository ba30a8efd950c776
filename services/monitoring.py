"""Monitoring helpers: the stage hook for latency and progress, resource collectors, Prometheus
scrape configs for the services `tilepipe up` (or systemd) runs, and dashboard checks.

Metric reference (all exported on every service's /metrics):

- per stage (runtime): `tilepipe_events_handled_total{stage,outcome}`,
  `tilepipe_handle_duration_seconds`, `tilepipe_in_flight`, `tilepipe_read_bytes_total`,
  `tilepipe_written_bytes_total`, `tilepipe_consumer_{pending,ack_pending,redelivered}_messages`,
  `tilepipe_consumer_paused`, `tilepipe_stream_{used,max}_bytes{stream}` (the event stream,
  `KV_tp-holds`, and the KV buckets a stage keeps bookkeeping in);
- `tilepipe_end_to_end_latency_seconds{stage,event}` and
  `tilepipe_acquisition_tiles_done{acq,stage}`: `StageMonitor` below;
- watcher: `tilepipe_watcher_latency_seconds`, `tilepipe_acquisition_tiles_{expected,arrived}`;
- resources: `process_*` (prometheus_client's process collector, on by default),
  `tilepipe_data_root_{free,size}_bytes{root,path}`, and `tilepipe_gpu_devices` plus, where a
  GPU is visible (NVML through `pynvml`, else an already imported CuPy),
  `tilepipe_gpu_info{gpu,name}`, `tilepipe_gpu_memory_{used,total}_bytes{gpu}`,
  `tilepipe_gpu_utilization_ratio{gpu}` (NVML only), `tilepipe_gpu_process_memory_bytes{gpu}`.

Prometheus scrapes each service as job `tilepipe-<service>` with a `host` target label;
dashboards (`grafana/dashboards/`) and alert rules (`grafana/alerts/`) rely on that.

    python -m services.monitoring prometheus-config --up-output up.log -o prometheus.yml
    python -m services.monitoring prometheus-config --config tp.toml --rules 'grafana/alerts/*.yml'
    python -m services.monitoring lint-dashboards grafana/dashboards/*.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import json
import math
import os
import re
import shutil
import socket
import sys
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from prometheus_client.core import REGISTRY, GaugeMetricFamily
from prometheus_client.registry import Collector

from messages.events import (
    ArtifactUploaded,
    Event,
    SliceRegistered,
    SliceStitched,
    TileArrived,
    TileCoord,
    TileEvent,
)
from messages.subjects import ANY, PREFIX, parse_subject, subject
from services.metrics import (
    ACQ_TILES_DONE,
    DATA_ROOT_FREE,
    DATA_ROOT_SIZE,
    END_TO_END_SECONDS,
)

JOB_PREFIX = "tilepipe-"
_TILE_OUTPUTS = (TileEvent, ArtifactUploaded)
_SLICE_OUTPUTS = (SliceStitched, SliceRegistered)
_ROLE: dict[type, str] = {}  # event class -> "tile", "slice" or "none" (what an output stands for)


def _role(cls: type) -> str:
    """What an output of class `cls` stands for, looked up once per class."""
    if issubclass(cls, _TILE_OUTPUTS):
        role = "tile"
    elif issubclass(cls, _SLICE_OUTPUTS):
        role = "slice"
    else:
        role = "none"
    _ROLE[cls] = role
    return role


# ---------------------------------------------------------------------------- stage hook
class StageMonitor:
    """End-to-end latency and acquisition progress of one stage, from the events it publishes.

    The runtime creates one per stage (`StageMonitor(name, stream, stage.produces)`: the
    histograms of the kinds it produces start at zero, so a first observation is an increase)
    and calls `handled(js, event, outputs, replay)` once the outputs of an input are published.
    For every output that stands for tiles — a tile event, an `artifact_uploaded` of a tile,
    a `slice_stitched` (its solved tiles) or a `slice_registered` (the tiles of its stitched
    mosaic) — it

    - observes `tilepipe_end_to_end_latency_seconds{stage,event}`: the output's `emitted_at`
      minus the latest `completed_at` of the `tile_arrived` events of those tiles (taken from
      the input when it is the `tile_arrived`, else read back from the stream by subject and
      cached). Replays (`Tp-Replay` header) are not observed: their age is not a latency.
    - sets `tilepipe_acquisition_tiles_done{acq,stage}` to the distinct tiles this stage has
      published for, seeded from the stream on first sight of an acquisition and re-read every
      `resync_s` (so several workers of one stage agree; dashboards take the max).

    It never raises and gives up after `timeout` seconds: monitoring must not slow the stage.
    """

    def __init__(
        self,
        stage: str,
        stream: str,
        produces: Iterable[type[Event]] = (),
        resync_s: float = 60.0,
        cache_size: int = 50_000,
        timeout: float = 10.0,
        max_acqs: int = 16,
    ) -> None:
        self.stage = stage
        self.stream = stream
        self.resync_s = resync_s
        self.cache_size = cache_size
        self.timeout = timeout
        self.max_acqs = max_acqs
        self._arrivals: OrderedDict[str, float] = OrderedDict()  # "<acq>.<slice>.<tile>" -> s
        self._done: OrderedDict[str, set[str]] = OrderedDict()  # acq -> {"<slice>.<tile>"}
        self._synced: dict[tuple[str, str], float] = {}  # (acq, kind) -> monotonic time
        self._latency: dict[str, Any] = {}
        self._gauges: dict[str, Any] = {}  # acq -> its tiles-done gauge child
        for kind in produces:  # children at 0, so the first observation is a visible increase
            if issubclass(kind, (TileEvent, ArtifactUploaded, SliceStitched, SliceRegistered)):
                self._histogram(kind.kind)

    def observed(self, outputs: Sequence[Event], replay: str | None = None) -> list[Event]:
        """Record the outputs that need no I/O (the common case); return the others, for
        `handled_slow`."""
        return [out for out in outputs if not self._observed_in_memory(out, replay)]

    async def handled(
        self, js, event: Event, outputs: Sequence[Event], replay: str | None = None
    ) -> None:
        """Record what publishing `outputs` for `event` means; never raises."""
        slow = self.observed(outputs, replay)
        if slow:
            await self.handled_slow(js, event, slow, replay)

    async def handled_slow(
        self, js, event: Event, outputs: Sequence[Event], replay: str | None = None
    ) -> None:
        """Record `outputs` that `observed` left, looking at the stream; never raises."""
        if isinstance(event, TileArrived):
            self._remember(_tile_key(event.acq, event.tile), event.completed_at.timestamp())
        try:
            # no task per call on the hot path: only the stream look-ups below are bounded
            await self._handled(js, event, outputs, replay)
        except Exception as exc:  # monitoring is best effort
            from services.logs import get_logger

            get_logger(stage=self.stage).debug(
                "monitor_failed", error=str(exc) or type(exc).__name__
            )

    async def _handled(self, js, event: Event, outputs: Sequence[Event], replay: str | None):
        for out in outputs:
            tiles = await self.tiles_of(js, out, event)
            if not tiles:
                continue
            await self._progress(js, out, tiles)
            if replay:
                continue
            if isinstance(out, TileEvent | ArtifactUploaded) and (
                out.origin is not None and out.origin.arrived_at is not None
            ):  # carried forward by the runtime: no lookup on the hot path
                arrived = [out.origin.arrived_at.timestamp()]
            else:
                arrived = [a for a in await self._arrivals_of(js, out.acq, tiles) if a is not None]
            if arrived:
                self._observe(out, max(arrived))

    def _observed_in_memory(self, out: Event, replay: str | None) -> bool:
        """The common case without I/O: a tile output of an acquisition whose progress is
        in sync and whose arrival time travels in `origin`. False: take the general path.
        Runs for every output, so it looks at the class once (`_role`) and at little else."""
        role = _ROLE.get(type(out)) or _role(type(out))
        if role != "tile":
            return role == "none"  # a slice output takes the general path
        tile = out.tile
        if tile is None:
            return True
        origin = out.origin
        arrived = None if origin is None else origin.arrived_at
        if arrived is None and not replay:
            return False
        acq = out.acq
        synced = self._synced.get((acq, out.kind))
        done = self._done.get(acq)
        if synced is None or done is None or time.monotonic() - synced >= self.resync_s:
            return False
        self._add_done(acq, done, (tile,))
        if not replay:
            self._observe(out, arrived.timestamp())
        return True

    def _add_done(self, acq: str, done: set[str], tiles: Iterable[TileCoord]) -> None:
        """Count `tiles` as done for `acq`."""
        done.update(f"{t.slice}.{t.token()}" for t in tiles)
        if acq not in self._gauges:
            self._export_done(acq, done)

    def _export_done(self, acq: str, done: set[str]) -> None:
        """Export the size of `done` as the acquisition's tiles-done gauge, read at scrape
        time (nothing to update per tile)."""
        gauge = self._gauges[acq] = ACQ_TILES_DONE.labels(acq, self.stage)
        gauge.set_function(done.__len__)

    def _observe(self, out: Event, arrived: float) -> None:
        """End-to-end latency of `out`: its emission minus the (latest) arrival behind it."""
        self._histogram(out.kind).observe(max(0.0, out.emitted_at.timestamp() - arrived))

    async def tiles_of(self, js, out: Event, source: Event | None = None) -> list[TileCoord]:
        """The tiles an output stands for (empty for events that are no tile deliverable)."""
        if isinstance(out, TileEvent):
            return [out.tile]
        if isinstance(out, ArtifactUploaded):
            return [out.tile] if out.tile is not None else []
        if isinstance(out, SliceStitched):
            return _positions(out)
        if isinstance(out, SliceRegistered):
            if (
                isinstance(source, SliceStitched)
                and (source.slice, source.mosaic) == (out.slice, out.mosaic)
                and source.acq == out.acq
            ):
                return _positions(source)
            stitched = await self._last(js, subject("slice_stitched", out.acq, *_slice_tokens(out)))
            return _positions(stitched) if isinstance(stitched, SliceStitched) else []
        return []

    def _histogram(self, kind: str):
        if kind not in self._latency:
            self._latency[kind] = END_TO_END_SECONDS.labels(self.stage, kind)
        return self._latency[kind]

    def _remember(self, key: str, value: float) -> None:
        self._arrivals[key] = value
        self._arrivals.move_to_end(key)
        while len(self._arrivals) > self.cache_size:
            self._arrivals.popitem(last=False)

    async def _arrivals_of(self, js, acq: str, tiles: list[TileCoord]) -> list[float | None]:
        limit = asyncio.Semaphore(32)

        async def one(tile: TileCoord) -> float | None:
            key = _tile_key(acq, tile)
            if key in self._arrivals:
                return self._arrivals[key]
            async with limit:
                found = await self._last(js, f"{PREFIX}.tile_arrived.{key}")
            if not isinstance(found, TileArrived):
                return None
            self._remember(key, found.completed_at.timestamp())
            return self._arrivals[key]

        return list(await asyncio.gather(*(one(t) for t in tiles)))

    async def _last(self, js, subj: str) -> Event | None:
        """The last event on a subject, or None."""
        from nats.js.errors import NotFoundError

        from messages.codec import InvalidEvent, decode_event

        try:
            msg = await asyncio.wait_for(js.get_last_msg(self.stream, subj), self.timeout)
        except NotFoundError:
            return None
        try:
            return decode_event(msg.data)
        except InvalidEvent:
            return None

    async def _progress(self, js, out: Event, tiles: list[TileCoord]) -> None:
        acq = out.acq
        done = self._done.get(acq)
        if done is None:
            done = self._done[acq] = set()
            while len(self._done) > self.max_acqs:
                gone, tiles_done = self._done.popitem(last=False)
                gauge = self._gauges.pop(gone, None)
                if gauge is not None:  # keeps its last value, not the set
                    gauge.set_function(partial(float, len(tiles_done)))
        self._done.move_to_end(acq)
        now = time.monotonic()
        key = (acq, out.kind)
        if now - self._synced.get(key, -math.inf) >= self.resync_s:
            self._synced[key] = now  # one reader at a time; again next event if it fails
            try:
                done |= await asyncio.wait_for(self._published(js, acq, out.kind), self.timeout)
            except BaseException:
                self._synced.pop(key, None)
                raise
        self._add_done(acq, done, tiles)

    async def _published(self, js, acq: str, kind: str) -> set[str]:
        """Tile keys ("<slice>.<tile>") already published as `kind` (from the stream)."""
        from services.eventlog import subjects_seen

        seen = await subjects_seen(js, self.stream, f"{PREFIX}.{kind}.{acq}.>")
        if kind not in ("slice_stitched", "slice_registered"):
            keys = set()
            for subj in seen:
                parsed = parse_subject(subj)
                if parsed.tile != ANY and re.fullmatch(r"m\d+-r\d+-c\d+", parsed.tile):
                    keys.add(parsed.key())
            return keys
        keys: set[str] = set()
        for subj in seen:
            event = await self._last(js, subj)
            if event is not None:
                keys.update(f"{t.slice}.{t.token()}" for t in await self.tiles_of(js, event))
        return keys


def _tile_key(acq: str, tile: TileCoord) -> str:
    return f"{acq}.{tile.slice}.{tile.token()}"


def _slice_tokens(event: SliceStitched | SliceRegistered) -> tuple[str, str]:
    return str(event.slice), f"m{event.mosaic}"


def _positions(event: SliceStitched) -> list[TileCoord]:
    return [
        TileCoord(slice=event.slice, mosaic=event.mosaic, row=p.row, col=p.col)
        for p in event.positions
    ]


# ---------------------------------------------------------------------------- resources
def _disk(path: Path, field: str) -> float:
    try:
        return float(getattr(shutil.disk_usage(path), field))
    except OSError:
        return math.nan


def watch_data_roots(roots: Mapping[str, Path | str]) -> None:
    """Export free and total bytes of each data root's filesystem, read at scrape time."""
    for name, path in roots.items():
        resolved = Path(path).expanduser().absolute()
        DATA_ROOT_FREE.labels(name, str(resolved)).set_function(partial(_disk, resolved, "free"))
        DATA_ROOT_SIZE.labels(name, str(resolved)).set_function(partial(_disk, resolved, "total"))


def _load_nvml():
    """`pynvml` initialised, or None (not installed, no driver)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return None
    return pynvml


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class GpuCollector(Collector):
    """GPU device, memory and utilization at scrape time; `tilepipe_gpu_devices` is 0 without.

    NVML (`pynvml`, package nvidia-ml-py) when importable: every device, utilization and this
    process's memory, without creating a CUDA context. Otherwise CuPy, but only once the
    process imported it (the process stage on a GPU): its current device and memory pool.
    """

    def __init__(self, nvml: Any = None, pid: int | None = None) -> None:
        self.nvml = nvml if nvml is not None else _load_nvml()
        self.pid = pid or os.getpid()

    def describe(self):
        return []

    def collect(self):
        families = {
            "devices": GaugeMetricFamily(
                "tilepipe_gpu_devices", "GPUs visible to this process (0 without NVML/CuPy)."
            ),
            "info": GaugeMetricFamily(
                "tilepipe_gpu_info", "A visible GPU and its name (value 1).", labels=["gpu", "name"]
            ),
            "used": GaugeMetricFamily(
                "tilepipe_gpu_memory_used_bytes",
                "GPU memory in use (all processes).",
                labels=["gpu"],
            ),
            "total": GaugeMetricFamily(
                "tilepipe_gpu_memory_total_bytes", "GPU memory of the device.", labels=["gpu"]
            ),
            "util": GaugeMetricFamily(
                "tilepipe_gpu_utilization_ratio",
                "Fraction of the last sample period a kernel ran on the GPU (NVML).",
                labels=["gpu"],
            ),
            "proc": GaugeMetricFamily(
                "tilepipe_gpu_process_memory_bytes",
                "GPU memory held by this process (NVML; CuPy: its memory pool).",
                labels=["gpu"],
            ),
        }
        count = 0
        with contextlib.suppress(Exception):
            if self.nvml is not None:
                count = self._nvml(families)
            elif "cupy" in sys.modules:
                count = self._cupy(sys.modules["cupy"], families)
        families["devices"].add_metric([], count)
        yield from (f for f in families.values() if f.samples)

    def _nvml(self, families: dict[str, GaugeMetricFamily]) -> int:
        nvml = self.nvml
        count = int(nvml.nvmlDeviceGetCount())
        for index in range(count):
            gpu = str(index)
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            with contextlib.suppress(Exception):
                families["info"].add_metric([gpu, _text(nvml.nvmlDeviceGetName(handle))], 1)
            with contextlib.suppress(Exception):
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                families["used"].add_metric([gpu], float(memory.used))
                families["total"].add_metric([gpu], float(memory.total))
            with contextlib.suppress(Exception):
                rates = nvml.nvmlDeviceGetUtilizationRates(handle)
                families["util"].add_metric([gpu], float(rates.gpu) / 100.0)
            with contextlib.suppress(Exception):
                mine = sum(
                    float(p.usedGpuMemory or 0)
                    for p in nvml.nvmlDeviceGetComputeRunningProcesses(handle)
                    if p.pid == self.pid
                )
                families["proc"].add_metric([gpu], mine)
        return count

    @staticmethod
    def _cupy(cp, families: dict[str, GaugeMetricFamily]) -> int:
        runtime = cp.cuda.runtime
        count = int(runtime.getDeviceCount())
        device = int(runtime.getDevice())
        gpu = str(device)
        with contextlib.suppress(Exception):
            name = _text(runtime.getDeviceProperties(device)["name"])
            families["info"].add_metric([gpu, name], 1)
        free, total = runtime.memGetInfo()
        families["used"].add_metric([gpu], float(total - free))
        families["total"].add_metric([gpu], float(total))
        with contextlib.suppress(Exception):
            families["proc"].add_metric([gpu], float(cp.get_default_memory_pool().total_bytes()))
        return count


_registered: set[str] = set()


def register_resource_collectors(config, registry=REGISTRY) -> None:
    """Data-root free space and GPU gauges on a service's /metrics (idempotent).

    `process_*` comes from prometheus_client's default process collector, already on.
    """
    if "roots" not in _registered:
        _registered.add("roots")
        roots = config.roots
        watch_data_roots({"raw": roots.raw, "work": roots.work, "output": roots.output})
    if "gpu" not in _registered:
        _registered.add("gpu")
        registry.register(GpuCollector())


# ---------------------------------------------------------------------------- Prometheus
_UP_LINE = re.compile(r"^\s*(?P<name>[\w.-]+)\s+metrics\s+https?://(?P<target>[^/\s]+)/metrics")


def targets_from_up_output(text: str) -> dict[str, list[str]]:
    """Service -> ["host:port"] from what `tilepipe up` printed."""
    targets: dict[str, list[str]] = {}
    for line in text.splitlines():
        found = _UP_LINE.match(line)
        if found:
            targets.setdefault(found["name"], []).append(found["target"])
    return targets


def targets_for_config(config, services: Iterable[str] | None = None) -> dict[str, list[str]]:
    """Service -> ["host:port"] of services run by `tilepipe run` with this config."""
    from services.serve import has_watcher
    from services.stages import configured_stages, metrics_port_for

    if services is None:
        services = (["watcher"] if has_watcher() else []) + configured_stages(config)
    host = config.metrics.host
    host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    return {name: [f"{host}:{metrics_port_for(config, name)}"] for name in services}


def _duration(seconds: float) -> str:
    return f"{int(seconds * 1000)}ms" if seconds < 1 else f"{seconds:g}s"


def scrape_config(
    targets: Mapping[str, str | Sequence[str]],
    interval_s: float = 15.0,
    host: str | None = None,
    rule_files: Sequence[str | Path] = (),
) -> dict:
    """A Prometheus configuration scraping each service as job `tilepipe-<service>`."""
    host = host or socket.gethostname()
    return {
        "global": {
            "scrape_interval": _duration(interval_s),
            "scrape_timeout": _duration(min(interval_s, 10.0)),
            "evaluation_interval": _duration(interval_s),
        },
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [
            {
                "job_name": f"{JOB_PREFIX}{name}",
                "metrics_path": "/metrics",
                "static_configs": [
                    {
                        "targets": [found] if isinstance(found, str) else list(found),
                        "labels": {"host": host},
                    }
                ],
            }
            for name, found in targets.items()
        ],
    }


def write_prometheus_config(path: Path | str, targets, **kwargs) -> Path:
    """Write `scrape_config(...)` (JSON, which is YAML) atomically; returns the path."""
    from services.atomic import write_atomically

    return write_atomically(Path(path), json.dumps(scrape_config(targets, **kwargs), indent=2))


# ---------------------------------------------------------------------------- dashboards
GRAFANA_SCHEMA_VERSIONS = (39,)  # Grafana 10.4 - 11.x
PANEL_TYPES = {
    "row", "timeseries", "stat", "gauge", "bargauge", "table", "heatmap", "text",
    "state-timeline", "status-history", "barchart", "piechart", "histogram", "logs",
}  # fmt: skip
VARIABLE_TYPES = {"datasource", "query", "custom", "constant", "interval", "textbox", "adhoc"}
BUILTIN_VARIABLES = {
    "__rate_interval", "__interval", "__interval_ms", "__range", "__range_s", "__range_ms",
    "__from", "__to", "__dashboard", "__name", "__all",
}  # fmt: skip
VAR_REF = re.compile(r"\$(?:\{(?P<braced>\w+)(?::\w+)?\}|(?P<plain>\w+))|\[\[(?P<old>\w+)\]\]")
UID = re.compile(r"^[A-Za-z0-9_-]{1,40}$")


def all_panels(dashboard: dict) -> list[dict]:
    """Every panel, rows' nested panels included, in order."""
    out = []
    for panel in dashboard.get("panels", []):
        out.append(panel)
        out.extend(panel.get("panels", []) if panel.get("type") == "row" else [])
    return out


def dashboard_queries(dashboard: dict) -> list[tuple[dict, dict]]:
    """(panel, target) for every Prometheus query of the dashboard."""
    return [
        (panel, target)
        for panel in all_panels(dashboard)
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


def variable_refs(text: str) -> set[str]:
    return {m["braced"] or m["plain"] or m["old"] for m in VAR_REF.finditer(text)}


def substitute(expr: str, values: Mapping[str, str | Sequence[str]]) -> str:
    """Grafana's interpolation for Prometheus: several values become a regex `(a|b)`."""

    def one(match: re.Match) -> str:
        name = match["braced"] or match["plain"] or match["old"]
        if name not in values:
            return match[0]
        value = values[name]
        if isinstance(value, str):
            return value
        escaped = [re.sub(r"([\\^$.|?*+()\[\]{}])", r"\\\\\1", v) for v in value]
        return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"

    return VAR_REF.sub(one, expr)


def _datasource_ok(ref: Any, names: set[str]) -> bool:
    if not isinstance(ref, dict) or ref.get("type") != "prometheus":
        return False
    refs = variable_refs(str(ref.get("uid", "")))
    return len(refs) == 1 and refs <= names


def lint_dashboard(dashboard: dict) -> list[str]:
    """What keeps a dashboard JSON from loading as intended in the Grafana schema it declares:
    top-level fields, variables (datasource by uid variable), unique panel ids, grid layout,
    panel types, datasource refs of panels and targets, refIds, variables used but undefined."""
    problems: list[str] = []
    version = dashboard.get("schemaVersion")
    if version not in GRAFANA_SCHEMA_VERSIONS:
        problems.append(f"schemaVersion {version!r} not one of {GRAFANA_SCHEMA_VERSIONS}")
    structure = [
        f"{key}: missing or not a {kind.__name__}"
        for key, kind in (("title", str), ("uid", str), ("panels", list), ("templating", dict))
        if not isinstance(dashboard.get(key), kind)
    ]
    if structure:
        return problems + structure
    if not UID.match(dashboard["uid"]):
        problems.append(f"uid {dashboard['uid']!r}: at most 40 of [A-Za-z0-9_-]")
    if dashboard.get("id") is not None:
        problems.append("id must be null in a provisioned dashboard")
    time_range = dashboard.get("time")
    if not (isinstance(time_range, dict) and {"from", "to"} <= set(time_range)):
        problems.append("time: needs from and to")
    variables = dashboard["templating"].get("list", [])
    names = [v.get("name") for v in variables]
    if len(set(names)) != len(names):
        problems.append(f"variable names not unique: {names}")
    ds_vars = {
        v["name"]
        for v in variables
        if v.get("type") == "datasource" and v.get("query") == "prometheus"
    }
    if not ds_vars:
        problems.append("no Prometheus datasource variable")
    defined = set(names) | BUILTIN_VARIABLES
    for var in variables:
        where = f"variable {var.get('name')!r}"
        if var.get("type") not in VARIABLE_TYPES:
            problems.append(f"{where}: unknown type {var.get('type')!r}")
        if var.get("type") == "query":
            if not _datasource_ok(var.get("datasource"), ds_vars):
                problems.append(f"{where}: datasource must be a prometheus ref to {ds_vars}")
            query = var.get("query")
            text = query.get("query") if isinstance(query, dict) else query
            if not text or not re.match(r"^(label_values|query_result|metrics)\(", text):
                problems.append(f"{where}: query {text!r} is no Prometheus variable query")
            if var.get("refresh") not in (1, 2):
                problems.append(f"{where}: refresh must be 1 (load) or 2 (time range change)")
    ids: list[Any] = []
    cells: dict[tuple[int, int], str] = {}
    for panel in all_panels(dashboard):
        title = panel.get("title", "?")
        where = f"panel {panel.get('id')} {title!r}"
        ids.append(panel.get("id"))
        if not isinstance(panel.get("id"), int):
            problems.append(f"{where}: id must be an integer")
        if panel.get("type") not in PANEL_TYPES:
            problems.append(f"{where}: unknown panel type {panel.get('type')!r}")
        grid = panel.get("gridPos", {})
        if not all(isinstance(grid.get(k), int) for k in "hwxy"):
            problems.append(f"{where}: gridPos needs integer h, w, x, y")
        else:
            if grid["w"] < 1 or grid["h"] < 1 or grid["x"] < 0 or grid["x"] + grid["w"] > 24:
                problems.append(f"{where}: gridPos {grid} outside the 24-column grid")
            for x in range(grid["x"], grid["x"] + grid["w"]):
                for y in range(grid["y"], grid["y"] + grid["h"]):
                    if (x, y) in cells:
                        problems.append(f"{where}: overlaps {cells[(x, y)]}")
                        break
                    cells[(x, y)] = where
                else:
                    continue
                break
        if panel.get("type") == "row":
            if not panel.get("collapsed") and panel.get("panels"):
                problems.append(f"{where}: an open row keeps its panels at the top level")
            continue
        if not _datasource_ok(panel.get("datasource"), ds_vars):
            problems.append(f"{where}: datasource must be a prometheus ref to {ds_vars}")
        field_config = panel.get("fieldConfig")
        if not (isinstance(field_config, dict) and {"defaults", "overrides"} <= set(field_config)):
            problems.append(f"{where}: fieldConfig needs defaults and overrides")
        targets = panel.get("targets") or []
        if not targets and panel.get("type") != "text":
            problems.append(f"{where}: no targets")
        ref_ids = [t.get("refId") for t in targets]
        if len(set(ref_ids)) != len(ref_ids) or not all(ref_ids):
            problems.append(f"{where}: refIds must be present and unique: {ref_ids}")
        for target in targets:
            if not _datasource_ok(target.get("datasource"), ds_vars):
                problems.append(f"{where} {target.get('refId')}: datasource ref")
            if not str(target.get("expr", "")).strip():
                problems.append(f"{where} {target.get('refId')}: empty expr")
            unknown = variable_refs(str(target.get("expr", ""))) - defined
            if unknown:
                problems.append(f"{where} {target.get('refId')}: undefined variables {unknown}")
    if len(set(ids)) != len(ids):
        dupes = sorted({i for i in ids if ids.count(i) > 1}, key=str)
        problems.append(f"panel ids not unique: {dupes}")
    return problems


# ---------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.monitoring", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prometheus-config", help="write a Prometheus config for the services")
    p.add_argument("--up-output", type=Path, help="what `tilepipe up` printed (its URLs)")
    p.add_argument("--config", type=Path, help="tilepipe config (ports of `tilepipe run`)")
    p.add_argument("--services", default=None, help="comma-separated services (default: all)")
    p.add_argument("--interval", type=float, default=15.0, help="scrape interval, seconds")
    p.add_argument("--host", default=None, help="value of the host label (default: hostname)")
    p.add_argument("--rules", nargs="*", default=[], help="alert rule files (globs allowed)")
    p.add_argument("-o", "--output", type=Path, default=None, help="file (default: stdout)")
    p = sub.add_parser("lint-dashboards", help="check Grafana dashboard JSON files")
    p.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    if args.command == "lint-dashboards":
        failed = 0
        for path in args.files:
            problems = lint_dashboard(json.loads(path.read_text()))
            failed += bool(problems)
            for problem in problems:
                print(f"{path}: {problem}")
        return 1 if failed else 0
    if args.up_output is not None:
        targets = targets_from_up_output(args.up_output.read_text())
    else:
        from services.config import load_config

        services = args.services.split(",") if args.services else None
        targets = targets_for_config(load_config(args.config), services)
    rules = [found for pattern in args.rules for found in (sorted(glob.glob(pattern)) or [pattern])]
    kwargs = {"interval_s": args.interval, "host": args.host, "rule_files": rules}
    if args.output is None:
        print(json.dumps(scrape_config(targets, **kwargs), indent=2))
    else:
        print(write_prometheus_config(args.output, targets, **kwargs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
