"""Monitoring: metrics on every service, dashboards evaluated by a real Prometheus, alert rules.

The live test runs `tilepipe up` with every stage, feeds it `tilepipe simulate`, scrapes every
service with the Debian `prometheus` binary (1 s interval, loopback only) and evaluates every
query of every dashboard panel, variables substituted, through Prometheus' HTTP API. The
`prometheus`/`promtool` binaries are required: CI installs them (`.ci/apt-packages`).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import types
import urllib.parse
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

from messages import TileArrived, TileCoord
from messages.events import (
    Origin,
    SliceRegistered,
    SliceStitched,
    TileConverted,
    TilePosition,
)
from services.local.natsserver import free_port
from services.monitoring import collectors, dashboards, prometheus
from services.runtime import monitor as runtime_monitor
from services.runtime.bus import publish_event
from services.runtime.transport import NatsTransport
from tests.conftest import wait_for
from tests.procs import OutputReader, free_ports, interrupt, running_up

REPO = Path(__file__).resolve().parents[1]
GRAFANA = REPO / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
RULES = sorted((GRAFANA / "alerts").glob("*.yml"))
ENV = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
TILE_STAGES = ("convert", "process", "stitch", "upload")
BUILTINS = {"__rate_interval": "2m", "__interval": "15s", "__range": "10m"}
GPU_ONLY = re.compile(r"tilepipe_gpu_(info|memory_used|memory_total|utilization|process)")


def tool(name: str) -> str:
    """A required binary: missing fails the test (CI installs it), never skips."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` not found: apt-get install prometheus (see .ci/apt-packages)")
    return path


