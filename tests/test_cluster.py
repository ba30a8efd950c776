"""A 3-node JetStream cluster on loopback, stream and buckets with 3 replicas, every service a
real process connected with the comma-separated URL list; kill -9 of the node that leads the
stream and serves the most services, mid-acquisition."""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.request
from pathlib import Path

import nats
import pytest

from services.core.config import Config, NatsSettings, Roots
from services.local.init import provision
from services.local.natsserver import EmbeddedServer, free_port
from services.local.simulate import PhantomParams, simulate, write_manifest
from tests.conftest import events, wait_for
from tests.outcomes import (
    assert_each_tile_once,
    assert_mosaic_valid,
    assert_tile_outputs_complete,
    count_kind,
    per_subject,
)
from tests.procs import TILE_STAGES, Services, fault_config, tiny_acquisition

STREAM = "TILEPIPE"
PARAMS = PhantomParams(scatterers=6, scatterer_spacing_um=30.0)


class Node:
    """One cluster member: an EmbeddedServer with a cluster block and a monitoring port."""

    def __init__(self, name: str, root: Path, route_ports: dict[str, int]) -> None:
        self.name = name
        self.http = free_port()
        routes = ", ".join(
            f'"nats-route://127.0.0.1:{p}"' for n, p in route_ports.items() if n != name
        )
        store = root / name
        store.mkdir(parents=True, exist_ok=True)
        conf = store / "nats.conf"
        conf.write_text(
            f'server_name: "{name}"\n'
            f'http: "127.0.0.1:{self.http}"\n'
            f'jetstream {{ store_dir: "{store / "jetstream"}" }}\n'
            "cluster {\n"
            '  name: "tilepipe"\n'
            f'  listen: "127.0.0.1:{route_ports[name]}"\n'
            f"  routes: [{routes}]\n"
            "}\n"
        )
        self.server = EmbeddedServer(store, config_file=conf, name=name)

    def clients(self) -> set[str]:
        """Names of the clients connected to this node (its /connz)."""
        url = f"http://127.0.0.1:{self.http}/connz?limit=1024"
        with urllib.request.urlopen(url, timeout=5) as response:
            return {c.get("name", "") for c in json.loads(response.read())["connections"]}


@pytest.fixture
def cluster(tmp_path: Path):
    names = ("n1", "n2", "n3")
    routes = {name: free_port() for name in names}
    nodes = [Node(name, tmp_path / "cluster", routes) for name in names]
    try:
        for node in nodes:
            node.server.start()
        yield nodes
    finally:
        for node in nodes:
            node.server.stop()


async def provision_when_ready(config: Config, timeout: float = 60.0) -> None:
    """`tilepipe init` once the cluster has elected its JetStream meta leader."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            await provision(config)
            return
        except Exception:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.5)


async def stream_leader(js) -> str:
    info = await js.stream_info(STREAM)
    return info.cluster.leader if info.cluster else ""


async def move_stream_leader(nc, js, to: str) -> None:
    """Ask the stream's leader to step down in favour of `to` until `to` leads."""
    for _ in range(20):
        if await stream_leader(js) == to:
            return
        body = json.dumps({"placement": {"preferred": to}}).encode()
        with contextlib.suppress(Exception):
            await nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{STREAM}", body, timeout=5)
        with contextlib.suppress(AssertionError):
            await wait_for(lambda: _leads(js, to), timeout=5, interval=0.2)
    raise AssertionError(f"{to} never became the leader of {STREAM}")


async def _leads(js, name: str) -> bool:
    with contextlib.suppress(Exception):
        return await stream_leader(js) == name
    return False


async def test_node_killed_mid_acquisition_loses_nothing(cluster, tmp_path):
    urls = ",".join(node.server.url for node in cluster)
    roots = Roots(raw=tmp_path / "raw", work=tmp_path / "work", output=tmp_path / "output")
    for root in (roots.raw, roots.work, roots.output):
        root.mkdir(parents=True, exist_ok=True)
    base = Config(nats=NatsSettings(url=urls, replicas=3), roots=roots)
    cfg = fault_config(base, TILE_STAGES, backoff_s=[1.0, 2.0, 4.0])
    await provision_when_ready(cfg)
    nc = await nats.connect(
        urls.split(","), max_reconnect_attempts=-1, reconnect_time_wait=0.2, name="test"
    )
    js = nc.jetstream()
    info = await js.stream_info(STREAM)
    assert info.config.num_replicas == 3 and len(info.cluster.replicas) == 2
    manifest = tiny_acquisition("clu", slices=2)
    path = write_manifest(manifest, roots.raw / "clu")
    names = ["watcher", *TILE_STAGES]
    try:
        with Services(cfg, tmp_path / "svc", names) as services:
            expected = {f"tilepipe-{n}" for n in names}

            def connected() -> dict[str, set[str]]:
                where = {node.name: node.clients() & expected for node in cluster}
                return where if set().union(*where.values()) == expected else {}

            where = await wait_for(connected, timeout=60, interval=0.2)
            victim = max(cluster, key=lambda node: len(where[node.name]))
            await move_stream_leader(nc, js, victim.name)
            writer = asyncio.create_task(
                asyncio.to_thread(simulate, path, manifest, 2.0, params=PARAMS)
            )
            await wait_for(lambda: count_kind(js, "tile_processed"), timeout=120)
            assert not writer.done()  # mid-acquisition
            victim.server.kill()
            await writer

            async def stitched() -> bool:
                try:
                    return await count_kind(js, "slice_stitched") == manifest.lattice.slices
                except (TimeoutError, nats.errors.Error):  # our own client, during the election
                    return False

            await wait_for(stitched, timeout=240, interval=0.5)

            async def every_tile_processed() -> bool:
                """A delivery whose publish fell into the election is retried (backoff) after
                stitch, reading the lattice, may already be done: wait for it before stopping
                the services; the exactly-once check below is unchanged."""
                try:
                    done = await per_subject(js, "tp.tile_processed.clu.>")
                except (TimeoutError, nats.errors.Error):
                    return False
                return len(done) >= manifest.tiles

            await wait_for(every_tile_processed, timeout=120, interval=0.5)
            moved = {name.removeprefix("tilepipe-") for name in where[victim.name]}
            reconnects = {
                name: services.metric(
                    name, "tilepipe_nats_reconnects_total", service=f"tilepipe-{name}"
                )
                for name in moved
            }
            logged = {
                name: any(r.get("event") == "nats_reconnected" for r in services.log(name))
                for name in moved
            }
            assert all(services.alive(name) for name in names), services.messages
        assert moved and all(n >= 1 for n in reconnects.values()), (moved, reconnects)
        assert all(logged.values()), logged
        assert await stream_leader(js) != victim.name
        await assert_each_tile_once(js, "clu", manifest.tiles)
        assert await events(js, "stage_failed") == []
        assert_tile_outputs_complete(cfg, manifest)
        for s in range(manifest.lattice.slices):
            assert_mosaic_valid(cfg, "clu", s)
    finally:
        await nc.close()
