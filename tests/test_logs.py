"""The JSON log lines services write (one processor renders them)."""

from __future__ import annotations

import json

import pytest

from services.core.logs import configure_logging, get_logger

pytestmark = pytest.mark.unit


def test_json_lines_carry_level_timestamp_context_and_traceback(tmp_path):
    path = tmp_path / "service.log"
    try:
        with open(path, "wb") as out:
            configure_logging("info", json_format=True, stream=out)
            log = get_logger(stage="convert").bind(acq="a1", kind="tile_arrived", slice=2)
            log.debug("not_written")
            log.info("event_handled", seconds=0.5, where=path)  # a Path: rendered by repr
            log.warn("slow")
            try:
                raise ValueError("bad tile")
            except ValueError:
                log.exception("handler_failed_final")
    finally:
        configure_logging()  # back to the default (stderr) for later tests
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["event"] for r in lines] == ["event_handled", "slow", "handler_failed_final"]
    assert [r["level"] for r in lines] == ["info", "warning", "error"]
    first = lines[0]
    assert {k: first[k] for k in ("stage", "acq", "kind", "slice", "seconds")} == {
        "stage": "convert",
        "acq": "a1",
        "kind": "tile_arrived",
        "slice": 2,
        "seconds": 0.5,
    }
    assert first["where"] == repr(path)
    assert first["timestamp"].endswith("Z") and len(first["timestamp"]) == 27
    assert "ValueError: bad tile" in lines[2]["exception"] and "exc_info" not in lines[2]
