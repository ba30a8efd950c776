"""Builds the Grafana dashboards in `grafana/dashboards/` (run it after editing this file).

    python grafana/build_dashboards.py

The JSON files are what Grafana provisions and what the tests evaluate against Prometheus;
`tests/test_monitoring.py` checks that they are what this script writes.
Jobs are `tilepipe-<service>` with a `host` label (see `services/monitoring/prometheus.py`).
"""

from __future__ import annotations

import json
from pathlib import Path

SCHEMA_VERSION = 39
DS = {"type": "prometheus", "uid": "${datasource}"}
JOBS = 'job=~"tilepipe-.*"'
RATE = "$__rate_interval"
OUT = Path(__file__).resolve().parent / "dashboards"


def datasource_variable() -> dict:
    return {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "current": {"selected": False, "text": "Prometheus", "value": "tilepipe-prometheus"},
        "hide": 0,
        "includeAll": False,
        "multi": False,
        "options": [],
        "refresh": 1,
        "regex": "",
        "skipUrlSync": False,
    }


def query_variable(name: str, label: str, query: str, multi: bool = True) -> dict:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "definition": query,
        "query": {"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]} if multi else {},
        "hide": 0,
        "includeAll": multi,
        "multi": multi,
        "options": [],
        "refresh": 2,
        "regex": "",
        "skipUrlSync": False,
        "sort": 1,
    }


def target(expr: str, legend: str = "", ref: str = "A", instant: bool = False) -> dict:
    return {
        "refId": ref,
        "datasource": DS,
        "editorMode": "code",
        "expr": expr,
        "legendFormat": legend or "__auto",
        "range": not instant,
        "instant": instant,
    }


class Layout:
    """Places panels left to right on the 24-column grid and numbers them."""

    def __init__(self) -> None:
        self.panels: list[dict] = []
        self.x = self.y = self.row_h = 0

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append(
            {
                "id": len(self.panels) + 1,
                "type": "row",
                "title": title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y},
                "panels": [],
            }
        )
        self.y += 1

    def _newline(self) -> None:
        self.y += self.row_h
        self.x = self.row_h = 0

    def add(
        self,
        kind: str,
        title: str,
        targets: list[dict],
        unit: str = "short",
        w: int = 12,
        h: int = 8,
        description: str = "",
        options: dict | None = None,
        defaults: dict | None = None,
    ) -> None:
        if self.x + w > 24:
            self._newline()
        refs = "ABCDEFGH"
        panel = {
            "id": len(self.panels) + 1,
            "type": kind,
            "title": title,
            "description": description,
            "datasource": DS,
            "gridPos": {"h": h, "w": w, "x": self.x, "y": self.y},
            "targets": [{**t, "refId": refs[i]} for i, t in enumerate(targets)],
            "fieldConfig": {"defaults": {"unit": unit, **(defaults or {})}, "overrides": []},
            "options": options or OPTIONS.get(kind, {}),
        }
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)


OPTIONS = {
    "timeseries": {
        "legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]},
        "tooltip": {"mode": "multi", "sort": "desc"},
    },
    "stat": {
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        "colorMode": "value",
        "graphMode": "area",
        "textMode": "value_and_name",
        "orientation": "auto",
    },
    "bargauge": {
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        "displayMode": "gradient",
        "orientation": "horizontal",
        "showUnfilled": True,
    },
    "heatmap": {
        "calculate": False,
        "yAxis": {"unit": "s"},
        "cellGap": 1,
        "color": {"mode": "scheme", "scheme": "Oranges"},
    },
}
PERCENT_0_1 = {"min": 0, "max": 1}


