"""`tilepipe up`: start NATS and every service on this machine; Ctrl-C stops all cleanly."""

from __future__ import annotations

import argparse
import asyncio
import shlex
import signal
import sys

from services.cli import _config, provision
from services.config import Config, Roots
from services.stages import configured_stages
from services.supervisor import Supervisor, prepare, wait_forever, write_config


def all_services(config: Config) -> list[str]:
    from services.serve import has_watcher

    return (["watcher"] if has_watcher() else []) + configured_stages(config)


def up(args: argparse.Namespace) -> int:
    if getattr(args, "auth", False) and args.nats_url:
        print("--auth configures the embedded server; not with --nats-url", file=sys.stderr)
        return 2
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    config = _config(args)
    if args.config is None:
        config = config.model_copy(
            update={"roots": Roots(raw=work / "raw", work=work / "work", output=work / "output")}
        )
    for root in (config.roots.raw, config.roots.work, config.roots.output):
        root.mkdir(parents=True, exist_ok=True)
    services = args.services.split(",") if args.services else all_services(config)
    auth = None
    if getattr(args, "auth", False):
        from services.natsauth import local_auth

        auth = local_auth(config, services, work / "auth")
    blocks = [auth.server_block] if auth else []
    server, config, ports = prepare(config, work, services, args.nats_url, blocks)
    # the written config holds no credentials: each child gets its own user in its environment
    operator = config.model_copy(update={"nats": auth.settings(config.nats)}) if auth else config
    supervisor = None
    try:
        for line in asyncio.run(provision(operator)):
            print(f"  {line}")
        config_path = write_config(config, work / "tilepipe.toml")
        child_env = {name: auth.env(name) for name in services} if auth else None
        supervisor = Supervisor(config_path, services, work / "logs", ports, child_env)
        supervisor.start()
        print(f"NATS: {config.nats.url}" + (" (embedded)" if server else ""))
        for name in services:
            print(
                f"  {name:<10} metrics http://{config.metrics.host}:{ports[name]}/metrics"
                f"  log {work / 'logs' / (name + '.log')}"
            )
        if auth:
            print("NATS authorization on: one user per service. Operator commands need admin:")
            for key, value in auth.env("admin").items():
                print(f"  export {key}={shlex.quote(value)}")
        print("Ctrl-C stops everything.")
        if args.demo:
            _demo(operator, supervisor, services, args.rate, work)
        else:
            asyncio.run(_wait(supervisor))
    finally:
        if supervisor is not None:
            print("stopping services (draining in-flight work)...")
            supervisor.stop()
        if server is not None:
            server.stop()
    return 0


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def _wait(supervisor: Supervisor) -> None:
    await wait_forever(_stop_on_signals(), supervisor)


def _demo(config: Config, supervisor: Supervisor, services: list[str], rate: float, work) -> None:
    from services.demo import run_demo

    async def main() -> dict:
        return await run_demo(config, supervisor, services, rate, _stop_on_signals())

    figures = asyncio.run(main())
    print(
        f"\ndemo {figures['acq']}: {figures['tiles_done']} tiles reached "
        f"{figures['last_stage']} in {figures['wall_s']:.1f} s"
    )
    if "latency_p50_s" in figures:
        print(
            f"  file complete -> {figures['last_stage']}: p50 {figures['latency_p50_s']:.2f} s,"
            f" max {figures['latency_max_s']:.2f} s"
        )
    print(f"  raw tiles:      {config.roots.raw / figures['acq']}")
    print(f"  tile products:  {config.roots.work / figures['acq']}")
    for mosaic in figures.get("mosaics", []):
        print(f"  mosaic:         {mosaic}")
    if figures.get("volume"):
        print(f"  volume:         {figures['volume']}")
    print(f"  event log:      stream {config.nats.stream} (store {work / 'nats'})")
    print(f"  service logs:   {work / 'logs'}")
