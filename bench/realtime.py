"""Real time end to end: `tilepipe up` (embedded server, every service, upload on) fed by
`tilepipe simulate`, streaming versus the same acquisition processed as one batch.

One `tilepipe up` runs for the whole benchmark, with the upload stage sending to a local
S3-compatible server (`moto_server` on loopback, started here, as in `bench/upload_bench.py`)
unless `--upload-url` names another destination. Two acquisitions of the same size and data:

* **streaming**: the tiles are written into the raw root at R tiles/s while every service
  runs; figures are measured from each tile file's last write (`tile_arrived.completed_at`).
* **batch**: `tilepipe pause convert`, the whole acquisition written at once (and seen by the
  watcher), then `tilepipe resume convert`: the same services process it with all tiles
  already on disk. Its "end of acquisition -> last output" runs from the start of the first
  conversion after the resume (the CLI's own start-up is not counted against batch).

The tiles are generated once by `tilepipe simulate` into a directory outside the raw root,
before anything is timed, and then written into the raw root by this script with the
simulator's own writer (in place, chunk by chunk, fsync): generating the phantom costs about
as much CPU as processing it, and a microscope does not take its CPU from the pipeline.

Figures come from the event log (`services.state.timeline`: per-tile latency, per-slice tail, stage
handling times) plus the stage consumers sampled every 0.5 s for backlog. The tail goal: the
time from the acquisition's last tile file to its last output is at most that tile's
convert + process time, plus its slice's stitch + register + upload time, plus a slack (the
watcher's settle interval and 0.25 s per hand-over); streaming's end-to-done must be at least
10x shorter than batch's.

    python bench/realtime.py --slices 4 --rows 4 --cols 4 --rate 1.0
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from datetime import UTC, datetime
from pathlib import Path

import boto3

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.upload_bench import start_moto  # noqa: E402
from messages.subjects import PIPELINE_ORDER, acq_filter  # noqa: E402
from services.core.config import NatsSettings  # noqa: E402
from services.core.manifest import Manifest  # noqa: E402
from services.local.demo import expected_uploads  # noqa: E402
from services.local.natsserver import free_port  # noqa: E402
from services.local.simulate import small_manifest, write_manifest, write_tile_file  # noqa: E402
from services.runtime.bus import connect  # noqa: E402
from services.state.eventlog import subjects_seen  # noqa: E402
from services.state.timeline import (  # noqa: E402
    BacklogSampler,
    Timeline,
    figures,
    markdown_table,
    read_timeline,
    tail_slack,
)

BUCKET = "tilepipe-bench"
STAGES = list(PIPELINE_ORDER[1:])  # every built-in stage
SERVICES = ["watcher", *STAGES]


def cli(*args: str) -> list[str]:
    """The `tilepipe` command line of this interpreter."""
    return [sys.executable, "-m", "services.ops.cli", *args]


def write_config(path: Path, work: Path, args: argparse.Namespace, endpoint: str | None) -> Path:
    """The benchmark's config: roots under `work`, upload on, process on `--device`."""
    upload = {"url": args.upload_url or f"s3://{BUCKET}/realtime"}
    if upload["url"].startswith("s3://"):
        upload["region"] = args.region
    if endpoint:
        upload["endpoint"] = endpoint
    opts = ", ".join(f'{k} = "{v}"' for k, v in upload.items())
    path.write_text(
        f"""[roots]
raw = "{work / "raw"}"
work = "{work / "work"}"
output = "{work / "output"}"

[log]
level = "info"

[stages.process]
options = {{ device = "{args.device}" }}

[stages.upload]
enabled = true
options = {{ {opts} }}
"""
    )
    return path