def get_json(url: str, timeout: float = 10.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


class Prometheus:
    """The Debian prometheus binary on a free loopback port."""

    def __init__(self, config: Path, data: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = data.with_suffix(".log")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    tool("prometheus"),
                    f"--config.file={config}",
                    f"--storage.tsdb.path={data}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=1h",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    async def ready(self) -> None:
        def up() -> bool:
            assert self.proc.poll() is None, self.log.read_text()
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r,
            ):
                return r.status == 200
            return False

        await wait_for(up, timeout=30, interval=0.2)

    def query(self, expr: str) -> dict:
        """The JSON answer of an instant query (status checked by the caller)."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            return get_json(url)
        except urllib.error.HTTPError as exc:  # 400 with a JSON body on a parse error
            return json.loads(exc.read() or b"{}") or {"status": "error", "error": str(exc)}

    def values(self, expr: str) -> list[float]:
        answer = self.query(expr)
        assert answer["status"] == "success", answer
        return [float(r["value"][1]) for r in answer["data"]["result"]]

    def label_values(self, metric: str, label: str) -> list[str]:
        url = f"{self.url}/api/v1/label/{label}/values?" + urllib.parse.urlencode(
            {"match[]": metric}
        )
        return sorted(get_json(url)["data"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def variable_values(prom: Prometheus, board: dict) -> list[dict[str, list[str]]]:
    """Every combination of the dashboard's variables Grafana would query with: multi-value
    variables take all their values at once (`(a|b)`), single-value ones each value in turn."""
    combos: list[dict[str, list[str]]] = [{}]
    for var in board["templating"]["list"]:
        if var["type"] != "query":
            continue
        found = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["query"]["query"])
        assert found, var["query"]
        values = prom.label_values(found[1], found[2])
        assert values, f"{board['uid']}: variable {var['name']} has no values"
        choices = [values] if var.get("multi") else [[v] for v in values]
        combos = [{**c, var["name"]: choice} for c in combos for choice in choices]
    return combos


# ---------------------------------------------------------------------------- live
async def test_dashboards_and_metrics_against_a_live_pipeline(tmp_path):
    """Every panel query of every dashboard returns data from a real run of every service."""
    promtool = tool("promtool")
    tool("prometheus")
    started = time.monotonic()
    roots = {name: tmp_path / name for name in ("raw", "work", "output")}
    config = tmp_path / "tp.toml"
    config.write_text(
        "[roots]\n"
        + "".join(f'{name} = "{path}"\n' for name, path in roots.items())
        + free_ports()
        + "[watcher]\nsettle_s = 0.2\n"
        + "[stages.upload]\nenabled = true\n"
        + f'options = {{ url = "file://{tmp_path / "bucket"}" }}\n'
    )
    with running_up("--config", str(config), "--work", str(tmp_path / "up"), env=ENV) as proc:
        up = OutputReader(proc)
        prom = None
        try:
            await wait_for(
                lambda: "Ctrl-C stops everything." in up.text or proc.poll() is not None,
                timeout=90,
                interval=0.2,
            )
            targets = prometheus.targets_from_up_output(up.text)
            assert {"watcher", *TILE_STAGES} <= set(targets), up.text
            assert all(t.startswith("127.0.0.1:") for ts in targets.values() for t in ts)

            prom_config = prometheus.write_prometheus_config(
                tmp_path / "prometheus.yml",
                targets,
                interval_s=1,
                host="testhost",
                rule_files=RULES,
            )
            check = subprocess.run(
                [promtool, "check", "config", str(prom_config)], capture_output=True, text=True
            )
            assert check.returncode == 0, check.stdout + check.stderr
            prom = Prometheus(prom_config, tmp_path / "prom")
            await prom.ready()
            # every target scraped before any tile is written: a rate() needs a sample from
            # before the counters grow (a target first scraped after the run shows no increase)
            jobs = {f"tilepipe-{name}" for name in targets}
            await wait_for(
                lambda: (
                    {r["metric"]["job"] for r in prom.query("up == 1")["data"]["result"]} >= jobs
                ),
                timeout=30,
                interval=0.5,
            )

            # a short acquisition: 1 slice of 2x2 tiles, written at 1 tile/s (so every stage's
            # histograms grow across several 1 s scrapes: a rate() needs an increase it has seen)
            from services.local.simulate import small_manifest, write_manifest

            manifest = write_manifest(
                small_manifest("mon", slices=1, rows=2, cols=2, settle_s=0.2), roots["raw"] / "mon"
            )
            sim = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "services.ops.cli",
                    "simulate",
                    str(manifest),
                    "--rate",
                    "1",
                ],
                cwd=REPO,
                env=ENV,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert sim.returncode == 0, sim.stdout + sim.stderr

            stages = [name for name in targets if name != "watcher"]

            def pipeline_done() -> bool:
                """Every stage published for all 4 tiles and observed its end-to-end latency."""
                assert proc.poll() is None, up.text
                done = prom.values(
                    'max by (stage) (tilepipe_acquisition_tiles_done{acq="mon"}) >= 4'
                )
                seen = prom.values("sum by (stage) (tilepipe_end_to_end_latency_seconds_count) > 0")
                return len(done) >= len(stages) and len(seen) >= len(stages)

            try:
                await wait_for(pipeline_done, timeout=120, interval=1)
            except AssertionError:
                done = prom.query("tilepipe_acquisition_tiles_done")["data"]["result"]
                seen = prom.query("tilepipe_end_to_end_latency_seconds_count")["data"]["result"]
                raise AssertionError(
                    f"stages {stages} did not all report 4 tiles done and a latency: {done} {seen} "
                    "(is StageMonitor wired into services/runtime/runner.py?)"
                ) from None
            # every stage polled its backlog and a few scrapes happened since
            await wait_for(
                lambda: len(prom.values("tilepipe_consumer_pending_messages")) >= len(stages),
                timeout=30,
                interval=1,
            )
            await asyncio.sleep(3)

            # every endpoint: lint-clean exposition, process and resource metrics present
            for name, found in targets.items():
                for target in found:
                    with urllib.request.urlopen(f"http://{target}/metrics", timeout=10) as r:
                        text = r.read()
                    lint = subprocess.run(
                        [promtool, "check", "metrics"], input=text, capture_output=True
                    )
                    assert lint.returncode == 0 and not lint.stdout.strip(), (name, lint.stdout)
                    for metric in (
                        "process_cpu_seconds_total",
                        "process_resident_memory_bytes",
                        "tilepipe_data_root_free_bytes",
                        "tilepipe_gpu_devices",
                    ):
                        assert metric.encode() in text, (name, metric)
            targets_up = get_json(f"{prom.url}/api/v1/targets")["data"]["activeTargets"]
            assert {t["labels"]["job"] for t in targets_up} == {f"tilepipe-{n}" for n in targets}
            assert all(t["health"] == "up" for t in targets_up), targets_up

            # the alert rules load and evaluate without errors against real series
            groups = get_json(f"{prom.url}/api/v1/rules")["data"]["groups"]
            rules = [r for g in groups for r in g["rules"]]
            assert len(rules) >= 5
            assert all(r["health"] == "ok" for r in rules), [
                r for r in rules if r["health"] != "ok"
            ]

            # every query of every panel of every dashboard, variables substituted
            gpus = max(prom.values("tilepipe_gpu_devices"), default=0)
            empty, failed, evaluated = [], [], 0
            for path in DASHBOARDS:
                board = json.loads(path.read_text())
                for values in variable_values(prom, board):
                    for panel, target in dashboards.dashboard_queries(board):
                        expr = dashboards.substitute(target["expr"], {**values, **BUILTINS})
                        assert "$" not in expr, expr
                        answer = prom.query(expr)
                        evaluated += 1
                        where = f"{path.name} #{panel['id']} {panel['title']!r} {target['refId']}"
                        if answer.get("status") != "success":
                            failed.append(f"{where}: {answer.get('error')}: {expr}")
                        elif gpus or not GPU_ONLY.search(expr):
                            numbers = [float(r["value"][1]) for r in answer["data"]["result"]]
                            if not [n for n in numbers if n == n]:  # nothing, or only NaN
                                empty.append(f"{where} ({values}): {numbers} {expr}")
            assert not failed, "\n".join(failed)
            assert not empty, "empty (or only NaN) results:\n" + "\n".join(empty)
            assert evaluated >= 60
        finally:
            code = interrupt(proc)
            up.reader.join(5)
            if prom is not None:
                prom.stop()
    assert code == 0, up.text
    assert time.monotonic() - started < 170


# ---------------------------------------------------------------------------- alert rules
def test_alert_rules_check_and_unit_tests():
    promtool = tool("promtool")
    assert RULES
    check = subprocess.run(
        [promtool, "check", "rules", *map(str, RULES)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    tests = sorted((GRAFANA / "alerts" / "tests").glob("*.yml"))
    assert tests
    run = subprocess.run(
        [promtool, "test", "rules", *map(str, tests)], capture_output=True, text=True
    )
    assert run.returncode == 0 and "SUCCESS" in run.stdout, run.stdout + run.stderr
    # the stalled-stage scenario is among them
    text = "".join(t.read_text() for t in tests)
    assert "alertname: TilepipeStageStalled" in text and "stage: process" in text
    assert "alertname: TilepipeStreamNearlyFull" in text  # the stream and KV limits


# ---------------------------------------------------------------------------- dashboards
def test_dashboards_are_valid_for_their_schema_version():
    assert {p.name for p in DASHBOARDS} >= {
        "tilepipe-overview.json",
        "tilepipe-stage.json",
        "tilepipe-hosts.json",
    }
    uids = set()
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        assert dashboards.lint_dashboard(board) == [], path.name
        uids.add(board["uid"])
        titles = [p["title"] for p in dashboards.all_panels(board) if p["type"] != "row"]
        assert len(titles) == len(set(titles)), path.name
    assert len(uids) == len(DASHBOARDS)


def test_dashboards_are_what_the_builder_writes():
    spec = importlib.util.spec_from_file_location(
        "build_dashboards", GRAFANA / "build_dashboards.py"
    )
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    for name, board in builder.build().items():
        on_disk = (GRAFANA / "dashboards" / name).read_text()
        assert on_disk == builder.render(board), f"run python grafana/build_dashboards.py ({name})"


def test_dashboard_lint_finds_problems():
    board = json.loads((GRAFANA / "dashboards" / "tilepipe-stage.json").read_text())
    panels = [p for p in board["panels"] if p["type"] != "row"]
    panels[1]["id"] = panels[0]["id"]
    panels[2]["datasource"] = "Prometheus"
    panels[3]["targets"][0]["expr"] = "rate(x{stage=~'$nope'}[5m])"
    panels[4]["gridPos"]["w"] = 30
    board["schemaVersion"] = 16
    problems = "\n".join(dashboards.lint_dashboard(board))
    assert "schemaVersion" in problems
    assert "panel ids not unique" in problems
    assert "datasource must be a prometheus ref" in problems
    assert "undefined variables {'nope'}" in problems
    assert "outside the 24-column grid" in problems


def test_variable_substitution_is_grafanas():
    expr = 'rate(x{stage=~"$stage", acq="${acq}"}[$__rate_interval])'
    out = dashboards.substitute(
        expr, {"stage": ["a", "b.c"], "acq": ["x1"], "__rate_interval": "1m"}
    )
    assert out == 'rate(x{stage=~"(a|b\\\\.c)", acq="x1"}[1m])'


def test_provisioning_matches_the_dashboards():
    sources = yaml.safe_load((GRAFANA / "provisioning/datasources/tilepipe.yml").read_text())
    (source,) = sources["datasources"]
    assert sources["apiVersion"] == 1 and source["type"] == "prometheus"
    providers = yaml.safe_load((GRAFANA / "provisioning/dashboards/tilepipe.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        (ds_var,) = [v for v in board["templating"]["list"] if v["type"] == "datasource"]
        assert ds_var["current"]["value"] == source["uid"]


# ---------------------------------------------------------------------------- helpers
def test_prometheus_config_from_up_output_and_from_a_config(tmp_path):
    text = (
        "NATS: nats://127.0.0.1:4222 (embedded)\n"
        "  watcher    metrics http://127.0.0.1:9400/metrics  log /w/logs/watcher.log\n"
        "  convert    metrics http://127.0.0.1:9401/metrics  log /w/logs/convert.log\n"
    )
    targets = prometheus.targets_from_up_output(text)
    assert targets == {"watcher": ["127.0.0.1:9400"], "convert": ["127.0.0.1:9401"]}
    path = prometheus.write_prometheus_config(
        tmp_path / "p.yml", targets, interval_s=1, host="h", rule_files=RULES
    )
    loaded = yaml.safe_load(path.read_text())
    assert loaded["global"]["scrape_interval"] == "1s"
    assert [j["job_name"] for j in loaded["scrape_configs"]] == [
        "tilepipe-watcher",
        "tilepipe-convert",
    ]
    assert loaded["scrape_configs"][0]["static_configs"][0]["labels"] == {"host": "h"}
    check = subprocess.run(
        [tool("promtool"), "check", "config", str(path)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr

    from services.core.config import Config

    cfg = Config.model_validate({"metrics": {"base_port": 9500}})
    assert prometheus.targets_for_config(cfg, ["watcher", "process"]) == {
        "watcher": ["127.0.0.1:9500"],
        "process": ["127.0.0.1:9502"],
    }
    up_txt = tmp_path / "up.txt"
    up_txt.write_text(text)
    out = subprocess.run(
        [sys.executable, "-m", "services.monitoring", "prometheus-config", "--up-output", up_txt],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["global"]["scrape_interval"] == "15s"


def _exposition(collector) -> str:
    registry = CollectorRegistry()
    registry.register(collector)
    return generate_latest(registry).decode()


def test_gpu_collector_without_gpu_exports_only_the_device_count(monkeypatch):
    monkeypatch.delitem(sys.modules, "cupy", raising=False)
    collector = collectors.GpuCollector(nvml=None)
    collector.nvml = None
    text = _exposition(collector)
    assert "tilepipe_gpu_devices 0.0" in text
    assert "tilepipe_gpu_memory_used_bytes" not in text


def test_gpu_collector_with_nvml():
    memory = types.SimpleNamespace(used=3 << 30, total=80 << 30)
    proc = [types.SimpleNamespace(pid=4242, usedGpuMemory=1 << 30)]
    nvml = types.SimpleNamespace(
        nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=lambda h: b"NVIDIA H100" if h == 0 else "NVIDIA A100",
        nvmlDeviceGetMemoryInfo=lambda h: memory,
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=75 if h == 0 else 0),
        nvmlDeviceGetComputeRunningProcesses=lambda h: proc if h == 0 else [],
    )
    registry = CollectorRegistry()
    registry.register(collectors.GpuCollector(nvml=nvml, pid=4242))
    text = generate_latest(registry).decode()
    assert "tilepipe_gpu_devices 2.0" in text
    assert 'tilepipe_gpu_info{gpu="0",name="NVIDIA H100"} 1.0' in text
    assert 'tilepipe_gpu_info{gpu="1",name="NVIDIA A100"} 1.0' in text

    def value(name: str, gpu: str) -> float | None:
        return registry.get_sample_value(name, {"gpu": gpu})

    assert value("tilepipe_gpu_utilization_ratio", "0") == 0.75
    assert value("tilepipe_gpu_memory_total_bytes", "1") == 80 << 30
    assert value("tilepipe_gpu_memory_used_bytes", "0") == 3 << 30
    assert value("tilepipe_gpu_process_memory_bytes", "0") == 1 << 30
    assert value("tilepipe_gpu_process_memory_bytes", "1") == 0


def test_data_root_gauges(tmp_path):
    collectors.watch_data_roots({"work": tmp_path, "output": tmp_path / "missing"})
    usage = shutil.disk_usage(tmp_path)
    free = REGISTRY.get_sample_value(
        "tilepipe_data_root_free_bytes", {"root": "work", "path": str(tmp_path)}
    )
    size = REGISTRY.get_sample_value(
        "tilepipe_data_root_size_bytes", {"root": "work", "path": str(tmp_path)}
    )
    assert size == usage.total and abs(free - usage.free) < 0.01 * usage.total
    missing = REGISTRY.get_sample_value(
        "tilepipe_data_root_free_bytes", {"root": "output", "path": str(tmp_path / "missing")}
    )
    assert missing != missing  # NaN, the scrape still works


# ---------------------------------------------------------------------------- stage hook
def _sample(stage: str, event: str, suffix: str = "count") -> float:
    labels = {"stage": stage, "event": event}
    value = REGISTRY.get_sample_value(f"tilepipe_end_to_end_latency_seconds_{suffix}", labels)
    return value or 0.0


def _tiles_done(stage: str, acq: str = "mon1") -> float | None:
    """The exported tiles-done gauge (as a scrape reads it: the gauge is a function)."""
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(
        "tilepipe_acquisition_tiles_done", {"acq": acq, "stage": stage}
    )


def _count(stage: str, event: str) -> float:
    return _sample(stage, event)


class Unreachable:
    """A transport whose server never answers."""

    stream = "TILEPIPE"

    async def last(self, *a, **k):
        raise RuntimeError("down")

    async def subjects(self, *a, **k):
        raise RuntimeError("down")


async def test_stage_monitor_latency_and_progress(js):
    t0 = datetime.now(UTC) - timedelta(seconds=30)
    tiles = [TileCoord(slice=0, row=r, col=c) for r in range(2) for c in range(2)]
    for i, tile in enumerate(tiles):
        await publish_event(
            js,
            TileArrived(
                acq="mon1",
                tile=tile,
                path=f"t{i}.nii",
                manifest="m.toml",
                size_bytes=1,
                completed_at=t0 + timedelta(seconds=i),
            ),
        )

    def converted(tile: TileCoord, seconds: float = 40) -> TileConverted:
        return TileConverted(
            acq="mon1",
            tile=tile,
            path="x.zarr",
            raw_path="t.nii",
            shape=[1],
            dtype="u2",
            emitted_at=t0 + timedelta(seconds=seconds),
        )

    # one tile already converted before this worker started: seeded from the stream
    await publish_event(js, converted(tiles[3]))
    monitor = runtime_monitor.StageMonitor("mon-convert", "TILEPIPE", produces=[TileConverted])
    assert _count("mon-convert", "tile_converted") == 0  # present from the start
    from prometheus_client import REGISTRY

    assert (
        REGISTRY.get_sample_value(
            "tilepipe_end_to_end_latency_seconds_count",
            {"stage": "mon-convert", "event": "tile_converted"},
        )
        == 0
    )
    arrived = TileArrived(
        acq="mon1",
        tile=tiles[0],
        path="t0.nii",
        manifest="m.toml",
        size_bytes=1,
        completed_at=t0,
    )
    await monitor.handled(NatsTransport(js), arrived, [converted(tiles[0])])
    assert _count("mon-convert", "tile_converted") == 1
    assert _sample("mon-convert", "tile_converted", "sum") == pytest.approx(40)
    assert _tiles_done("mon-convert") == 2

    # in sync now: an output carrying its arrival in `origin` is recorded without the stream
    origin = Origin(
        stage="mon-convert",
        input_type="tile_arrived",
        attempt=1,
        started_at=t0,
        arrived_at=t0 + timedelta(seconds=1),
    )
    fast = converted(tiles[1], seconds=50).model_copy(update={"origin": origin})
    await monitor.handled(Unreachable(), converted(tiles[1]), [fast])
    assert _count("mon-convert", "tile_converted") == 2
    assert _sample("mon-convert", "tile_converted", "sum") == pytest.approx(40 + 49)
    assert _tiles_done("mon-convert") == 3

    # a later stage looks the arrival up in the stream; a replay is not a latency
    monitor2 = runtime_monitor.StageMonitor("mon-process", "TILEPIPE")
    await monitor2.handled(
        NatsTransport(js), converted(tiles[1]), [converted(tiles[1], seconds=61)]
    )
    assert _count("mon-process", "tile_converted") == 1
    await monitor2.handled(
        NatsTransport(js), converted(tiles[2]), [converted(tiles[2])], replay="op"
    )
    assert _count("mon-process", "tile_converted") == 1
    assert _tiles_done("mon-process") == 3  # seeded 3, then 1, 2

    # a stitched mosaic: from its last tile's arrival; registered: the same tiles
    stitched = SliceStitched(
        acq="mon1",
        slice=0,
        path="m.ome.zarr",
        positions=[TilePosition(row=t.row, col=t.col, y=0, x=0) for t in tiles],
        emitted_at=t0 + timedelta(seconds=13),
    )
    monitor3 = runtime_monitor.StageMonitor("mon-stitch", "TILEPIPE")
    await monitor3.handled(NatsTransport(js), converted(tiles[3]), [stitched])
    assert _sample("mon-stitch", "slice_stitched", "sum") == pytest.approx(10)  # last: t0 + 3 s
    assert _tiles_done("mon-stitch") == 4
    await publish_event(js, stitched)
    registered = SliceRegistered(
        acq="mon1", slice=0, path="v.zarr", transform=[[1, 0, 0]] * 3, quality=1, accepted=True
    )
    monitor4 = runtime_monitor.StageMonitor("mon-register", "TILEPIPE")
    await monitor4.handled(NatsTransport(js), converted(tiles[0]), [registered])  # mosaic read back
    assert _count("mon-register", "slice_registered") == 1
    assert _tiles_done("mon-register") == 4

    # never raises, even without a server answer
    await runtime_monitor.StageMonitor("mon-x", "TILEPIPE").handled(
        Unreachable(), converted(tiles[0]), [converted(tiles[0])]
    )


async def test_tiles_done_gauge_keeps_its_value_when_an_acquisition_is_evicted(js):
    """Only `max_acqs` acquisitions are tracked; an evicted one's gauge keeps its last count
    (and no longer holds its tile set), a tracked one counts on."""
    monitor = runtime_monitor.StageMonitor("mon-evict", "TILEPIPE", max_acqs=1)

    def converted(acq: str, col: int) -> TileConverted:
        return TileConverted(
            acq=acq,
            tile=TileCoord(slice=0, row=0, col=col),
            path="x.zarr",
            raw_path="t.nii",
            shape=[1],
            dtype="u2",
        )

    for col in range(3):
        await monitor.handled(NatsTransport(js), converted("evA", col), [converted("evA", col)])
    assert _tiles_done("mon-evict", "evA") == 3
    await monitor.handled(NatsTransport(js), converted("evB", 0), [converted("evB", 0)])
    assert list(monitor._done) == ["evB"]  # evA evicted
    assert _tiles_done("mon-evict", "evA") == 3
    assert _tiles_done("mon-evict", "evB") == 1
    await monitor.handled(NatsTransport(js), converted("evB", 1), [converted("evB", 1)])
    assert _tiles_done("mon-evict", "evB") == 2
