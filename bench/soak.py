"""Soak: a steady simulated acquisition for N minutes through every service run as processes
(embedded nats-server and supervised `tilepipe run` children, as `tilepipe up` starts them).

Every `--sample-s` seconds it records each process's resident memory (VmRSS from
/proc/<pid>/status, nats-server included) and each stage consumer's backlog (`num_pending`
waiting + `num_ack_pending` in progress), then prints per service RSS first / max / last and
the slope after the warm-up (MB/min), the largest backlog per stage, and the tiles/s written
and sustained end to end.

The raw tiles are generated once before the clock starts (two slices' worth of the
simulator's data, reused slice after slice) and written at `--rate` tiles/s with the
simulator's own writer: generating the phantom costs about as much CPU as processing it.

    python bench/soak.py --minutes 10 --rate 1.0
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.harness import supervised, work_roots  # noqa: E402
from services.core.config import Config, StageSettings, WatcherSettings  # noqa: E402
from services.io.rawio import encode_tile  # noqa: E402
from services.local.simulate import (  # noqa: E402
    PhantomParams,
    Simulator,
    small_manifest,
    write_manifest,
    write_tile_file,
)

STAGES = ("convert", "process", "stitch", "register")
WARM_UP = 0.2  # fraction of the run left out of the memory slope


def rss_mb(pid: int) -> float:
    """Resident set size of a process in MiB, from /proc (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


@dataclass
class Sample:
    t: float  # seconds since the first tile was written
    rss: dict[str, float]
    backlog: dict[str, int]  # waiting + in progress, per stage
    processed: int


@dataclass
class SoakReport:
    minutes: float
    rate: float
    tiles: int
    slices: int
    written_s: float = 0.0
    done_s: float = 0.0  # first write -> last tile processed and last slice registered
    processed: int = 0
    stitched: int = 0
    registered: int = 0
    failed: int = 0
    restarts: list[str] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.processed >= self.tiles and self.registered >= self.slices

    def processed_s(self) -> float:
        """First sample at which every tile was processed (else the end of the run)."""
        done = [x.t for x in self.samples if x.processed >= self.tiles]
        return done[0] if done else self.done_s

    def backlog_max(self) -> dict[str, int]:
        return {s: max((x.backlog.get(s, 0) for x in self.samples), default=0) for s in STAGES}

    def memory(self) -> dict[str, tuple[float, float, float, float]]:
        """Per process: first, max, last MiB and the slope after the warm-up (MiB/min)."""
        out = {}
        names = self.samples[0].rss if self.samples else {}
        for name in names:
            series = [(x.t, x.rss[name]) for x in self.samples if x.rss.get(name)]
            if not series:
                continue
            steady = series[int(len(series) * WARM_UP) :] or series
            out[name] = (series[0][1], max(v for _, v in series), series[-1][1], _slope(steady))
        return out

    def table(self) -> str:
        lines = [
            f"soak: {self.minutes:g} min at {self.rate:g} tiles/s: {self.tiles} tiles "
            f"({self.slices} slices) written in {self.written_s:.0f} s, "
            + (
                f"all done after {self.done_s:.0f} s"
                if self.complete
                else f"NOT all done: stopped after {self.done_s:.0f} s with work left"
            ),
            f"  processed {self.processed}/{self.tiles}, stitched {self.stitched}, registered "
            f"{self.registered}/{self.slices}, stage_failed {self.failed}, restarts "
            f"{len(self.restarts)}",
            f"  sustained: {self.processed / max(self.processed_s(), 1e-9):.2f} tiles/s "
            f"processed (written at {self.tiles / max(self.written_s, 1e-9):.2f} tiles/s)",
            "",
            f"{'service':<12}{'RSS first':>11}{'max':>9}{'last':>9}{'slope MB/min':>14}",
        ]
        for name, (first, peak, last, slope) in self.memory().items():
            lines.append(f"{name:<12}{first:>11.1f}{peak:>9.1f}{last:>9.1f}{slope:>14.2f}")
        lines += ["", f"{'stage':<12}{'backlog max':>12}"]
        lines += [f"{s:<12}{n:>12}" for s, n in self.backlog_max().items()]
        return "\n".join(lines)


def _slope(series: list[tuple[float, float]]) -> float:
    """Least-squares slope in MiB per minute."""
    if len(series) < 2:
        return 0.0
    ts = [t for t, _ in series]
    vs = [v for _, v in series]
    mt, mv = statistics.fmean(ts), statistics.fmean(vs)
    var = sum((t - mt) ** 2 for t in ts)
    return 60.0 * sum((t - mt) * (v - mv) for t, v in series) / var if var else 0.0


def soak_config(work: Path, settle_s: float = 0.3) -> Config:
    return Config(
        roots=work_roots(work),
        watcher=WatcherSettings(settle_s=settle_s),
        stages={name: StageSettings(concurrency=1) for name in STAGES},
    )


def payloads(manifest, params: PhantomParams) -> dict[tuple[int, int, int], bytes]:
    """Raw file bytes of two slices, keyed by (slice % 2, row, col)."""
    lattice = manifest.lattice.model_copy(update={"slices": min(2, manifest.lattice.slices)})
    two = manifest.model_copy(update={"lattice": lattice})
    sim = Simulator(two, params)
    return {
        (c.slice, c.row, c.col): encode_tile(sim.tile_raw(sim.truth.tile(c)), manifest.raw)
        for c in two.coords()
    }


def writer(manifest_path: Path, manifest, data: dict, rate: float, start: float) -> None:
    """Write every tile of the lattice, tile i at `start + i / rate` (monotonic clock)."""
    for i, c in enumerate(manifest.coords()):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        payload = data[(c.slice % 2, c.row, c.col)]
        write_tile_file(manifest_path.parent / manifest.path_of(c), payload)


async def _count(js, stream: str, subjects: str) -> int:
    info = await js.stream_info(stream, subjects_filter=subjects)
    return sum((info.state.subjects or {}).values())


async def soak(
    minutes: float,
    rate: float,
    work: Path,
    sample_s: float = 5.0,
    rows: int = 3,
    cols: int = 3,
    size: tuple[int, int, int] = (48, 48, 512),
    drain_timeout_s: float = 300.0,
    progress=print,
) -> SoakReport:
    """Run the soak; every process is stopped before it returns."""
    per_slice = rows * cols
    slices = max(1, math.ceil(minutes * 60 * rate / per_slice))
    alines, bscans, samples = size
    manifest = small_manifest(
        "soak",
        slices=slices,
        rows=rows,
        cols=cols,
        alines=alines,
        bscans=bscans,
        samples=samples,
        settle_s=0.3,
    )
    report = SoakReport(minutes, rate, manifest.tiles, slices)
    services = ["watcher", *STAGES]
    async with supervised(soak_config(work), work, services, "tilepipe-soak") as pipeline:
        js, stream = pipeline.js, pipeline.config.nats.stream
        progress(f"generating the raw data of {min(2, slices)} slices ...")
        data = await asyncio.to_thread(payloads, manifest, PhantomParams(scatterers=8))
        path = write_manifest(manifest, pipeline.config.roots.raw / "soak")
        t0 = next_sample = time.monotonic()
        thread = threading.Thread(target=writer, args=(path, manifest, data, rate, t0), daemon=True)
        thread.start()
        while True:
            pipeline.supervisor.check(report.restarts.append)
            now = time.monotonic()
            if now >= next_sample:
                next_sample += sample_s
                rss = {c.name: rss_mb(c.proc.pid) for c in pipeline.supervisor.children if c.proc}
                server = pipeline.server.proc if pipeline.server else None
                rss["nats-server"] = rss_mb(server.pid) if server else 0.0
                backlog = {}
                for stage in STAGES:
                    info = await js.consumer_info(stream, stage)
                    backlog[stage] = (info.num_pending or 0) + (info.num_ack_pending or 0)
                processed = await _count(js, stream, "tp.tile_processed.soak.>")
                report.samples.append(Sample(now - t0, rss, backlog, processed))
                progress(
                    f"  t={now - t0:6.0f}s processed {processed:5d}/{report.tiles} backlog "
                    + " ".join(f"{s}={n}" for s, n in backlog.items())
                    + f" rss(MB) {' '.join(f'{k}={v:.0f}' for k, v in rss.items())}"
                )
            if not thread.is_alive() and not report.written_s:
                report.written_s = time.monotonic() - t0
            report.processed = await _count(js, stream, "tp.tile_processed.soak.>")
            report.registered = await _count(js, stream, "tp.slice_registered.soak.>")
            if report.processed >= report.tiles and report.registered >= slices:
                report.done_s = time.monotonic() - t0
                break
            if report.written_s and now - t0 - report.written_s > drain_timeout_s:
                progress("drain timeout: stopping with work left")
                report.done_s = now - t0
                break
            await asyncio.sleep(0.5)
        report.stitched = await _count(js, stream, "tp.slice_stitched.soak.>")
        report.failed = await _count(js, stream, "tp.stage_failed.soak.>")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=1.0, help="tiles per second")
    parser.add_argument("--sample-s", type=float, default=5.0)
    parser.add_argument("--rows", type=int, default=3)
    parser.add_argument("--cols", type=int, default=3)
    parser.add_argument("--tile", default="48x48x512", help="A-lines x B-lines x samples")
    parser.add_argument("--work", type=Path, default=None, help="default: a temporary directory")
    args = parser.parse_args(argv)
    size = tuple(int(v) for v in args.tile.split("x"))
    with tempfile.TemporaryDirectory(prefix="tilepipe-soak-") as tmp:
        work = args.work or Path(tmp)
        report = asyncio.run(
            soak(args.minutes, args.rate, work, args.sample_s, args.rows, args.cols, size)
        )
    print()
    print(report.table())
    return 0 if report.complete and not report.failed else 1


if __name__ == "__main__":
    sys.exit(main())