class Up:
    """`tilepipe up` as a child process (its own session), stopped with SIGINT like Ctrl-C."""

    def __init__(self, config: Path, work: Path, env: dict[str, str]) -> None:
        self.work = work
        self.log = open(work.parent / "up.log", "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            cli("up", "--config", str(config), "--work", str(work)),
            cwd=REPO,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    async def nats(self, timeout: float = 120) -> NatsSettings:
        """The NATS settings once `up` has written its effective config."""
        path = self.work / "tilepipe.toml"
        deadline = time.monotonic() + timeout
        while not path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"tilepipe up did not start; see {self.log.name}")
            await asyncio.sleep(0.2)
        return NatsSettings(**tomllib.loads(path.read_text())["nats"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()


async def count(js, stream: str, kind: str, acq: str) -> int:
    return sum((await subjects_seen(js, stream, acq_filter(acq, kind))).values())


async def wait_done(js, stream: str, manifest: Manifest, timeout: float) -> None:
    """Until every tile is processed and every artifact (tiles, mosaics, volume) uploaded."""
    want = expected_uploads(manifest, STAGES)
    deadline = time.monotonic() + timeout
    while True:
        uploaded = await count(js, stream, "artifact_uploaded", manifest.id)
        failed = await count(js, stream, "stage_failed", manifest.id)
        if uploaded >= want:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{manifest.id}: {uploaded}/{want} uploads, {failed} failures after {timeout:.0f} s"
            )
        await asyncio.sleep(0.5)


async def run_cli(env: dict[str, str], *args: str) -> None:
    """One `tilepipe` command, output discarded; raises with its stderr when it fails."""
    proc = await asyncio.create_subprocess_exec(
        *cli(*args),
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _, err = await proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"tilepipe {' '.join(args)} failed: {err.decode()[-2000:]}")


async def simulate(manifest_path: Path, env: dict[str, str]) -> None:
    """`tilepipe simulate` as fast as it can (the tiles are generated once, off the clock)."""
    await run_cli(env, "simulate", str(manifest_path), "--rate", "0")


def feed(source: Path, manifest_path: Path, manifest: Manifest, rate: float) -> None:
    """Write the generated tiles into an acquisition at `rate` tiles/s (0: at once), in scan
    order, with the simulator's writer (in place, chunk by chunk, fsync)."""
    acq_dir = manifest_path.parent
    start = time.monotonic()
    for i, coord in enumerate(manifest.coords()):
        if rate > 0:
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        rel = manifest.path_of(coord)
        write_tile_file(acq_dir / rel, (source / rel).read_bytes())


async def operator(config: Path, env: dict[str, str], *args: str) -> None:
    await run_cli(env, *args, "--config", str(config))


def acquisition(raw: Path, name: str, args: argparse.Namespace) -> tuple[Path, Manifest]:
    """A fresh manifest of the benchmark's size under `raw`; returns its path."""
    acq = f"rt-{name}-{datetime.now(UTC):%H%M%S}"
    manifest = small_manifest(
        acq,
        slices=args.slices,
        rows=args.rows,
        cols=args.cols,
        alines=args.alines,
        bscans=args.bscans,
        samples=args.samples,
        settle_s=args.settle_s,
    )
    return write_manifest(manifest, raw / acq), manifest


async def streaming(js, nats: NatsSettings, raw: Path, source: Path, args) -> tuple:
    path, manifest = acquisition(raw, "stream", args)
    sampler, stop = BacklogSampler(STAGES), asyncio.Event()
    task = asyncio.create_task(sampler.run(js, nats.stream, stop))
    try:
        await asyncio.to_thread(feed, source, path, manifest, args.rate)
        await wait_done(js, nats.stream, manifest, args.timeout)
    finally:
        stop.set()
        await task
    return await read_timeline(js, nats.stream, manifest.id), sampler.max()


async def batch(js, nats: NatsSettings, raw: Path, source: Path, config: Path, args, env) -> tuple:
    path, manifest = acquisition(raw, "batch", args)
    await operator(config, env, "pause", "convert")
    try:
        await asyncio.to_thread(feed, source, path, manifest, 0)
        deadline = time.monotonic() + args.timeout
        while await count(js, nats.stream, "tile_arrived", manifest.id) < manifest.tiles:
            if time.monotonic() > deadline:
                raise RuntimeError("the watcher did not see every batch tile")
            await asyncio.sleep(0.2)
    finally:
        await operator(config, env, "resume", "convert")
    sampler, stop = BacklogSampler(STAGES), asyncio.Event()
    task = asyncio.create_task(sampler.run(js, nats.stream, stop))
    try:
        await wait_done(js, nats.stream, manifest, args.timeout)
    finally:
        stop.set()
        await task
    return await read_timeline(js, nats.stream, manifest.id), sampler.max()


async def run(args: argparse.Namespace, root: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO), "AWS_EC2_METADATA_DISABLED": "true"}
    moto = endpoint = None
    if args.upload_url is None:
        port = free_port()
        endpoint = f"http://127.0.0.1:{port}"
        env.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench")
        moto = start_moto(port)
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="bench",
            aws_secret_access_key="bench",
        ).create_bucket(Bucket=BUCKET)
    config = write_config(root / "bench.toml", root, args, endpoint or args.endpoint)
    source, _ = acquisition(root / "generated", "source", args)  # outside the raw root
    await simulate(source, env)
    source = source.parent
    up = Up(config, root / "up", env)
    try:
        nats = await up.nats()
        nc = await connect(nats, name="bench-realtime", retry_for_s=30)
        js = nc.jetstream()
        try:
            for stage in STAGES:  # provisioned by `up` before the services start
                while True:
                    with contextlib.suppress(Exception):
                        await js.consumer_info(nats.stream, stage)
                        break
                    await asyncio.sleep(0.2)
            raw = root / "raw"
            effective = root / "up" / "tilepipe.toml"
            s_tl, s_backlog = await streaming(js, nats, raw, source, args)
            b_tl, b_backlog = await batch(js, nats, raw, source, effective, args, env)
        finally:
            await nc.close()
    finally:
        up.stop()
        if moto is not None:
            moto.terminate()
            moto.wait(10)
    return report(args, s_tl, s_backlog, b_tl, b_backlog)


