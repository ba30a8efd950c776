"""Resource gauges on every service's /metrics: data-root free space and GPUs."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

from prometheus_client.core import REGISTRY, GaugeMetricFamily
from prometheus_client.registry import Collector

from services.core.metrics import (
    DATA_ROOT_FREE,
    DATA_ROOT_SIZE,
)


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
