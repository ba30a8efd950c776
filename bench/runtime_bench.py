"""Overhead of the stage runtime versus bare nats-py, measured side by side in one run.

One embedded nats-server (from the wheel, store in a temp dir) serves every variant in turn,
each on a freshly created TILEPIPE stream (same config: file storage, `tp.>`, de-duplication):

* ``runtime``: a chain of no-op stages (``Stage`` subclasses defined here) driven by the real
  ``StageRunner`` with validation, Prometheus metrics and JSON logging (to a file) on. Stage k
  consumes event kind E_k and publishes E_{k+1}: tile_arrived -> tile_converted ->
  tile_processed -> pair_aligned -> slice_stitched -> slice_registered -> artifact_uploaded.
  Handlers are plain functions declared non-blocking (``blocking = False``), so the runtime
  calls them inline: this is the runtime's own cost per hop.
* ``runtime-thread``: the same handlers run in the runtime's worker threads (the path every
  NumPy/CuPy stage takes, where the hand-off is small next to the work).
* ``runtime-async``: the same with ``async def handle``.
* ``bare``: the same chain with plain nats-py: one durable pull consumer per hop, ``fetch`` in
  batches up to the free slots, ``json.loads``, ``js.publish`` of the next event's JSON with a
  ``Nats-Msg-Id`` header (awaiting the PubAck), ``ack``; the same bounded number of in-flight
  handlers per hop. No validation, no metrics, no logging.
* ``bare-lean``: the bare loop on the transport the runtime uses instead of ``fetch`` and
  ``js.publish``: standing pull requests for the free slots (``services.runtime.pullfeed.PullFeed``)
  and publish acknowledgements matched on one subscription (``services.runtime.bus.pubacks``). It
  shows how much of the runtime-vs-bare figure is the transport, not the runtime's features.
* ``bare-checked``: the bare loop plus only the per-event work the runtime is asked to do,
  without the runtime: ``decode_event`` (pydantic validation of the input), an ``Origin``
  stamped on the next event built as a model, its JSON and msg id published with
  ``js.publish`` as the bare loop does, one structlog JSON line with the event's context, a
  counter and a latency histogram. bare -> bare-checked is what these features cost;
  bare-checked -> runtime is the runtime's own plumbing (in-flight tracking, retry/fail
  paths, handler context, end-to-end monitoring) less what its transport saves.

All variants publish equivalent events (checked at start-up: every bare payload
validates as the tilepipe model of its kind, with the same keys, subject and msg id). All hops
of a variant run in this one process as asyncio tasks, each hop on its own NATS connection.

The N input events are published before the hops start (not timed); the clock runs from
launching the hops until the N final events are in the stream. hops/s = N x stages / elapsed.

    python bench/runtime_bench.py --tiles 5000 --stages 6 --concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import nats
import nats.errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import cpu_model
from messages.codec import decode_event
from messages.events import (
    CURRENT_ORIGIN,
    ArtifactUploaded,
    Event,
    Origin,
    SliceRegistered,
    SliceStitched,
    TileArrived,
    TileConverted,
    TileCoord,
    TilePairAligned,
    TileProcessed,
    utcnow,
)
from services.core.config import Config, NatsSettings, StageSettings
from services.core.logs import configure_logging, get_logger
from services.core.metrics import EVENTS_HANDLED, HANDLE_SECONDS
from services.local.natsserver import EmbeddedServer
from services.runtime.bus import MSG_ID, pubacks, publish_event
from services.runtime.provision import ensure_stream
from services.runtime.pullfeed import PullFeed
from services.runtime.runner import StageRunner, arrival_time
from services.runtime.stage import Context, Result, Stage

CHAIN: tuple[type[Event], ...] = (
    TileArrived,
    TileConverted,
    TileProcessed,
    TilePairAligned,
    SliceStitched,
    SliceRegistered,
    ArtifactUploaded,
)
MAX_STAGES = len(CHAIN) - 1
VARIANTS = {
    "bare": "bare nats-py",
    "bare-lean": "bare nats-py on the runtime's transport",
    "bare-checked": "bare nats-py + validation, log line, metrics",
    "runtime": "tilepipe runtime (inline handlers)",
    "runtime-thread": "tilepipe runtime (thread handlers)",
    "runtime-async": "tilepipe runtime (async handlers)",
}
TILES_PER_SLICE = 1000  # tile i -> slice i // 1000, mosaic i % 1000: every subject is unique
IDENTITY = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]


# ------------------------------------------------------------------------------- the events
def tile_of(i: int) -> TileCoord:
    return TileCoord(slice=i // TILES_PER_SLICE, mosaic=i % TILES_PER_SLICE, row=0, col=0)


def first_event(acq: str, i: int) -> TileArrived:
    tile = tile_of(i)
    # `manifest` is being added to TileArrived: fill it in when the model has it.
    extra = {"manifest": "raw/manifest.json"} if "manifest" in TileArrived.model_fields else {}
    return TileArrived(
        acq=acq,
        tile=tile,
        path=f"raw/s{tile.slice}/{tile.token()}.nii",
        **extra,
        size_bytes=1 << 20,
        completed_at=utcnow(),
        producer="bench",
    )


def _digest(text: str) -> str:
    """A stand-in for a stage's basis digest (what its output was computed from)."""
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def next_event(hop: int, e, producer: str) -> Event:
    """E_{hop+1} built from E_hop, as a stage author would write it (validated models)."""
    if hop == 0:
        return TileConverted(
            acq=e.acq,
            tile=e.tile,
            path=f"conv/s{e.tile.slice}/{e.tile.token()}.zarr",
            raw_path=e.path,
            shape=[2, 512, 512],
            dtype="uint16",
            basis=_digest(e.path),
            producer=producer,
        )
    if hop == 1:
        base = f"proc/s{e.tile.slice}/{e.tile.token()}"
        return TileProcessed(
            acq=e.acq,
            tile=e.tile,
            products={"aip": f"{base}/aip.zarr", "ret": f"{base}/ret.zarr"},
            device="cpu",
            seconds=0.0,
            basis=_digest(e.basis),
            producer=producer,
        )
    if hop == 2:
        t = e.tile
        right = TileCoord(slice=t.slice, mosaic=t.mosaic, row=t.row, col=t.col + 1)
        return TilePairAligned(
            acq=e.acq,
            slice=t.slice,
            mosaic=t.mosaic,
            a=t,
            b=right,
            shift_px=(0.0, 0.0),
            confidence=1.0,
            accepted=True,
            basis=_digest(e.basis),
            producer=producer,
        )
    if hop == 3:
        return SliceStitched(
            acq=e.acq,
            slice=e.slice,
            mosaic=e.mosaic,
            path=f"out/s{e.slice}/m{e.mosaic}.ome.zarr",
            producer=producer,
        )
    if hop == 4:
        return SliceRegistered(
            acq=e.acq,
            slice=e.slice,
            mosaic=e.mosaic,
            path=e.path,
            transform=IDENTITY,
            quality=1.0,
            accepted=True,
            basis=e.inputs,
            producer=producer,
        )
    if hop == 5:
        return ArtifactUploaded(
            acq=e.acq,
            tile=TileCoord(slice=e.slice, mosaic=e.mosaic, row=0, col=0),
            product="volume",
            source=e.path,
            key=f"bucket/{e.acq}/{e.path}",
            bytes=0,
            checksum="sha256:0",
            seconds=0.0,
            producer=producer,
        )
    raise ValueError(f"no hop {hop}")


