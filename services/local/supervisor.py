"""`tilepipe up`: one embedded nats-server (or an existing one) and every service, one machine."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from services.core.config import Config, dump_toml
from services.core.errors import ConfigError
from services.io.atomic import write_atomically
from services.local.natsserver import EmbeddedServer, port_open
from services.stages import metrics_port_for

RESTART_LIMIT = 5


@dataclass
class Child:
    """One service process under supervision."""

    name: str
    cmd: list[str]
    log_path: Path
    proc: subprocess.Popen | None = None
    restarts: list[float] = field(default_factory=list)

    def start(self, env: dict[str, str]) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )


class Supervisor:
    """Starts services as child processes, restarts a crashed one, stops all on request."""

    def __init__(
        self,
        config_path: Path,
        services: list[str],
        log_dir: Path,
        metrics_ports: dict[str, int],
        child_env: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        """`child_env`: extra environment per service (e.g. its own NATS user)."""
        log_dir.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.child_env = {name: dict(env) for name, env in (child_env or {}).items()}
        self.children = [
            Child(
                name,
                [
                    sys.executable,
                    "-m",
                    "services.ops.cli",
                    "run",
                    name,
                    "--config",
                    str(config_path),
                    "--metrics-port",
                    str(metrics_ports[name]),
                ],
                log_dir / f"{name}.log",
            )
            for name in services
        ]

    def env_of(self, child: Child) -> dict[str, str]:
        return {**self.env, **self.child_env.get(child.name, {})}

    def start(self) -> None:
        for child in self.children:
            child.start(self.env_of(child))

    def check(self, notify=print) -> None:
        """Restart children that died (at most RESTART_LIMIT times a minute each)."""
        now = time.monotonic()
        for child in self.children:
            if child.proc is None or child.proc.poll() is None:
                continue
            child.restarts = [t for t in child.restarts if now - t < 60]
            code = child.proc.returncode
            if len(child.restarts) >= RESTART_LIMIT:
                notify(f"{child.name} keeps failing (exit {code}); see {child.log_path}")
                child.proc = None
                continue
            notify(f"{child.name} exited with {code}; restarting")
            child.restarts.append(now)
            child.start(self.env_of(child))

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM every child (they drain), then SIGKILL what is left after `timeout`."""
        live = [c.proc for c in self.children if c.proc is not None and c.proc.poll() is None]
        for proc in live:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in live:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def pick_port(preferred: int, taken: set[int]) -> int:
    """`preferred` if free on loopback, else the next free one."""
    port = preferred
    while port in taken or port_open("127.0.0.1", port):
        port += 1
    taken.add(port)
    return port


def embedded_address(url: str) -> tuple[str, int]:
    """(host, port) an embedded server listens on for a configured `[nats] url`."""
    if "," in url:
        raise ConfigError(
            f"[nats] url {url!r} names several servers: tilepipe up embeds one; "
            "use --nats-url to run the services against a cluster"
        )
    parsed = urlsplit(url if "://" in url else f"nats://{url}")
    if parsed.scheme not in ("nats", "tls") or not parsed.hostname:
        raise ConfigError(f"[nats] url {url!r}: expected nats://HOST:PORT")
    return parsed.hostname, parsed.port or 4222


def prepare(
    config: Config,
    work: Path,
    services: list[str],
    nats_url: str | None,
    server_blocks: Sequence[str] = (),
    exact: bool = False,
) -> tuple[EmbeddedServer | None, Config, dict[str, int]]:
    """Start the embedded server (with `server_blocks`, e.g. authorization) unless `nats_url`
    is given; fix ports; return the config.

    `exact` (a config file was given): the server listens on the config's `[nats] url` and
    each service on its configured metrics port (`metrics_port`, else `base_port` + its
    position), so operator commands and Prometheus reading the same file find them; a port in
    use is a ConfigError, never a silent move. Otherwise the first free ports from 4222 and
    `base_port` are taken.
    """
    server = None
    if nats_url is None:
        if exact:
            host, port = embedded_address(config.nats.url)
            if port_open(host, port):
                raise ConfigError(
                    f"[nats] url {config.nats.url}: {host}:{port} is in use (another tilepipe "
                    "up or NATS server?); stop it or configure another url"
                )
        else:
            host, port = "127.0.0.1", pick_port(4222, set())
        server = EmbeddedServer(work / "nats", port=port, host=host, extra_config=server_blocks)
        server.start()
        nats_url = server.url
    config = config.model_copy(update={"nats": config.nats.model_copy(update={"url": nats_url})})
    taken: set[int] = set()
    ports = {}
    for offset, name in enumerate(services):
        if exact:
            port = metrics_port_for(config, name)
            if port in taken or port_open(config.metrics.host, port):
                if server is not None:
                    server.stop()
                raise ConfigError(
                    f"metrics port {port} of {name} is in use; configure [metrics] base_port "
                    f"or a metrics_port for {name}"
                )
            taken.add(port)
            ports[name] = port
        else:
            ports[name] = pick_port(config.metrics.base_port + offset, taken)
    return server, config, ports


def write_config(config: Config, path: Path) -> Path:
    """Write the effective config the children read (atomically)."""
    return write_atomically(path, dump_toml(config))


async def wait_forever(stop: asyncio.Event, supervisor: Supervisor, notify=print) -> None:
    while not stop.is_set():
        supervisor.check(notify)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=1.0)
