"""Cost of one delivery in the stage runtime, without NATS: where the overhead goes.

`bench/runtime_bench.py` measures the runtime against bare nats-py end to end, but on a
shared VM its throughput figures drift by up to 2x between runs. This script isolates the
Python work of one hop (hop 2 of that benchmark's chain: tile_converted -> tile_processed)
on a real `nats.aio.msg.Msg` (JetStream ack subject included) with a JetStream context and
client that answer at once, so no socket or server time is in the figures:

* ``bare``: `json.loads`, the next event as a dict, `json.dumps`, publish, ack (the bare
  nats-py hop of runtime_bench.py);
* ``bare-checked``: the bare hop plus the work the runtime is asked to do per event:
  validation, the next event as a model with its origin, its JSON and msg id, a counter, a
  histogram and one JSON log line (`CheckedHop` of runtime_bench.py);
* ``runtime``: `StageRunner.deliver` with an async no-op stage (its transport a
  `NatsTransport` over the instant JetStream context);
* ``runtime -<part>``: the same with one part switched off (`log`: the bound logger and the
  `event_handled` line; `monitor`: end-to-end latency and tiles-done; `metrics`: the
  handled/published counters and the handle-time histogram), to attribute its cost.

Figures: CPU µs per delivery (best of the rounds), and with ``--callgrind`` also the number
of instructions per delivery counted by valgrind (repeatable on a noisy machine; a few
minutes per variant).

    python bench/runtime_hotpath.py [--deliveries 20000] [--rounds 5] [--callgrind]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nats.aio.msg import Msg
from nats.js.api import PubAck
from nats.nuid import NUID

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import runtime_bench as rb

from messages.events import Origin, utcnow
from services.core.config import Config, NatsSettings, StageSettings
from services.core.logs import configure_logging
from services.runtime.bus import pubacks
from services.runtime.runner import StageRunner
from services.runtime.transport import NatsTransport

VARIANTS = (
    "bare",
    "bare-checked",
    "runtime",
    "runtime -log",
    "runtime -monitor",
    "runtime -metrics",
)
HOP = 1  # tile_converted -> tile_processed


PUBACK = b'{"stream":"TILEPIPE","seq":1}'


class InstantClient:
    """A connection that takes every publish at once: an ack (a core publish) goes nowhere,
    a JetStream publish (one with a reply subject, from `services.runtime.bus.PubAcks`) is answered
    with a PubAck before `publish` returns, as if the server had stored it."""

    _inbox_prefix = bytearray(b"_INBOX")
    _nuid = NUID()
    is_closed = False

    def __init__(self) -> None:
        self.pubacks = None

    async def subscribe(self, subject, cb=None):
        return None

    async def publish(self, subject, payload=b"", reply="", headers=None):
        if reply and self.pubacks is not None:
            await self.pubacks._on_reply(Msg(self, subject=reply, data=PUBACK))


class InstantJetStream:
    """The JetStream context of an `InstantClient`; `publish` (the bare loop's `js.publish`)
    answers at once, reading the PubAck as nats-py does (the runtime's `PubAcks` reads the
    same reply), without nats-py's request machinery (inbox token, `wait_for`)."""

    def __init__(self, nc: InstantClient) -> None:
        self._nc = nc
        nc.pubacks = pubacks(self)

    async def publish(self, subject, payload=b"", timeout=None, headers=None):
        return PubAck.from_response(json.loads(PUBACK))


class _Off:
    """Stands in for a logger or a metric child that is switched off."""

    def bind(self, **_kw):
        return self

    def _nothing(self, *_a, **_kw) -> None:
        return None

    inc = observe = set = debug = info = warning = error = exception = _nothing


def input_payload() -> tuple[str, bytes]:
    """Subject and JSON of the hop's input, as the previous stage would have published it."""
    first = rb.first_event("hot", 5)
    origin = Origin(
        stage="noop1", input_type=first.kind, attempt=1, started_at=utcnow(), arrived_at=utcnow()
    )
    event = rb.next_event(0, first, "noop1").model_copy(update={"origin": origin})
    return event.subject(), event.to_json()


def runtime_deliver(variant: str):
    """`deliver` of a runner of the chain's second no-op stage, with parts switched off."""
    config = Config(nats=NatsSettings(url="nats://127.0.0.1:1"))
    stage = rb.noop_stage_classes(HOP + 1, "async")[HOP](config, StageSettings(concurrency=16))
    runner = StageRunner(stage, config)

    async def nothing_published(js, acq, kind):  # the stream read that seeds progress
        return set()

    runner.monitor._published = nothing_published
    if variant == "runtime -log":
        runner.log = _Off()
    elif variant == "runtime -monitor":
        runner.monitor.observed = lambda outputs, replay=None: []
    elif variant == "runtime -metrics":
        runner.m.ok = runner.m.seconds = _Off()
        runner.m.published = lambda kind: _Off()

    async def deliver(js, msg):
        if runner.transport is None:
            runner.transport = NatsTransport(js, config.nats.stream)
        await runner.deliver(msg)

    return deliver


def bare_deliver(_variant: str):
    async def deliver(js, msg):
        data = json.loads(msg.data)
        subject, msg_id, out = rb.bare_next(HOP, data, "bare2")
        payload = json.dumps(out).encode()
        await js.publish(subject, payload, timeout=10.0, headers={"Nats-Msg-Id": msg_id})
        await msg.ack()

    return deliver


def checked_deliver(_variant: str):
    hop = rb.CheckedHop(HOP, "checked2", [])

    async def deliver(js, msg):
        if not await hop.handle(js, msg):
            raise RuntimeError("bare-checked hop failed")

    return deliver


def make(variant: str):
    if variant == "bare":
        return bare_deliver(variant)
    if variant == "bare-checked":
        return checked_deliver(variant)
    return runtime_deliver(variant)


async def run(variant: str, deliveries: int, rounds: int) -> float:
    """Best CPU µs per delivery over `rounds` rounds of `deliveries` deliveries."""
    deliver = make(variant)
    subject, data = input_payload()
    nc = InstantClient()
    js = InstantJetStream(nc)

    def msg(i: int) -> Msg:
        reply = f"$JS.ACK.TILEPIPE.noop2.1.{i + 1}.{i + 1}.1764108000000000000.0"
        return Msg(nc, subject=subject, reply=reply, data=data)

    for i in range(200):  # first-use paths (metric children, monitor sync) out of the figures
        await deliver(js, msg(i))
    gc.collect()
    best = float("inf")
    for _ in range(rounds):
        msgs = [msg(i) for i in range(deliveries)]
        start = time.process_time()
        for m in msgs:
            await deliver(js, m)
        best = min(best, (time.process_time() - start) / deliveries * 1e6)
    return best


def instructions(variant: str, deliveries: int) -> int | None:
    """Instructions per delivery under valgrind (runs of N and 3N, difference / 2N)."""
    if shutil.which("valgrind") is None:
        return None
    counts = []
    for n in (deliveries, 3 * deliveries):
        proc = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                "--callgrind-out-file=/dev/null",
                sys.executable,
                __file__,
                "--one",
                variant,
                "--deliveries",
                str(n),
                "--rounds",
                "1",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        found = re.search(r"Collected : (\d+)", proc.stderr)
        if not found:
            raise RuntimeError(f"no callgrind total for {variant}: {proc.stderr[-500:]}")
        counts.append(int(found.group(1)))
    return round((counts[1] - counts[0]) / (2 * deliveries))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deliveries", type=int, default=20000, help="per round (default 20000)")
    parser.add_argument("--rounds", type=int, default=5, help="best of (default 5)")
    parser.add_argument(
        "--callgrind", action="store_true", help="also count instructions with valgrind (slow)"
    )
    parser.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)  # valgrind child
    args = parser.parse_args(argv)
    if args.deliveries < 1 or args.rounds < 1:
        parser.error("--deliveries and --rounds must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    log_dir = Path(tempfile.mkdtemp(prefix="tp-hotpath-"))
    try:
        with open(log_dir / "runtime.log", "wb") as log:
            configure_logging("info", json_format=True, stream=log)
            if args.one:
                asyncio.run(run(args.one, args.deliveries, args.rounds))
                return 0
            rows = []
            for variant in VARIANTS:
                cpu = asyncio.run(run(variant, args.deliveries, args.rounds))
                instr = instructions(variant, 500) if args.callgrind else None
                rows.append((variant, cpu, instr))
                print(f"  {variant:17s} {cpu:7.1f} µs", flush=True)
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)
    print()
    base = {v: (c, i) for v, c, i in rows}
    print("| variant | CPU µs/delivery | added to bare | instructions/delivery | added to bare |")
    print("| --- | ---: | ---: | ---: | ---: |")
    bare_cpu, bare_instr = base["bare"]
    for variant, cpu, instr in rows:
        added = "-" if variant == "bare" else f"{cpu - bare_cpu:+.1f}"
        if instr is None:
            instr_txt, instr_added = "-", "-"
        else:
            instr_txt = f"{instr:,}"
            instr_added = "-" if variant == "bare" else f"{instr - bare_instr:+,}"
        print(f"| {variant} | {cpu:.1f} | {added} | {instr_txt} | {instr_added} |")
    print()
    print(
        f"{args.deliveries} deliveries x best of {args.rounds} rounds per variant, one process;"
        " no NATS I/O (instant publish and ack).\n"
        "Instructions: valgrind callgrind, (runs of 1500 - 500 deliveries) / 1000."
        if args.callgrind
        else f"{args.deliveries} deliveries x best of {args.rounds} rounds per variant, one "
        "process; no NATS I/O (instant publish and ack). --callgrind adds instruction counts."
    )
    print(f"machine: {rb.machine()}; Python {sys.version.split()[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