def _tok(t: dict) -> str:
    return f"m{t['mosaic']}-r{t['row']}-c{t['col']}"


def bare_next(hop: int, d: dict, producer: str) -> tuple[str, str, dict]:
    """The same E_{hop+1} as plain JSON: (subject, Nats-Msg-Id, payload dict)."""
    acq = d["acq"]
    now = datetime.now(UTC).isoformat()
    head = {
        "v": 1,
        "acq": acq,
        "emitted_at": now,
        "producer": producer,
        # what the runtime stamps on every output (the successful attempt's record)
        "origin": {
            "stage": producer,
            "input_type": CHAIN[hop].kind,
            "attempt": 1,
            "host": HOST,
            "worker": producer,
            "started_at": now,
            "replay": "",
        },
    }
    if hop == 0:
        t = d["tile"]
        subject, out = _tile_payload(
            "tile_converted",
            head,
            t,
            path=f"conv/s{t['slice']}/{_tok(t)}.zarr",
            raw_path=d["path"],
            shape=[2, 512, 512],
            dtype="uint16",
            completed_at=None,
            basis=_digest(d["path"]),
        )
        return subject, f"{subject}:{out['basis']}", out
    if hop == 1:
        t = d["tile"]
        base = f"proc/s{t['slice']}/{_tok(t)}"
        subject, out = _tile_payload(
            "tile_processed",
            head,
            t,
            products={"aip": f"{base}/aip.zarr", "ret": f"{base}/ret.zarr"},
            device="cpu",
            seconds=0.0,
            completed_at=None,
            basis=_digest(d["basis"]),
        )
        return subject, f"{subject}:{out['basis']}", out
    if hop == 2:
        t = d["tile"]
        kind = "pair_aligned"
        right = {**t, "col": t["col"] + 1}
        out = {
            **head,
            "slice": t["slice"],
            "mosaic": t["mosaic"],
            "type": kind,
            "a": t,
            "b": right,
            "shift_px": [0.0, 0.0],
            "confidence": 1.0,
            "accepted": True,
            "reason": "",
            "basis": _digest(d["basis"]),
        }
        subject = f"tp.{kind}.{acq}.{t['slice']}.{_tok(t)}-{_tok(right)}"
        return subject, f"{subject}:{out['basis']}", out
    if hop == 3:
        subject, out = _slice_payload(
            "slice_stitched",
            head,
            d,
            path=f"out/s{d['slice']}/m{d['mosaic']}.ome.zarr",
            positions=[],
            residual_rms_px=0.0,
            missing=[],
            inputs="",
        )
        return subject, f"{subject}:", out
    if hop == 4:
        subject, out = _slice_payload(
            "slice_registered",
            head,
            d,
            path=d["path"],
            transform=IDENTITY,
            quality=1.0,
            accepted=True,
            basis=d["inputs"],
        )
        body = json.dumps(
            [out["path"], out["transform"], out["quality"], out["accepted"], out["basis"]]
        )
        return subject, f"{subject}:{hashlib.sha256(body.encode()).hexdigest()[:16]}", out
    if hop == 5:
        kind = "artifact_uploaded"
        t = {"slice": d["slice"], "mosaic": d["mosaic"], "row": 0, "col": 0, "index": None}
        out = {
            **head,
            "tile": t,
            "slice": None,
            "type": kind,
            "product": "volume",
            "source": d["path"],
            "key": f"bucket/{acq}/{d['path']}",
            "bytes": 0,
            "checksum": "sha256:0",
            "seconds": 0.0,
        }
        subject = f"tp.{kind}.{acq}.{d['slice']}.{_tok(t)}"
        return subject, f"{subject}:volume", out
    raise ValueError(f"no hop {hop}")


