"""Running one service process: `tilepipe run NAME` (a stage, or the watcher)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
import time

from services.core.config import Config
from services.core.logs import configure_logging, get_logger
from services.core.metrics import serve_metrics
from services.core.signals import stop_on_signals
from services.io.atomic import sweep_temporaries
from services.monitoring.collectors import register_resource_collectors
from services.runtime.runner import StageRunner
from services.stages import metrics_port_for, stage_for, stage_settings
from services.watcher.service import run_watcher


async def run_until_signalled(main, *args) -> None:
    """Run `main(*args, stop)` until SIGTERM or SIGINT sets `stop`."""
    await main(*args, stop_on_signals())


async def sweep_periodically(config: Config, stop: asyncio.Event, log) -> None:
    """Remove abandoned temporary outputs under the work and output roots: at start-up, then
    every `sweep.interval_s` (services.io.atomic.sweep_temporaries)."""

    roots = {"work": config.roots.work, "output": config.roots.output}
    while not stop.is_set():
        try:
            await asyncio.to_thread(sweep_temporaries, roots, config.sweep.max_age_s, log)
        except Exception as exc:  # a sweep must never stop the service
            log.warning("sweep_failed", error=f"{type(exc).__name__}: {exc}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=config.sweep.interval_s)


async def _run_stage(name: str, config: Config, worker: str, stop: asyncio.Event) -> None:
    stage = stage_for(config, name)(config, stage_settings(config, name), name=name)
    sweeper = asyncio.create_task(sweep_periodically(config, stop, get_logger(stage=name)))
    try:
        await StageRunner(stage, config, worker=worker).run(stop)
    finally:
        sweeper.cancel()
        await asyncio.gather(sweeper, return_exceptions=True)


def exit_past_stuck_threads(log, grace_s: float = 2.0) -> None:
    """After the service stopped: if a handler thread is still blocked (a read that never
    returns: a hung mount, a device), leave without waiting for it. Python would join it at
    exit and the process would outlive SIGTERM; its delivery was never acknowledged and
    comes back to the next process."""
    others = [t for t in threading.enumerate() if t is not threading.main_thread()]
    deadline = time.monotonic() + grace_s  # idle pool threads are on their way out
    for thread in (t for t in others if not t.daemon):
        thread.join(max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in others if not t.daemon and t.is_alive()]
    if not stuck:
        return
    log.warning("stuck_threads_abandoned", threads=stuck)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


def serve(name: str, config: Config, worker: str = "", metrics_port: int | None = None) -> None:
    """Blocking entry point of a service process."""
    configure_logging(config.log.level, config.log.json_format)
    port = metrics_port if metrics_port is not None else metrics_port_for(config, name)

    register_resource_collectors(config)  # data-root free space, GPU (process_* is default)
    bound = serve_metrics(config.metrics.host, port)
    get_logger(service=name).info("metrics_listening", host=config.metrics.host, port=bound)
    if name == "watcher":
        asyncio.run(run_until_signalled(run_watcher, config))
        return
    asyncio.run(run_until_signalled(_run_stage, name, config, worker or name))
    exit_past_stuck_threads(get_logger(service=name))
