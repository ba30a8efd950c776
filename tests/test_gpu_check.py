"""bench/gpu_check.py on a machine without a GPU: every step up to the device, then a clear stop."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_stops_clearly_without_a_device(tmp_path):
    out = tmp_path / "gpu_check.txt"
    run = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    report = out.read_text()
    assert "dependencies already importable" in report
    assert "no CUDA device (or no CuPy): stopping here, before the GPU steps" in report
