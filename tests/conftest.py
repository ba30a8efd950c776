"""Fixtures: a real nats-server on a free loopback port, configs under tmp_path."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest

from services.config import Config, NatsSettings, Roots
from services.natsserver import EmbeddedServer


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
    from services.provision import ensure_kv, ensure_stream

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
    from services.status import read_events

    return await read_events(js, "TILEPIPE", subject)