def _tile_payload(kind: str, head: dict, t: dict, **fields) -> tuple[str, dict]:
    """(subject, payload) of a tile-level event on tile ``t``."""
    out = {**head, "tile": t, "type": kind, **fields}
    return f"tp.{kind}.{head['acq']}.{t['slice']}.{_tok(t)}", out


def _slice_payload(kind: str, head: dict, d: dict, **fields) -> tuple[str, dict]:
    """(subject, payload) of a slice-level event on the slice and mosaic of ``d``."""
    out = {**head, "slice": d["slice"], "mosaic": d["mosaic"], "type": kind, **fields}
    return f"tp.{kind}.{head['acq']}.{d['slice']}.m{d['mosaic']}", out


HOST = socket.gethostname()


def check_payloads(stages: int) -> list[int]:
    """Both variants must publish equivalent events; returns the payload sizes per kind."""
    event: Event = first_event("check", 1234)
    raw = json.loads(event.to_json())
    sizes = [len(event.to_json())]
    for hop in range(stages):
        nxt = next_event(hop, event, "noop1")
        subject, msg_id, out = bare_next(hop, raw, "noop1")
        as_model = CHAIN[hop + 1].model_validate(out)
        ours = json.loads(nxt.to_json())
        problems = []
        if set(out) != set(ours):
            problems.append(f"keys {sorted(set(out) ^ set(ours))}")
        if subject != nxt.subject() or msg_id != nxt.msg_id() or msg_id != as_model.msg_id():
            problems.append(f"subject/msg id {subject} {msg_id} vs {nxt.subject()}")
        if {**out, "emitted_at": 0, "origin": 0} != {**ours, "emitted_at": 0, "origin": 0}:
            problems.append("field values differ")
        if problems:
            raise AssertionError(f"bare payload of hop {hop + 1} differs: {problems}")
        sizes.append(len(json.dumps(out)))
        event, raw = nxt, out
    return sizes


