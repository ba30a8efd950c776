"""Fixtures: a real nats-server on a free loopback port, configs under tmp_path."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest

from messages import decode_event
from services.core.config import Config, NatsSettings, Roots, StageSettings
from services.local.natsserver import EmbeddedServer
from services.runtime.runner import StageRunner
from services.runtime.stage import Stage
from services.runtime.transport import Transport
from tests.s3server import MotoServer


@pytest.fixture
def nats_server(tmp_path: Path):
    """A JetStream nats-server from the installed wheel, store under tmp_path."""
    server = EmbeddedServer(tmp_path / "nats").start()
    yield server
    server.stop()


@pytest.fixture
def config(tmp_path: Path, nats_server: EmbeddedServer) -> Config:
    roots = Roots(raw=tmp_path / "raw", work=tmp_path / "work", output=tmp_path / "output")
    for root in (roots.raw, roots.work, roots.output):
        root.mkdir(parents=True, exist_ok=True)
    return Config(nats=NatsSettings(url=nats_server.url), roots=roots)


@pytest.fixture
async def js(config: Config) -> AsyncIterator:
    """A JetStream context on a provisioned server (stream and KV created)."""
    from services.runtime.provision import ensure_kv, ensure_stream

    nc = await nats.connect(config.nats.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    ctx = nc.jetstream()
    await ensure_stream(ctx, config.nats)
    await ensure_kv(ctx)
    yield ctx
    with contextlib.suppress(Exception):
        await nc.close()


async def wait_for(predicate, timeout: float = 20.0, interval: float = 0.05):
    """Poll a (sync or async) predicate until it returns truthy; fail after `timeout`."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


async def stream_messages(js, subject: str) -> list:
    """Every message of the event stream on `subject` (wildcards allowed), oldest first."""
    from services.state.status import read_events

    return await read_events(js, "TILEPIPE", subject)


REPO = Path(__file__).resolve().parents[1]


async def events(js, kind: str, acq: str | None = None) -> list:
    """The decoded events of one kind (of one acquisition) in the stream, oldest first."""
    subject = f"tp.{kind}.>" if acq is None else f"tp.{kind}.{acq}.>"
    return [decode_event(m.data) for m in await stream_messages(js, subject)]


@pytest.fixture
def moto():
    """The S3-compatible test server (tests/s3server.py), for one test."""
    server = MotoServer().start()
    yield server
    server.stop()


@pytest.fixture
def aws_env(monkeypatch):
    """Credentials for the test server only; nothing from the machine's environment."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def tilepipe(*args: str, config: Config | None = None, timeout: float = 60):
    """Run the `tilepipe` CLI as an operator would (against `config`'s server and roots)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if config is not None:
        env.update(
            {
                "TILEPIPE_NATS__URL": config.nats.url,
                "TILEPIPE_ROOTS__RAW": str(config.roots.raw),
                "TILEPIPE_ROOTS__WORK": str(config.roots.work),
                "TILEPIPE_ROOTS__OUTPUT": str(config.roots.output),
            }
        )
    return subprocess.run(
        [sys.executable, "-m", "services.ops.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def make_stage(cls: type[Stage], config: Config, options: dict | None = None, **settings) -> Stage:
    """A stage of class `cls` with its defaults, `settings` over them, and `options`."""
    return cls(config, StageSettings(**{**cls.defaults, **settings, "options": options or {}}))


@contextlib.asynccontextmanager
async def running_stage(
    stage: Stage, config: Config, timeout: float = 30, transport: Transport | None = None
) -> AsyncIterator[StageRunner]:
    """`stage` under the real runner, consuming from `config`'s server (or from `transport`),
    until the block ends (then stopped, waiting at most `timeout` seconds for its deliveries
    to finish)."""
    runner = StageRunner(stage, config, transport=transport)
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    await wait_for(lambda: runner.ready.is_set() or task.done(), timeout=30)
    if task.done():
        task.result()  # the runner's start-up error
    assert runner.ready.is_set(), "the runner ended before it was ready"
    try:
        yield runner
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout)


@contextlib.asynccontextmanager
async def pipeline(config: Config, js, stages, options: dict | None = None, **settings):
    """The watcher and `stages` (classes) running in-process until the block ends."""
    from services.watcher.service import Watcher

    options = options or {}
    stop = asyncio.Event()
    runners = [
        StageRunner(make_stage(cls, config, options.get(cls), **settings), config) for cls in stages
    ]
    watcher = Watcher(config, js)
    tasks = [asyncio.create_task(r.run(stop)) for r in runners]
    tasks.append(asyncio.create_task(watcher.run(stop)))
    await wait_for(lambda: all(r.ready.is_set() for r in runners) and watcher.ready.is_set())
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)


@pytest.fixture
def fake_cupy(monkeypatch):
    """tests/fakecupy.py's CuPy stand-in as ``cupy`` (and ``cupyx``) for one test: the kernels'
    device path runs on the CPU and fails where CuPy would; returns the fake module."""
    from tests.fakecupy import install

    return install(monkeypatch)