def dashboard(uid: str, title: str, description: str, variables: list, layout: Layout) -> dict:
    return {
        "id": None,
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["tilepipe"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "10s",
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "time": {"from": "now-3h", "to": "now"},
        "timepicker": {},
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "weekStart": "",
        "links": [
            {
                "type": "dashboards",
                "tags": ["tilepipe"],
                "asDropdown": True,
                "title": "tilepipe",
                "includeVars": False,
                "keepTime": True,
            }
        ],
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "templating": {"list": [datasource_variable(), *variables]},
        "panels": layout.panels,
    }


def quantiles(metric: str, by: str, selector: str, legend: str) -> list[dict]:
    return [
        target(
            f"histogram_quantile({q}, sum by ({by}, le) "
            f"(rate({metric}_bucket{{{selector}}}[{RATE}])))",
            f"{legend} p{int(q * 100)}",
        )
        for q in (0.5, 0.99)
    ]


def overview() -> dict:
    acq = 'acq=~"$acq"'
    stage = 'stage=~"$stage"'
    expected = f"max by (acq) (tilepipe_acquisition_tiles_expected{{{acq}}})"
    arrived = f"max by (acq) (tilepipe_acquisition_tiles_arrived{{{acq}}})"
    done = f"max by (acq, stage) (tilepipe_acquisition_tiles_done{{{acq}, {stage}}})"
    lay = Layout()
    lay.row("Acquisition")
    lay.add(
        "stat",
        "Tiles arrived / expected",
        [target(arrived, "{{acq}} arrived"), target(expected, "{{acq}} expected", "B")],
        w=6,
        description="From the watcher: tiles complete on disk, and the lattice size.",
    )
    lay.add(
        "bargauge",
        "Progress by stage",
        [
            target(f"{arrived} / {expected}", "{{acq}} arrived"),
            target(f"{done} / on (acq) group_left {expected}", "{{acq}} {{stage}}", "B"),
        ],
        unit="percentunit",
        w=10,
        defaults=PERCENT_0_1,
        description="Tiles a stage has published its output for, over the tiles expected.",
    )
    lay.add(
        "stat",
        "ETA",
        [
            target(
                f"({expected} - {arrived}) / clamp_min(max by (acq) "
                f"(deriv(tilepipe_acquisition_tiles_arrived{{{acq}}}[10m])), 1e-6)",
                "{{acq}} acquisition",
            ),
            target(
                f"({expected} - on (acq) group_right {done}) / on (acq, stage) clamp_min(max by "
                f"(acq, stage) (deriv(tilepipe_acquisition_tiles_done{{{acq}, {stage}}}[10m])), "
                "1e-6)",
                "{{acq}} {{stage}}",
                "B",
            ),
        ],
        unit="s",
        w=8,
        description="Tiles still to come (arrive, or pass a stage) over the rate of the last "
        "10 minutes. Very large while nothing moves.",
    )
    lay.row("Throughput and backlog")
    lay.add(
        "timeseries",
        "Tiles/s per stage",
        [
            target(
                f'sum by (stage) (rate(tilepipe_events_handled_total{{outcome="ok", {stage}}}'
                f"[{RATE}]))",
                "{{stage}}",
            ),
            target(
                f'sum(rate(tilepipe_watcher_files_total{{outcome="emitted"}}[{RATE}]))',
                "watcher (arrived)",
                "B",
            ),
        ],
        unit="ops",
        description="Input events handled successfully per second (tile stages: tiles/s).",
    )
    lay.add(
        "timeseries",
        "Backlog per stage",
        [
            target(
                f"sum by (stage) (tilepipe_consumer_pending_messages{{{stage}}})",
                "{{stage}} pending",
            ),
            target(
                f"sum by (stage) (tilepipe_consumer_ack_pending_messages{{{stage}}})",
                "{{stage}} in progress (ack pending)",
                "B",
            ),
            target(
                f"sum by (stage) (tilepipe_consumer_redelivered_messages{{{stage}}})",
                "{{stage}} redelivered",
                "C",
            ),
        ],
        description="The stage's durable consumer: not yet delivered, delivered and not "
        "acknowledged, redelivered (polled every 5 s by each stage).",
    )
    lay.row("Errors and latency")
    lay.add(
        "timeseries",
        "Errors per stage",
        [
            target(
                f"sum by (stage, outcome) (rate(tilepipe_events_handled_total"
                f'{{outcome=~"failed|retry|invalid", {stage}}}[{RATE}]))',
                "{{stage}} {{outcome}}",
            ),
            target(
                f"sum by (stage) (rate(tilepipe_redeliveries_total{{{stage}}}[{RATE}]))",
                "{{stage}} redeliveries",
                "B",
            ),
        ],
        unit="ops",
        w=8,
        description="failed: gave up (stage_failed published); retry: will be redelivered; "
        "invalid: refused on receipt.",
    )
    lay.add(
        "timeseries",
        "End-to-end latency p50 / p99 (file complete → stage output)",
        quantiles("tilepipe_end_to_end_latency_seconds", "stage", stage, "{{stage}}"),
        unit="s",
        w=8,
        description="From the tile file being complete on disk to the event each stage "
        "publishes for it (upload: artifact_uploaded; stitch: the last tile of the mosaic).",
    )
    lay.add(
        "timeseries",
        "Handling and watcher latency p50 / p99",
        [
            *quantiles("tilepipe_handle_duration_seconds", "stage", stage, "{{stage}}"),
            *quantiles(
                "tilepipe_watcher_latency_seconds", "host", 'job="tilepipe-watcher"', "watcher"
            ),
        ],
        unit="s",
        w=8,
        description="Time a stage spends on one event; watcher: file complete → tile_arrived.",
    )
    lay.row("Services")
    lay.add(
        "stat",
        "Services up",
        [target(f"up{{{JOBS}}}", "{{job}} {{host}}", instant=True)],
        w=16,
        h=5,
        defaults={
            "mappings": [
                {
                    "type": "value",
                    "options": {
                        "0": {"text": "down", "color": "red"},
                        "1": {"text": "up", "color": "green"},
                    },
                }
            ],
            "color": {"mode": "thresholds"},
            "thresholds": {
                "mode": "absolute",
                "steps": [{"color": "red", "value": None}, {"color": "green", "value": 1}],
            },
        },
    )
    lay.add(
        "stat",
        "Paused consumers",
        [target(f"max by (stage) (tilepipe_consumer_paused{{{stage}}})", "{{stage}}")],
        w=8,
        h=5,
        description="1 while `nats consumer pause TILEPIPE <stage>` holds a stage.",
    )
    variables = [
        query_variable(
            "acq", "Acquisition", "label_values(tilepipe_acquisition_tiles_expected, acq)"
        ),
        query_variable("stage", "Stage", "label_values(tilepipe_events_handled_total, stage)"),
    ]
    return dashboard(
        "tilepipe-overview",
        "tilepipe / pipeline overview",
        "Acquisition progress and ETA, tiles/s, backlog, errors and latency per stage.",
        variables,
        lay,
    )


def stage_detail() -> dict:
    sel = 'stage="$stage"'
    lay = Layout()
    lay.row("Rate")
    lay.add(
        "timeseries",
        "Events handled/s by outcome",
        [
            target(
                f"sum by (outcome) (rate(tilepipe_events_handled_total{{{sel}}}[{RATE}]))",
                "{{outcome}}",
            )
        ],
        unit="ops",
    )
    lay.add(
        "timeseries",
        "Events published/s by kind",
        [
            target(
                f"sum by (event) (rate(tilepipe_events_published_total{{{sel}}}[{RATE}]))",
                "{{event}}",
            ),
            target(
                f"sum(rate(tilepipe_events_duplicate_total{{{sel}}}[{RATE}]))",
                "dropped as duplicate",
                "B",
            ),
        ],
        unit="ops",
    )
    lay.row("Errors")
    lay.add(
        "timeseries",
        "Failure ratio",
        [
            target(
                f'sum(rate(tilepipe_events_handled_total{{{sel}, outcome="failed"}}[{RATE}])) / '
                f"clamp_min(sum(rate(tilepipe_events_handled_total"
                f'{{{sel}, outcome=~"ok|failed"}}[{RATE}])), 1e-9)',
                "failed / handled",
            )
        ],
        unit="percentunit",
        w=8,
        description="Inputs given up on (stage_failed) over inputs finished.",
    )
    lay.add(
        "timeseries",
        "Retries and redeliveries/s",
        [
            target(
                f'sum(rate(tilepipe_events_handled_total{{{sel}, outcome="retry"}}[{RATE}]))',
                "retry (nak with backoff)",
            ),
            target(f"sum(rate(tilepipe_redeliveries_total{{{sel}}}[{RATE}]))", "redelivered", "B"),
            target(
                f'sum(rate(tilepipe_events_handled_total{{{sel}, outcome="invalid"}}[{RATE}]))',
                "invalid (terminated)",
                "C",
            ),
        ],
        unit="ops",
        w=8,
    )
    lay.add(
        "timeseries",
        "Backlog",
        [
            target(f"sum(tilepipe_consumer_pending_messages{{{sel}}})", "pending"),
            target(f"sum(tilepipe_consumer_ack_pending_messages{{{sel}}})", "ack pending", "B"),
            target(f"sum(tilepipe_consumer_redelivered_messages{{{sel}}})", "redelivered", "C"),
        ],
        w=8,
    )
    lay.row("Duration")
    lay.add(
        "timeseries",
        "Handling duration p50 / p90 / p99 and mean",
        [
            *[
                target(
                    f"histogram_quantile({q}, sum by (le) "
                    f"(rate(tilepipe_handle_duration_seconds_bucket{{{sel}}}[{RATE}])))",
                    f"p{int(q * 100)}",
                )
                for q in (0.5, 0.9, 0.99)
            ],
            target(
                f"sum(rate(tilepipe_handle_duration_seconds_sum{{{sel}}}[{RATE}])) / "
                f"clamp_min(sum(rate(tilepipe_handle_duration_seconds_count{{{sel}}}[{RATE}])),"
                " 1e-9)",
                "mean",
            ),
        ],
        unit="s",
    )
    lay.add(
        "heatmap",
        "Handling duration distribution",
        [
            {
                **target(
                    f"sum by (le) (increase(tilepipe_handle_duration_seconds_bucket{{{sel}}}"
                    f"[{RATE}]))",
                    "{{le}}",
                ),
                "format": "heatmap",
            }
        ],
        unit="s",
    )
    lay.add(
        "timeseries",
        "End-to-end latency p50 / p99 (file complete → output)",
        quantiles("tilepipe_end_to_end_latency_seconds", "event", sel, "{{event}}"),
        unit="s",
    )
    lay.add(
        "timeseries",
        "In flight per worker",
        [target(f"sum by (job, host) (tilepipe_in_flight{{{sel}}})", "{{host}} {{job}}")],
        description="Events being handled now (at most concurrency per worker).",
    )
    lay.row("I/O")
    lay.add(
        "timeseries",
        "Bytes read and written/s",
        [
            target(f"sum(rate(tilepipe_read_bytes_total{{{sel}}}[{RATE}]))", "read"),
            target(f"sum(rate(tilepipe_written_bytes_total{{{sel}}}[{RATE}]))", "written", "B"),
        ],
        unit="Bps",
    )
    lay.add(
        "stat",
        "Tiles done per acquisition",
        [target(f"max by (acq) (tilepipe_acquisition_tiles_done{{{sel}}})", "{{acq}}")],
    )
    variables = [
        query_variable(
            "stage", "Stage", "label_values(tilepipe_events_handled_total, stage)", multi=False
        )
    ]
    return dashboard(
        "tilepipe-stage",
        "tilepipe / stage detail",
        "Rate, errors and duration (RED) of one stage, its backlog, latency and I/O.",
        variables,
        lay,
    )


def hosts() -> dict:
    sel = f'{JOBS}, host=~"$host"'
    lay = Layout()
    lay.row("Processes")
    lay.add(
        "stat",
        "Services up",
        [target(f"up{{{sel}}}", "{{host}} {{job}}", instant=True)],
        w=24,
        h=4,
    )
    lay.add(
        "timeseries",
        "CPU per service (cores)",
        [
            target(
                f"sum by (host, job) (rate(process_cpu_seconds_total{{{sel}}}[{RATE}]))",
                "{{host}} {{job}}",
            )
        ],
        w=8,
    )
    lay.add(
        "timeseries",
        "Resident memory per service",
        [
            target(
                f"sum by (host, job) (process_resident_memory_bytes{{{sel}}})", "{{host}} {{job}}"
            )
        ],
        unit="bytes",
        w=8,
    )
    lay.add(
        "timeseries",
        "Open file descriptors (fraction of limit)",
        [
            target(
                f"max by (host, job) (process_open_fds{{{sel}}} / process_max_fds{{{sel}}})",
                "{{host}} {{job}}",
            )
        ],
        unit="percentunit",
        w=8,
    )
    lay.row("Disks")
    lay.add(
        "bargauge",
        "Data roots: free space",
        [
            target(
                f"min by (host, root, path) (tilepipe_data_root_free_bytes{{{sel}}} / "
                f"tilepipe_data_root_size_bytes{{{sel}}})",
                "{{host}} {{root}} {{path}}",
            )
        ],
        unit="percentunit",
        defaults={
            **PERCENT_0_1,
            "thresholds": {
                "mode": "absolute",
                "steps": [
                    {"color": "red", "value": None},
                    {"color": "orange", "value": 0.05},
                    {"color": "green", "value": 0.1},
                ],
            },
        },
        w=8,
    )
    lay.add(
        "timeseries",
        "Data roots: bytes free",
        [
            target(
                f"min by (host, root) (tilepipe_data_root_free_bytes{{{sel}}})",
                "{{host}} {{root}}",
            )
        ],
        unit="bytes",
        w=8,
    )
    lay.add(
        "timeseries",
        "Disk traffic by stage",
        [
            target(
                f"sum by (host, stage) (rate(tilepipe_read_bytes_total{{{sel}}}[{RATE}]))",
                "{{host}} {{stage}} read",
            ),
            target(
                f"sum by (host, stage) (rate(tilepipe_written_bytes_total{{{sel}}}[{RATE}]))",
                "{{host}} {{stage}} written",
                "B",
            ),
        ],
        unit="Bps",
        w=8,
    )
    lay.row("GPUs")
    lay.add(
        "stat",
        "GPUs visible",
        [target(f"max by (host) (tilepipe_gpu_devices{{{sel}}})", "{{host}}")],
        w=6,
        description="0 where no GPU (or NVML/CuPy) is available: the GPU panels stay empty.",
    )
    lay.add(
        "timeseries",
        "Tiles processed/s by device",
        [
            target(
                f"sum by (host, device) (rate(tilepipe_process_tiles_total{{{sel}}}[{RATE}]))",
                "{{host}} {{device}}",
            )
        ],
        unit="ops",
        w=18,
    )
    lay.add(
        "timeseries",
        "GPU utilization",
        [
            target(
                f"max by (host, gpu) (tilepipe_gpu_utilization_ratio{{{sel}}}) * on (host, gpu) "
                f"group_left (name) max by (host, gpu, name) (tilepipe_gpu_info{{{sel}}})",
                "{{host}} gpu{{gpu}} {{name}}",
            )
        ],
        unit="percentunit",
        defaults=PERCENT_0_1,
        w=8,
    )
    lay.add(
        "timeseries",
        "GPU memory used / total",
        [
            target(
                f"max by (host, gpu) (tilepipe_gpu_memory_used_bytes{{{sel}}})",
                "{{host}} gpu{{gpu}} used",
            ),
            target(
                f"max by (host, gpu) (tilepipe_gpu_memory_total_bytes{{{sel}}})",
                "{{host}} gpu{{gpu}} total",
                "B",
            ),
        ],
        unit="bytes",
        w=8,
    )
    lay.add(
        "timeseries",
        "GPU memory per service",
        [
            target(
                f"sum by (host, job, gpu) (tilepipe_gpu_process_memory_bytes{{{sel}}})",
                "{{host}} {{job}} gpu{{gpu}}",
            )
        ],
        unit="bytes",
        w=8,
    )
    variables = [query_variable("host", "Host", f"label_values(up{{{JOBS}}}, host)")]
    return dashboard(
        "tilepipe-hosts",
        "tilepipe / hosts and GPUs",
        "Process resources of every service, free space of the data roots, GPUs.",
        variables,
        lay,
    )


def fix_ref_ids(board: dict) -> dict:
    for panel in board["panels"]:
        for i, t in enumerate(panel.get("targets", [])):
            t["refId"] = "ABCDEFGH"[i]
    return board


def build() -> dict[str, dict]:
    return {
        "tilepipe-overview.json": fix_ref_ids(overview()),
        "tilepipe-stage.json": fix_ref_ids(stage_detail()),
        "tilepipe-hosts.json": fix_ref_ids(hosts()),
    }


def render(board: dict) -> str:
    return json.dumps(board, indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    OUT.mkdir(exist_ok=True)
    for name, board in build().items():
        (OUT / name).write_text(render(board))
        print(OUT / name)
