"""Checks of Grafana dashboard JSON: panels, queries, variables, datasources."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

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
