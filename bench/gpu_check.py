"""One command for a machine with a GPU: GPU parity tests and real-size figures, into a file.

On the GPU machine (no network there; see --prepare):

    python3 bench/gpu_check.py --out $OUT/gpu_check.txt

1. finds the project's dependencies: already importable (a tilepipe venv), or installed into a
   fresh venv (``--venv``, system site packages kept, so the machine's own CuPy and NumPy are
   used) from the wheels ``--prepare`` downloaded into ``.whl/``;
2. checks for CuPy and a CUDA device; without them it says so and stops with exit code 0
   (this is how it runs on CPU-only CI: every step up to the device);
3. runs the GPU parity tests (``pytest -m gpu tests/test_kernels_gpu.py``: NumPy vs CuPy on
   the real device, plus the fake-CuPy transfer checks);
4. runs ``bench/kernels_bench.py`` (its GPU row) and ``bench/realsize_bench.py --device gpu``
   (real-size tiles through the services on the GPU, with the CPU kernels beside them);
5. writes every table and the pass/fail summary to ``--out``.

On a machine with network, before lending one: ``python bench/gpu_check.py --prepare`` downloads
the wheels of the project's dependencies for the GPU machine's Python (3.12, manylinux x86_64)
into ``.whl/`` (ignored by git; carry it with the device tool's ``carry``).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / ".whl"
DEVICE_PYTHON = "3.12"
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34)] + [
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]
NEEDED = ("nats", "pydantic", "zarr", "structlog", "prometheus_client", "numpy", "pytest")


def say(out: list[str], line: str) -> None:
    print(line, flush=True)
    out.append(line)


def prepare() -> int:
    """Download the dependency wheels for the GPU machine into .whl/ (network needed)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = [*project["dependencies"], "pytest>=8", "pytest-asyncio>=0.23", "pytest-timeout>=2.2"]
    WHEELS.mkdir(exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--only-binary=:all:",
        "-d",
        str(WHEELS),
        "--python-version",
        DEVICE_PYTHON,
        "--implementation",
        "cp",
    ]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    result = subprocess.run([*cmd, *deps])
    if result.returncode == 0:
        print(f"wheels in {WHEELS}: carry it to the GPU machine (device tool: carry ['.whl'])")
    return result.returncode


def environment(args: argparse.Namespace, out: list[str]) -> str | None:
    """A Python that can import the project (this one, or a venv built from .whl/)."""
    if all(importlib.util.find_spec(m) for m in NEEDED):
        say(out, f"python: {sys.executable} (dependencies already importable)")
        return sys.executable
    if not WHEELS.is_dir():
        say(
            out,
            "the project's dependencies are missing and there is no .whl/ to install them "
            "from: run `python bench/gpu_check.py --prepare` where there is network",
        )
        return None
    venv = Path(args.venv)
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run(
            [sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True
        )
    install = [
        str(python),
        "-m",
        "pip",
        "install",
        "-q",
        "--no-index",
        "--find-links",
        str(WHEELS),
        "-e",
        str(REPO),
        "pytest",
        "pytest-asyncio",
        "pytest-timeout",
    ]
    if subprocess.run(install).returncode != 0:
        say(out, "installing the project from .whl/ failed (see above)")
        return None
    say(out, f"python: {python} (venv from .whl/, system site packages for CuPy)")
    return str(python)


def run(python: str, argv: list[str], out: list[str], timeout: float) -> bool:
    say(out, "$ " + " ".join(argv))
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            [python, *argv],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
    except subprocess.TimeoutExpired:
        say(out, f"  timed out after {timeout:.0f} s")
        return False
    for line in (proc.stdout + proc.stderr).splitlines()[-40:]:
        say(out, "  " + line)
    say(out, f"  exit {proc.returncode} in {time.perf_counter() - started:.0f} s")
    return proc.returncode == 0


def check(args: argparse.Namespace) -> int:
    out: list[str] = []
    say(out, f"tilepipe GPU check, {time.strftime('%Y-%m-%d %H:%M:%S')}, {os.uname().nodename}")
    python = environment(args, out)
    if python is None:
        return finish(out, args, 1)
    probe = subprocess.run(
        [
            python,
            "-c",
            "from kernels.backend import gpu_available, get_xp, device_name;"
            "ok = gpu_available(); print(device_name(get_xp('gpu')) if ok else 'none')",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    device = probe.stdout.strip().splitlines()[-1] if probe.stdout.strip() else "none"
    if probe.returncode != 0 or device == "none":
        say(
            out,
            "no CUDA device (or no CuPy): stopping here, before the GPU steps. "
            "Run this on a machine with a GPU.",
        )
        return finish(out, args, 0)
    say(out, f"device: {device}")
    results = {
        "GPU parity tests": run(
            python, ["-m", "pytest", "-q", "-m", "gpu", "tests/test_kernels_gpu.py"], out, 300
        ),
        "kernels bench": run(
            python, ["bench/kernels_bench.py", "--bscans", "64", "--skip-baseline"], out, 300
        ),
        "real-size bench": run(
            python, ["bench/realsize_bench.py", "--tiles", "2", "--device", "gpu"], out, 420
        ),
    }
    say(out, "summary: " + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in results.items()))
    return finish(out, args, 0 if all(results.values()) else 1)


def finish(out: list[str], args: argparse.Namespace, code: int) -> int:
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(out) + "\n")
    return code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default=os.environ.get("OUT") and f"{os.environ['OUT']}/gpu_check.txt"
    )
    parser.add_argument("--venv", default="/tmp/tilepipe-gpu-venv")
    parser.add_argument("--prepare", action="store_true", help="download the wheels (network)")
    args = parser.parse_args()
    return prepare() if args.prepare else check(args)


if __name__ == "__main__":
    sys.exit(main())
