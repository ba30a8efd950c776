"""`tilepipe init` and `tilepipe up` as an operator runs them."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import nats

from messages import TileArrived, TileCoord, utcnow
from services.local.natsserver import free_port_block, port_open
from services.runtime.bus import publish_event
from tests.conftest import stream_messages, tilepipe, wait_for
from tests.procs import free_ports, running_up

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
PLUGINS = """
[stages.convert_like]
impl = "tests.stages_for_tests:ConvertLike"
concurrency = 3
[stages.process_like]
impl = "tests.stages_for_tests:ProcessLike"
"""


async def test_init_is_idempotent_and_names_are_stable(nats_server, tmp_path):
    cfg = tmp_path / "tp.toml"
    cfg.write_text(PLUGINS)
    first = tilepipe("init", "--config", str(cfg), "--nats-url", nats_server.url)
    second = tilepipe("init", "--config", str(cfg), "--nats-url", nats_server.url)
    assert first.returncode == 0, first.stderr
    assert second.returncode == 0 and second.stdout == first.stdout
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    info = await js.consumer_info("TILEPIPE", "convert_like")
    assert info.config.filter_subjects == ["tp.tile_arrived.>", "tp.redo_convert_like.>"]
    assert info.config.max_ack_pending == 3 and info.config.durable_name == "convert_like"
    stream = await js.stream_info("TILEPIPE")
    assert stream.config.subjects == ["tp.>"] and stream.config.storage == "file"
    assert {"KV_tp-acquisitions", "KV_tp-lattice"} <= {
        s.config.name for s in await js.streams_info()
    }
    await nc.close()


async def test_init_without_server_fails_clearly(tmp_path):
    proc = tilepipe("init", "--nats-url", "nats://127.0.0.1:1")
    assert proc.returncode == 3 and "cannot reach NATS" in proc.stderr


async def test_up_runs_embedded_server_and_services_until_ctrl_c(tmp_path):
    cfg = tmp_path / "tp.toml"
    cfg.write_text(PLUGINS + free_ports())
    work = tmp_path / "work"
    with running_up(
        "--config",
        str(cfg),
        "--work",
        str(work),
        "--services",
        "convert_like,process_like",
        env=ENV,
    ) as proc:
        await wait_for(lambda: (work / "tilepipe.toml").exists(), timeout=30)
        url = tomllib.loads((work / "tilepipe.toml").read_text())["nats"]["url"]
        nc = await nats.connect(url)
        js = nc.jetstream()
        for i in range(5):
            await publish_event(
                js,
                TileArrived(
                    acq="up1",
                    tile=TileCoord(slice=0, row=0, col=i),
                    path=f"t{i}",
                    manifest="m.toml",
                    size_bytes=1,
                    completed_at=utcnow(),
                ),
            )

        async def processed():
            return len(await stream_messages(js, "tp.tile_processed.>")) == 5

        await wait_for(processed, timeout=60)
        await nc.close()
        proc.send_signal(signal.SIGINT)
        out, _ = await asyncio.to_thread(proc.communicate, timeout=60)
    assert proc.returncode == 0, out
    assert "(embedded)" in out and "convert_like" in out
    host, port = url.removeprefix("nats://").split(":")
    assert not port_open(host, int(port))
    assert (work / "logs" / "convert_like.log").read_text().count("event_handled") == 5


async def test_up_with_existing_server_leaves_it_running(nats_server, tmp_path):
    cfg = tmp_path / "tp.toml"
    cfg.write_text(PLUGINS + "[metrics]\nbase_port = 19600\n")
    work = tmp_path / "work"
    args = ["--config", str(cfg), "--work", str(work), "--services", "convert_like"]
    with running_up(*args, "--nats-url", nats_server.url, env=ENV) as proc:
        await wait_for(lambda: (work / "tilepipe.toml").exists(), timeout=30)
        assert tomllib.loads((work / "tilepipe.toml").read_text())["nats"]["url"] == nats_server.url
        nc = await nats.connect(nats_server.url)
        await wait_for(lambda: _consumer_exists(nc, "convert_like"), timeout=30)
        await nc.close()
        proc.send_signal(signal.SIGINT)
        out, _ = await asyncio.to_thread(proc.communicate, timeout=60)
    assert proc.returncode == 0, out
    assert "(embedded)" not in out and not (work / "nats").exists()
    assert port_open("127.0.0.1", nats_server.port)


async def _consumer_exists(nc, name: str) -> bool:
    try:
        await nc.jetstream().consumer_info("TILEPIPE", name)
    except Exception:
        return False
    return True


async def test_up_honours_the_configs_nats_url_and_metrics_ports(tmp_path):
    """`up --config F` listens where F says (server and metrics), so `tilepipe ... --config F`
    finds it; a second `up` with the same F refuses clearly instead of moving ports."""
    nats_port, base_port = free_port_block(1), free_port_block(16)
    cfg = tmp_path / "tp.toml"
    cfg.write_text(
        PLUGINS
        + f'[nats]\nurl = "nats://127.0.0.1:{nats_port}"\n'
        + f"[metrics]\nbase_port = {base_port}\n"
    )
    from services.core.config import load_config
    from services.stages import metrics_port_for

    # plugin stages come after the watcher and the built-in stages
    metrics_port = metrics_port_for(load_config(cfg), "convert_like")
    assert metrics_port > base_port
    work = tmp_path / "work"
    up_args = ["--config", str(cfg)]
    cmd = [sys.executable, "-m", "services.ops.cli", "up", *up_args]
    services = ["--services", "convert_like"]
    with running_up(*up_args, "--work", str(work), *services, env=ENV) as proc:
        await wait_for(lambda: (work / "tilepipe.toml").exists(), timeout=30)
        written = tomllib.loads((work / "tilepipe.toml").read_text())
        assert written["nats"]["url"] == f"nats://127.0.0.1:{nats_port}"
        await wait_for(lambda: port_open("127.0.0.1", metrics_port), timeout=30)
        # an operator command reading the same file reaches the running server
        init = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "services.ops.cli", "init", "--config", str(cfg)],
            cwd=REPO,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert init.returncode == 0, init.stderr
        second = await asyncio.to_thread(
            subprocess.run,
            [*cmd, "--work", str(tmp_path / "work2"), *services],
            cwd=REPO,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 2
        assert f"127.0.0.1:{nats_port} is in use" in second.stderr
        proc.send_signal(signal.SIGINT)
        out, _ = await asyncio.to_thread(proc.communicate, timeout=60)
    assert proc.returncode == 0, out
    assert f"metrics http://127.0.0.1:{metrics_port}/metrics" in out


def test_free_port_block_is_free_and_below_the_ephemeral_range():
    """Metrics ports (base_port + position) come from below 32768, where no outgoing
    connection of another process can take one between the choice and the bind."""
    start = free_port_block(16)
    assert start >= 20000 and start + 16 <= 32768
    for port in range(start, start + 16):
        assert not port_open("127.0.0.1", port)
