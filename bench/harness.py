"""What several benchmarks share: the machine line of their report, their loop over sizes, and
the pipeline they drive as processes (embedded nats-server and supervised `tilepipe run`
children, as `tilepipe up` starts them)."""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import os
import platform
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.core.config import Config, Roots
from services.local.init import provision
from services.local.natsserver import EmbeddedServer
from services.local.supervisor import Supervisor, prepare, write_config
from services.runtime.bus import connect


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (else what `platform` knows)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def machine_header(**settings: object) -> str:
    """``# date host: CPUs, Python, numpy, <settings>, load average`` (a report's first line)."""
    chosen = "".join(f"{name} {value}, " for name, value in settings.items())
    return (
        f"# {_dt.date.today()} {platform.node()}: {os.cpu_count()} CPUs ({cpu_model()}), "
        f"Python {platform.python_version()}, numpy {np.__version__}, {chosen}"
        f"load average {os.getloadavg()[0]:.1f}"
    )


def run_sizes(
    args: argparse.Namespace, bench_size: Callable[[int, argparse.Namespace, Path], dict]
) -> list[dict]:
    """``bench_size(tiles, args, root)`` for each of ``args.tiles``, each in a fresh directory
    under ``args.tmp`` (default: the system's temp), printing each one's total seconds."""
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for tiles in args.tiles:
            root = Path(tmp) / str(tiles)
            root.mkdir()
            rows.append(bench_size(tiles, args, root))
            print(f"# {rows[-1]['tiles']}: {rows[-1]['total']:.1f} s", flush=True)
    return rows


def work_roots(work: Path) -> Roots:
    """raw, work and output roots under ``work``, created."""
    roots = Roots(raw=work / "raw", work=work / "work", output=work / "output")
    for root in (roots.raw, roots.work, roots.output):
        root.mkdir(parents=True, exist_ok=True)
    return roots


@dataclass
class Pipeline:
    """The running processes of :func:`supervised` and a NATS connection to them."""

    config: Config
    ports: dict[str, int]
    server: EmbeddedServer | None
    supervisor: Supervisor
    nc: Any

    @property
    def js(self) -> Any:
        return self.nc.jetstream()


@contextlib.asynccontextmanager
async def supervised(
    config: Config, work: Path, services: list[str], name: str
) -> AsyncIterator[Pipeline]:
    """Start ``services`` under a supervisor (and the embedded server when the config asks
    for one), provisioned, with logs under ``work/logs``; every process is stopped on exit."""
    server, config, ports = prepare(config, work, services, None)
    supervisor = None
    nc = None
    try:
        await provision(config)
        supervisor = Supervisor(
            write_config(config, work / "tilepipe.toml"), services, work / "logs", ports
        )
        supervisor.start()
        nc = await connect(config.nats, name=name)
        yield Pipeline(config, ports, server, supervisor, nc)
    finally:
        if nc is not None:
            await nc.close()
        if supervisor is not None:
            supervisor.stop()
        if server is not None:
            server.stop()
