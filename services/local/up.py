"""`tilepipe up`: start NATS and every service on this machine; Ctrl-C stops all cleanly."""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys

from services.core.config import Config, Roots
from services.core.signals import stop_on_signals
from services.local.demo import demo_config, run_demo, summary
from services.local.init import config_from_args, provision
from services.local.natsauth import local_auth
from services.local.supervisor import Supervisor, prepare, wait_forever, write_config
from services.stages import configured_services


def up(args: argparse.Namespace) -> int:
    if getattr(args, "auth", False) and args.nats_url:
        print("--auth configures the embedded server; not with --nats-url", file=sys.stderr)
        return 2
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    config = config_from_args(args)
    if args.config is None:
        config = config.model_copy(
            update={"roots": Roots(raw=work / "raw", work=work / "work", output=work / "output")}
        )
    for root in (config.roots.raw, config.roots.work, config.roots.output):
        root.mkdir(parents=True, exist_ok=True)
    if args.demo:
        config = demo_config(config, work)  # uploads to a local object store
    services = args.services.split(",") if args.services else configured_services(config)
    auth = None
    if getattr(args, "auth", False):
        auth = local_auth(config, services, work / "auth")
    blocks = [auth.server_block] if auth else []
    server, config, ports = prepare(
        config, work, services, args.nats_url, blocks, exact=args.config is not None
    )
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
    except KeyboardInterrupt:  # Ctrl-C before the services were all up: the same clean stop
        print("interrupted")
    finally:
        if supervisor is not None:
            print("stopping services (draining in-flight work)...")
            supervisor.stop()
        if server is not None:
            server.stop()
    return 0


async def _wait(supervisor: Supervisor) -> None:
    await wait_forever(stop_on_signals(), supervisor)


def _demo(config: Config, supervisor: Supervisor, services: list[str], rate: float, work) -> None:
    async def main() -> dict:
        return await run_demo(config, supervisor, services, rate, stop_on_signals())

    for line in summary(asyncio.run(main()), config, work):
        print(line)
