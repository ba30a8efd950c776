"""Services as real processes: `tilepipe up` in its own session (`running_up`), and for fault
tests `tilepipe run NAME` children of the production `Supervisor` (the same restart logic as
`tilepipe up`), with kill -9, logs and /metrics."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from services.core.config import Config, StageSettings
from services.local.natsserver import free_port, free_port_block
from services.local.simulate import small_manifest
from services.local.supervisor import Child, Supervisor, write_config

REPO = Path(__file__).resolve().parents[1]
TILE_STAGES = ("convert", "process", "stitch")
ALL_STAGES = ("convert", "process", "stitch", "register")


@contextlib.contextmanager
def running_up(*args: str, env: dict[str, str]) -> Iterator[subprocess.Popen]:
    """`tilepipe up ARGS` from the repository, output merged into `stdout` (text), in its own
    session: whatever still runs when the block ends (a failed test), `up` and every child
    it started, is killed."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.ops.cli", "up", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


class OutputReader:
    """A process's output (text), read line by line in a thread; `text` is what came so far."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self.reader.start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.lines)


def interrupt(proc: subprocess.Popen, timeout: float = 60) -> int | None:
    """Ctrl-C for `proc`; its exit status, or None when it is still running after `timeout`
    seconds (`running_up` kills it when the block ends)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
    return proc.returncode


def free_ports() -> str:
    """Config lines pinning `up`'s server and metrics to free loopback ports (`up --config`
    listens exactly where its config says)."""
    nats, metrics = free_port_block(1), free_port_block(16)
    return f'[nats]\nurl = "nats://127.0.0.1:{nats}"\n[metrics]\nbase_port = {metrics}\n'


def fault_config(
    config: Config,
    stages: tuple[str, ...] = ALL_STAGES,
    per_stage: dict[str, dict] | None = None,
    **settings,
) -> Config:
    """`config` with short ack waits and retries so that faults resolve in seconds; every
    stage runs one delivery at a time unless `per_stage` says otherwise."""
    base = {"ack_wait_s": 3.0, "max_deliver": 5, "backoff_s": [0.5, 1.0, 2.0], **settings}
    per_stage = per_stage or {}
    return config.model_copy(
        update={
            "stages": {
                name: StageSettings(**{**base, **per_stage.get(name, {})}) for name in stages
            },
            "watcher": config.watcher.model_copy(update={"settle_s": 0.2, "rescan_s": 5.0}),
        }
    )


def tiny_acquisition(acq: str, slices: int = 2, rows: int = 2, cols: int = 2, **kw):
    """A small simulated acquisition (48x48 A-lines x 512 samples: ~0.4 s per tile to process)."""
    sizes = {"alines": 48, "bscans": 48, "samples": 512, "settle_s": 0.2, **kw}
    return small_manifest(acq, slices=slices, rows=rows, cols=cols, **sizes)


class Services:
    """`names` run as `python -m services.ops.cli run NAME --config F --metrics-port P`."""

    def __init__(self, config: Config, work: Path, names: list[str] | tuple[str, ...]) -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.config_path = write_config(config, work / "tilepipe.toml")
        self.ports = {name: free_port() for name in names}
        self.log_dir = work / "logs"
        self.supervisor = Supervisor(self.config_path, list(names), self.log_dir, self.ports)
        self.messages: list[str] = []

    def __enter__(self) -> Services:
        self.supervisor.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def child(self, name: str) -> Child:
        return next(c for c in self.supervisor.children if c.name == name)

    def pid(self, name: str) -> int:
        proc = self.child(name).proc
        assert proc is not None
        return proc.pid

    def alive(self, name: str) -> bool:
        proc = self.child(name).proc
        return proc is not None and proc.poll() is None

    def kill9(self, name: str) -> int:
        """SIGKILL the service (no drain, no clean-up), as a crash or the OOM killer would."""
        proc = self.child(name).proc
        assert proc is not None and proc.poll() is None, f"{name} is not running"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        return proc.pid

    def restart_crashed(self) -> None:
        """What `tilepipe up` does every second: restart children that died."""
        self.supervisor.check(self.messages.append)

    def stop(self, timeout: float = 30.0) -> None:
        self.supervisor.stop(timeout)

    def log(self, name: str) -> list[dict]:
        """The service's JSON log records (every run appends to the same file)."""
        path = self.log_dir / f"{name}.log"
        records = []
        for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
            if line.startswith("{"):
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue
        return records

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def metrics(self, name: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """The service's /metrics samples: (name, sorted labels) -> value; {} if unreachable."""
        url = f"http://127.0.0.1:{self.ports[name]}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                text = response.read().decode()
        except OSError:
            return {}
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def metric(self, name: str, metric: str, **labels: str) -> float:
        """One sample of the service's /metrics (0 when absent or unreachable)."""
        return self.metrics(name).get((metric, tuple(sorted(labels.items()))), 0.0)
