"""Running one service process: `tilepipe run NAME` (a stage, or the watcher)."""

from __future__ import annotations

import asyncio
import signal

from services.config import Config
from services.logs import configure_logging, get_logger
from services.metrics import serve_metrics
from services.runtime import StageRunner
from services.stages import metrics_port_for, stage_for


def has_watcher() -> bool:
    """Whether the watcher service is part of this installation."""
    import importlib.util

    return importlib.util.find_spec("services.watcher") is not None


async def run_until_signalled(main, *args) -> None:
    """Run `main(*args, stop)` until SIGTERM or SIGINT sets `stop`."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await main(*args, stop)


async def _run_stage(name: str, config: Config, worker: str, stop: asyncio.Event) -> None:
    stage = stage_for(config, name)(config, config.stage(name), name=name)
    await StageRunner(stage, config, worker=worker).run(stop)


def serve(name: str, config: Config, worker: str = "", metrics_port: int | None = None) -> None:
    """Blocking entry point of a service process."""
    configure_logging(config.log.level, config.log.json_format)
    port = metrics_port if metrics_port is not None else metrics_port_for(config, name)
    from services.monitoring import register_resource_collectors

    register_resource_collectors(config)  # data-root free space, GPU (process_* is default)
    bound = serve_metrics(config.metrics.host, port)
    get_logger(service=name).info("metrics_listening", host=config.metrics.host, port=bound)
    if name == "watcher":
        from services.watcher import run_watcher

        asyncio.run(run_until_signalled(run_watcher, config))
        return
    asyncio.run(run_until_signalled(_run_stage, name, config, worker or name))
