"""The runtime benchmarks stay runnable (tiny sizes; the figures are docs/performance.md's)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(script: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def test_runtime_bench_every_variant_delivers_every_event():
    """A real server; a variant that loses or fails an event makes the script exit 1."""
    out = run(
        "runtime_bench.py",
        "--tiles",
        "30",
        "--stages",
        "3",
        "--repeat",
        "1",
        "--variants",
        "bare,bare-lean,bare-checked,runtime,runtime-async",
    )
    for label in (
        "| bare nats-py |",
        "| bare nats-py on the runtime's transport |",
        "| bare nats-py + validation, log line, metrics |",
        "| tilepipe runtime (inline handlers) |",
        "| tilepipe runtime (async handlers) |",
    ):
        assert label in out
    failures = re.findall(r"failures (\d+)", out)
    assert len(failures) == 5 and set(failures) == {"0"}


def test_runtime_hotpath_table():
    out = run("runtime_hotpath.py", "--deliveries", "50", "--rounds", "1")
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    from bench.runtime_hotpath import VARIANTS

    assert [r.split("|")[1].strip() for r in rows[1:]] == list(VARIANTS)


def test_runtime_bench_paced_inputs():
    """`--rate`: inputs published during the run; every one still reaches the end."""
    out = run(
        "runtime_bench.py",
        "--tiles",
        "40",
        "--stages",
        "2",
        "--repeat",
        "1",
        "--rate",
        "200",
        "--variants",
        "bare-lean,runtime",
    )
    assert "--rate 200: the inputs were published at that rate" in out
    failures = re.findall(r"failures (\d+)", out)
    assert len(failures) == 2 and set(failures) == {"0"}