def report(args, s_tl: Timeline, s_backlog, b_tl: Timeline, b_backlog) -> str:
    slack = tail_slack(args.settle_s, SERVICES)
    # batch: from the first conversion after the resume (all files were on disk before)
    released = max(b_tl.processing_start or 0.0, b_tl.acq_end or 0.0)
    columns = {
        "streaming": figures(s_tl, slack, s_backlog),
        "batch": figures(b_tl, None, b_backlog, start=released),
    }
    stream_s = s_tl.done_after()
    batch_s = b_tl.done_after(released)
    ratio = batch_s / stream_s if stream_s and batch_s else None
    columns["streaming"]["batch / streaming (end of acquisition -> last output)"] = (
        "-" if ratio is None else f"{ratio:.1f}x"
    )
    budget = s_tl.budget(slack)
    tiles = args.slices * args.rows * args.cols
    lines = [
        markdown_table(columns),
        "",
        f"acquisition: {args.slices} slices x {args.rows}x{args.cols} tiles = {tiles} tiles of "
        f"{args.bscans}x{args.alines} A-lines x {args.samples} samples "
        f"({args.bscans * args.alines * args.samples * 4 / 1e6:.1f} MB raw each), "
        f"streaming written at {args.rate:g} tiles/s, settle {args.settle_s:g} s, "
        f"process device {args.device}",
    ]
    if budget is not None:
        verdict = "met" if budget.met else "NOT met"
        lines.append(
            f"tail goal: {budget.measured_s:.2f} s after the last tile <= {budget.total_s:.2f} s "
            f"(last tile convert+process {budget.tile_s:.2f} + its slice stitch+register+upload "
            f"{budget.slice_s:.2f} + slack {budget.slack_s:.2f}): {verdict}"
        )
    if ratio is not None:
        verdict = "met" if ratio >= 10 else "NOT met"
        lines.append(
            f"batch/streaming goal: batch {batch_s:.1f} s / streaming {stream_s:.1f} s = "
            f"{ratio:.1f}x >= 10x: {verdict}"
        )
    lines.append(
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {platform.node()}: {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}; Python {platform.python_version()}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=4)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--cols", type=int, default=4)
    parser.add_argument("--alines", type=int, default=64, help="A-lines per B-line")
    parser.add_argument("--bscans", type=int, default=64, help="B-lines per tile")
    parser.add_argument("--samples", type=int, default=512, help="samples per spectrum")
    parser.add_argument("--rate", type=float, default=1.0, help="streaming tiles per second")
    parser.add_argument("--settle-s", type=float, default=0.3, help="manifest settle interval")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"))
    parser.add_argument(
        "--upload-url", default=None, help="destination instead of a local moto_server"
    )
    parser.add_argument("--endpoint", default=None, help="S3 endpoint for --upload-url")
    parser.add_argument("--region", default="us-east-1", help="S3 region for --upload-url")
    parser.add_argument("--work", type=Path, default=None, help="keep everything here")
    parser.add_argument("--timeout", type=float, default=900, help="per phase, seconds")
    args = parser.parse_args(argv)
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        print(asyncio.run(run(args, args.work.resolve())))
        return 0
    with tempfile.TemporaryDirectory(prefix="tp-realtime-") as tmp:
        print(asyncio.run(run(args, Path(tmp))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