# ------------------------------------------------------------------------ shared plumbing
async def fresh_stream(url: str) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    with contextlib.suppress(Exception):
        await js.delete_stream(NatsSettings().stream)
    await ensure_stream(js, NatsSettings(url=url))
    await nc.close()


async def publish_inputs(js, acq: str, tiles: int, window: int = 256) -> None:
    for start in range(0, tiles, window):
        batch = [first_event(acq, i) for i in range(start, min(tiles, start + window))]
        await asyncio.gather(*(publish_event(js, e) for e in batch))


async def publish_paced(js, acq: str, tiles: int, rate: float) -> None:
    """Inputs at `rate` per second while the hops run (`--rate`), on schedule, not in bursts."""
    start = time.perf_counter()
    for i in range(tiles):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await publish_event(js, first_event(acq, i))


async def counter(js, stream: str, name: str, subject: str):
    """A consumer never fetched from: its num_pending counts the stream's `subject` messages."""
    await js.add_consumer(
        stream,
        ConsumerConfig(
            durable_name=name,
            filter_subject=subject,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
        ),
    )

    async def count() -> int:
        info = await js.consumer_info(stream, name)
        return info.num_pending or 0

    return count


def server_cpu_s(server: EmbeddedServer) -> float:
    """User + system CPU seconds of the nats-server process."""
    fields = Path(f"/proc/{server.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


class Measure:
    """What one variant run yields."""

    def __init__(self, variant: str, tiles: int, stages: int) -> None:
        self.variant = variant
        self.tiles = tiles
        self.stages = stages
        self.elapsed = 0.0
        self.startup = 0.0
        self.latencies: list[float] = []  # seconds, hops 2..stages
        self.cpu_s = 0.0
        self.server_cpu_s = 0.0
        self.failed = 0

    @property
    def hops_per_s(self) -> float:
        return self.tiles * self.stages / self.elapsed

    def lat_ms(self, q: float) -> float:
        return percentile(self.latencies, q) * 1000


async def run_variant(variant: str, server: EmbeddedServer, args, launch) -> Measure:
    """Fresh stream, inputs published, hops launched by `launch`, clock until N finals."""
    await fresh_stream(server.url)
    stream = NatsSettings().stream
    acq = "bench" + variant.replace("-", "")
    final = CHAIN[args.stages].kind
    nc = await nats.connect(server.url)
    js = nc.jetstream()
    finals = await counter(js, stream, "bench_finals", f"tp.{final}.>")
    failures = await counter(js, stream, "bench_failed", "tp.stage_failed.>")
    if not args.rate:
        await publish_inputs(js, acq, args.tiles)
    result = Measure(variant, args.tiles, args.stages)
    stop = asyncio.Event()
    cpu0, srv0 = time.process_time(), server_cpu_s(server)
    t0 = time.perf_counter()
    tasks, ready = await launch(server.url, stop, result)
    feeder = asyncio.create_task(
        publish_paced(js, acq, args.tiles, args.rate) if args.rate else asyncio.sleep(0)
    )
    try:
        deadline = t0 + args.timeout
        while await finals() < args.tiles:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{variant}: {await finals()} of {args.tiles} finals")
            if feeder.done():
                feeder.result()
            for task in tasks:
                if task.done():
                    task.result()
                    raise RuntimeError(f"{variant}: a hop stopped early")
            if not result.startup and all(r() for r in ready):
                result.startup = time.perf_counter() - t0
            await asyncio.sleep(0.02)
        result.elapsed = time.perf_counter() - t0
        result.cpu_s = time.process_time() - cpu0
        result.server_cpu_s = server_cpu_s(server) - srv0
    finally:
        feeder.cancel()
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
    result.failed = await failures()
    await nc.close()
    return result


# ------------------------------------------------------------------------ runtime variant
class NoopStage(Stage):
    """Publishes the next event of the chain and records the input's hop latency."""

    hop: int = 0
    latencies: list[float] | None = None

    def _handle(self, event: Event, ctx: Context) -> Result:
        if self.hop > 0 and self.latencies is not None:
            self.latencies.append(time.time() - event.emitted_at.timestamp())
        return Result(events=[next_event(self.hop, event, self.name)])


class ThreadNoop(NoopStage):
    def handle(self, event: Event, ctx: Context) -> Result:
        return self._handle(event, ctx)


class InlineNoop(ThreadNoop):
    blocking = False


class AsyncNoop(NoopStage):
    async def handle(self, event: Event, ctx: Context) -> Result:
        return self._handle(event, ctx)


def noop_stage_classes(stages: int, mode: str) -> list[type[NoopStage]]:
    base = {"async": AsyncNoop, "thread": ThreadNoop, "inline": InlineNoop}[mode]
    return [
        type(
            f"Noop{hop + 1}",
            (base,),
            {
                "name": f"noop{hop + 1}",
                "consumes": (CHAIN[hop],),
                "produces": (CHAIN[hop + 1],),
                "hop": hop,
            },
        )
        for hop in range(stages)
    ]


def runtime_launcher(args, mode: str):
    async def launch(url: str, stop: asyncio.Event, result: Measure):
        config = Config(nats=NatsSettings(url=url))
        tasks, ready = [], []
        for cls in noop_stage_classes(args.stages, mode):
            stage = cls(config, StageSettings(concurrency=args.concurrency))
            stage.latencies = result.latencies
            runner = StageRunner(stage, config)
            tasks.append(asyncio.create_task(runner.run(stop)))
            ready.append(runner.ready.is_set)
        return tasks, ready

    return launch


# --------------------------------------------------------------------------- bare variant
class CheckedHop:
    """One hop of `bare-checked`: the runtime's per-event work without the runtime."""

    def __init__(self, hop: int, name: str, latencies: list) -> None:
        self.hop = hop
        self.name = name
        self.accepts = {CHAIN[hop].kind}
        self.log = get_logger(stage=name, worker=name)
        self.handled = EVENTS_HANDLED.labels(name, "ok")
        self.seconds = HANDLE_SECONDS.labels(name)
        self.latencies = latencies

    async def handle(self, js, msg) -> bool:
        """Validate, build the next event with an origin, publish, ack, count, log; False
        (after a nak) if any of it failed."""
        started = time.perf_counter()
        try:
            event = decode_event(msg.data, accept=self.accepts)
            if self.hop > 0:
                self.latencies.append(time.time() - event.emitted_at.timestamp())
            token = CURRENT_ORIGIN.set(
                Origin(
                    arrived_at=arrival_time(event),
                    stage=self.name,
                    input_type=event.kind,
                    attempt=1,
                    host=HOST,
                    worker=self.name,
                    started_at=utcnow(),
                )
            )
            try:
                nxt = next_event(self.hop, event, self.name)
            finally:
                CURRENT_ORIGIN.reset(token)
            # published as the bare loop does (nats-py's `js.publish`), not the runtime's way
            await js.publish(
                nxt.subject(), nxt.to_json(), timeout=10.0, headers={MSG_ID: nxt.msg_id()}
            )
            await msg.ack()
        except Exception:
            with contextlib.suppress(Exception):
                await msg.nak()
            return False
        took = time.perf_counter() - started
        self.handled.inc()
        self.seconds.observe(took)
        self.log.info(
            "event_handled",
            **event.log_context(),
            attempt=1,
            seconds=round(took, 4),
            published=[nxt.kind],
        )
        return True


async def bare_step(hop: int, name: str, msg, state: dict, publish) -> None:
    """The bare hop's work on one message: loads, the next event as JSON, `publish(subject,
    payload, msg_id)` awaiting the PubAck, ack (a nak and a counted error if any fails)."""
    try:
        data = json.loads(msg.data)
        if hop > 0:
            state["raw_latencies"].append((time.time(), data["emitted_at"]))
        subject, msg_id, out = bare_next(hop, data, name)
        await publish(subject, json.dumps(out).encode(), msg_id)
        await msg.ack()
    except Exception:
        state["errors"] += 1
        with contextlib.suppress(Exception):
            await msg.nak()


async def bare_hop(
    url: str, hop: int, args, stop: asyncio.Event, state: dict, flavour: str = "bare"
) -> None:
    """One hop with plain nats-py: durable pull consumer, fetch, loads, publish, ack
    (`checked`: with validation, a log line and metrics; `lean`: the runtime's transport;
    see the module docstring)."""
    checked = flavour == "checked"
    name = f"{flavour}{hop + 1}"
    stream = NatsSettings().stream
    nc = await nats.connect(url, name=name)
    js = nc.jetstream()
    await js.add_consumer(
        stream,
        ConsumerConfig(
            durable_name=name,
            filter_subject=f"tp.{CHAIN[hop].kind}.>",
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=30.0,
            max_deliver=6,
            max_ack_pending=args.concurrency,
        ),
    )
    if flavour == "lean":
        await lean_hop(nc, js, hop, name, args, stop, state)
        return
    sub = await js.pull_subscribe_bind(consumer=name, stream=stream)
    state["ready"][hop] = True
    tasks: set[asyncio.Task] = set()

    checked_hop = CheckedHop(hop, name, state["latencies"])

    def publish(subject: str, payload: bytes, msg_id: str):
        return js.publish(subject, payload, timeout=10.0, headers={MSG_ID: msg_id})

    async def handle(msg) -> None:
        if checked:
            if not await checked_hop.handle(js, msg):
                state["errors"] += 1
            return
        await bare_step(hop, name, msg, state, publish)

    try:
        while not stop.is_set():
            free = args.concurrency - len(tasks)
            if free <= 0:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                continue
            try:
                msgs = await sub.fetch(batch=free, timeout=1.0)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            for msg in msgs:
                task = asyncio.create_task(handle(msg))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
    finally:
        if tasks:
            await asyncio.wait(set(tasks), timeout=30)
        with contextlib.suppress(Exception):
            await nc.flush(timeout=5)
        await nc.close()


async def lean_hop(nc, js, hop: int, name: str, args, stop: asyncio.Event, state: dict) -> None:
    """The bare hop on the runtime's transport: standing pull requests (`PullFeed`) and
    publish acknowledgements matched on one subscription (`pubacks`); nothing else."""
    tasks: set[asyncio.Task] = set()
    publisher = pubacks(js)

    def publish(subject: str, payload: bytes, msg_id: str):
        return publisher.publish(subject, payload, {MSG_ID: msg_id}, 10.0)

    async def handle(msg) -> None:
        try:
            await bare_step(hop, name, msg, state, publish)
        finally:
            await feed.release()

    def spawn(msg) -> None:
        task = asyncio.create_task(handle(msg))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    feed = PullFeed(nc, NatsSettings().stream, name, args.concurrency, on_message=spawn)
    try:
        await feed.start()
        state["ready"][hop] = True
        await feed.watch(stop)
    finally:
        await feed.stop()
        if tasks:
            await asyncio.wait(set(tasks), timeout=30)
        with contextlib.suppress(Exception):
            await nc.flush(timeout=5)
        await nc.close()


def bare_launcher(args, state: dict, flavour: str = "bare"):
    async def launch(url: str, stop: asyncio.Event, result: Measure):
        state.update(
            ready=[False] * args.stages, raw_latencies=[], latencies=result.latencies, errors=0
        )
        tasks = [
            asyncio.create_task(bare_hop(url, hop, args, stop, state, flavour))
            for hop in range(args.stages)
        ]
        ready = [lambda hop=hop: state["ready"][hop] for hop in range(args.stages)]
        return tasks, ready

    return launch


def bare_latencies(raw: list) -> list[float]:
    return [got - datetime.fromisoformat(sent).timestamp() for got, sent in raw]


# ------------------------------------------------------------------------------- reporting
def machine() -> str:
    return f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {cpu_model()}"


def _ms(m: Measure, q: float) -> str:
    return f"{m.lat_ms(q):.1f}" if m.latencies else "-"


def table(results: dict[str, list[Measure]]) -> str:
    best = {v: max(runs, key=lambda m: m.hops_per_s) for v, runs in results.items()}
    base = best.get("bare")
    head = (
        "| variant | hops/s | p50 ms | p99 ms | elapsed s | client CPU µs/hop "
        "| server CPU µs/hop | overhead |"
    )
    lines = [head, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for variant in VARIANTS:
        if variant not in best:
            continue
        m = best[variant]
        hops = m.tiles * m.stages
        overhead = "-"
        if variant != "bare" and base is not None:
            overhead = f"{(base.hops_per_s / m.hops_per_s - 1) * 100:+.0f}%"
        label = VARIANTS[variant]
        lines.append(
            f"| {label} | {m.hops_per_s:,.0f} | {_ms(m, 50)} | {_ms(m, 99)} "
            f"| {m.elapsed:.1f} | {m.cpu_s / hops * 1e6:,.0f} | {m.server_cpu_s / hops * 1e6:,.0f} "
            f"| {overhead} |"
        )
    return "\n".join(lines)


async def main_async(args) -> int:
    sizes = check_payloads(args.stages)
    work = Path(tempfile.mkdtemp(prefix="tp-runtime-bench-"))
    log_path = Path(args.log_file) if args.log_file else work / "runtime.log"
    log_stream = open(log_path, "w")  # noqa: SIM115 - lives for the whole run
    configure_logging("info", json_format=True, stream=log_stream)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}: choose from {list(VARIANTS)}")
    results: dict[str, list[Measure]] = {v: [] for v in variants}
    state: dict = {}
    server = EmbeddedServer(work / "nats").start()
    print(
        f"tiles={args.tiles} stages={args.stages} concurrency={args.concurrency} "
        f"repeat={args.repeat}; nats-server at {server.url}, "
        f"store {work}; payload bytes per kind {sizes}",
        flush=True,
    )
    try:
        for rep in range(args.repeat):
            order = variants if rep % 2 == 0 else variants[::-1]
            for variant in order:
                if variant in ("bare", "bare-lean"):
                    launch = bare_launcher(args, state, variant.removeprefix("bare-"))
                    m = await run_variant(variant, server, args, launch)
                    m.latencies = bare_latencies(state["raw_latencies"])
                    m.failed += state["errors"]
                elif variant == "bare-checked":
                    launch = bare_launcher(args, state, "checked")
                    m = await run_variant(variant, server, args, launch)
                    m.failed += state["errors"]
                else:
                    mode = {"runtime-async": "async", "runtime-thread": "thread"}.get(
                        variant, "inline"
                    )
                    launch = runtime_launcher(args, mode)
                    m = await run_variant(variant, server, args, launch)
                results[variant].append(m)
                print(
                    f"  run {rep + 1} {variant:13s}: {m.elapsed:6.2f} s, "
                    f"{m.hops_per_s:8,.0f} hops/s (start-up {m.startup * 1000:.0f} ms, "
                    f"failures {m.failed})",
                    flush=True,
                )
    finally:
        server.stop()
        log_stream.close()
        log_bytes = log_path.stat().st_size
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(table(results))
    print()
    print(
        "hops/s: tiles x stages / seconds from launching the hops until the last final event\n"
        "  is in the stream (inputs published beforehand; start-up of the hops included).\n"
        "p50/p99: per hop, from `emitted_at` of an event (stamped by the upstream handler as it\n"
        "  builds the event, before publishing) to the downstream handler receiving it (after\n"
        "  fetch and decoding/validation), for hops 2..S, under the full load of the run (so\n"
        "  queueing between hops is included); hop 1 is left out, its input is the backlog.\n"
        "client CPU: this process (all hops, both asyncio and handler threads); server CPU:\n"
        "  nats-server. Best of the repeats per variant; overhead = bare hops/s / runtime\n"
        f"  hops/s - 1. Runtime JSON log: {log_bytes:,} bytes"
        f"{'' if args.keep or args.log_file else ' (temp dir removed; --keep keeps it)'}."
    )
    if args.rate:
        print(
            f"--rate {args.rate:g}: the inputs were published at that rate during the run (the\n"
            "  publisher's CPU is in every row), so hops/s is bounded by it: compare latency\n"
            "  and CPU per hop, and hop 1 is no backlog."
        )
    print(f"machine: {machine()}; Python {platform.python_version()}")
    bad = sum(m.failed for runs in results.values() for m in runs)
    return 1 if bad else 0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiles", type=int, default=5000, help="input events (default 5000)")
    parser.add_argument(
        "--stages", type=int, default=6, help=f"hops in the chain, 1..{MAX_STAGES} (default 6)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=16, help="in-flight handlers per hop (default 16)"
    )
    parser.add_argument(
        "--repeat", type=int, default=2, help="runs per variant, order alternating (default 2)"
    )
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}"
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="publish the inputs at this many per second during the run instead of all "
        "beforehand (for latency below saturation; default: beforehand)",
    )
    parser.add_argument("--log-file", default="", help="runtime JSON log (default: temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (store, log)")
    parser.add_argument("--timeout", type=float, default=600.0, help="per run, seconds")
    args = parser.parse_args(argv)
    if not 1 <= args.stages <= MAX_STAGES:
        parser.error(f"--stages must be 1..{MAX_STAGES}")
    if args.tiles < 1 or args.concurrency < 1 or args.repeat < 1:
        parser.error("--tiles, --concurrency and --repeat must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    raise SystemExit(main())
