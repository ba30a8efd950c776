"""Replay with the plain nats tooling (issue 24), proven with an independent client.

`tests/node/natsctl.mjs` does what an operator does with the `nats` CLI (pause, resume,
reset, consumer info, stream view, KV put/del) with the official JavaScript packages
(`@nats-io/transport-node`, `@nats-io/jetstream`, pinned in `tests/node/package-lock.json`,
installed from the npm registry once per test session), while tilepipe's services (nats-py)
run against the same real nats-server.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest

from messages import TileArrived, TileConverted, TileCoord, decode_event
from services.core.config import Config, StageSettings
from services.core.manifest import dump_manifest
from services.io.atomic import BASIS_ATTR, write_atomically, zarr_attrs
from services.io.layout import products_path
from services.local.simulate import simulate, small_manifest, write_manifest
from services.ops import control as ops
from services.runtime.bus import MSG_ID, publish_event
from services.stages import stage_for, stage_settings
from services.stages.convert import Convert
from services.stages.process import Process
from services.stages.stitch import Stitch
from tests.conftest import pipeline, running_stage, stream_messages, tilepipe, wait_for
from tests.stages_for_tests import ConvertLike, arrived

NODE_DIR = Path(__file__).resolve().parent / "node"
STREAM = "TILEPIPE"
STAGES = [Convert, Process, Stitch]
WORK = ("tile_converted", "tile_processed", "pair_aligned", "slice_stitched")


@pytest.fixture(scope="session")
def natsctl():
    """`natsctl(url, *args)`: run the JS client, return its JSON output (a list for `view`)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if npm is None or node is None:
        pytest.skip("npm/node not installed: the independent JS client cannot be installed")
    lock = NODE_DIR / "package-lock.json"
    marker = NODE_DIR / "node_modules" / ".package-lock.json"
    if not marker.exists() or marker.stat().st_mtime < lock.stat().st_mtime:
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=NODE_DIR,
            check=True,
            timeout=300,
        )

    def run(url: str, *args: str):
        proc = subprocess.run(
            [node, str(NODE_DIR / "natsctl.mjs"), url, *map(str, args)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
        return lines if args[0] == "view" else lines[0]

    return run


async def ctl(natsctl, config, *args):
    return await asyncio.to_thread(natsctl, config.nats.url, *args)


def test_reset_support_by_server_version():
    assert ops.reset_supported("2.15.1") and ops.reset_supported("v2.14.0")
    assert not ops.reset_supported("2.11.4") and not ops.reset_supported("2.10")
    assert not ops.reset_supported("unknown")


async def test_reset_rewinds_a_running_stage_for_the_cli_and_the_js_client(
    config, js, natsctl, tmp_path
):
    """The reset's request and response as the server binary has them, from both clients; the
    running stage gets the rewound deliveries with no restart, its standing pull requests
    survive, and `tilepipe replay --from-seq / --since` rewinds as `nats consumer reset`."""
    marks = tmp_path / "marks"
    stage = ConvertLike(config, StageSettings(options={"marker_dir": str(marks)}))

    def handled() -> int:
        return sum(len(p.read_text().splitlines()) for p in marks.glob("done-*"))

    async with running_stage(stage, config):
        seqs = [
            (await js.publish(arrived(0, c).subject(), arrived(0, c).to_json())).seq
            for c in range(5)
        ]
        await wait_for(lambda: handled() == 5)
        await asyncio.sleep(0.3)  # the runner's pull request for its free slot stands again
        info = await ctl(natsctl, config, "info", STREAM, "convert_like")
        assert info["num_pending"] == 0 and info["ack_floor"]["stream_seq"] == seqs[-1]
        assert info["num_waiting"] >= 1  # a standing pull request

        done = await ctl(natsctl, config, "reset", STREAM, "convert_like", seqs[2])
        assert done["type"] == "io.nats.jetstream.api.v1.consumer_reset_response"
        assert done["reset_seq"] == seqs[2] and done["ack_floor"]["stream_seq"] == seqs[2] - 1
        await wait_for(lambda: handled() == 8)  # inputs 3, 4, 5 again, without a restart
        info = await js.consumer_info(STREAM, "convert_like")
        assert info.ack_floor.stream_seq == seqs[-1] and info.num_ack_pending == 0
        assert info.delivered.consumer_seq == 3  # the delivery sequence restarts at 1
        assert sorted(p.name for p in marks.glob("done-*") if p.read_text().count("\n") == 2) == [
            f"done-m0-r0-c{c}" for c in (2, 3, 4)
        ]

        # a targeted replay (5 redo messages), then a rewind to the start: the handled redo
        # messages are purged first, so only the 5 inputs come again, not 10
        sent = await ops.replay(js, STREAM, "convert_like", ["tile_arrived"], "ops")
        assert len(sent) == 5
        await wait_for(lambda: handled() == 13)
        await wait_for(lambda: _acked_all(js, "convert_like"))
        proc = await asyncio.to_thread(
            tilepipe, "replay", "convert_like", "--from-seq", str(seqs[0]), config=config
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "removed 5 targeted replays" in proc.stdout, proc.stdout
        assert f"stream sequence {seqs[0]}" in proc.stdout
        await wait_for(lambda: handled() == 18)
        assert await stream_messages(js, "tp.redo_convert_like.>") == []

        between = datetime.now(UTC)
        await asyncio.sleep(0.05)
        late = (await js.publish(arrived(1, 0).subject(), arrived(1, 0).to_json())).seq
        await wait_for(lambda: handled() == 19)
        proc = await asyncio.to_thread(
            tilepipe, "replay", "convert_like", "--since", between.isoformat(), config=config
        )
        assert proc.returncode == 0 and f"stream sequence {late}" in proc.stdout, proc.stdout
        await wait_for(lambda: handled() == 20)
        proc = await asyncio.to_thread(
            tilepipe,
            "replay",
            "convert_like",
            "--since",
            "2999-01-01T00:00:00+00:00",
            config=config,
        )
        assert proc.returncode == 0 and "nothing to replay" in proc.stdout, proc.stdout

        proc = await asyncio.to_thread(
            tilepipe, "replay", "no_such", "--from-seq", "1", config=config
        )
        assert proc.returncode == 2 and "no such stage consumer" in proc.stdout
        proc = await asyncio.to_thread(tilepipe, "replay", "convert_like", config=config)
        assert proc.returncode == 2 and "--from-seq" in proc.stdout
        await asyncio.sleep(0.5)
        assert handled() == 20


async def test_a_delivery_in_flight_during_a_reset_finishes_and_comes_again(config, js, tmp_path):
    """The runtime's in-flight bookkeeping survives a reset: the delivery being handled when
    the consumer is rewound over it finishes (its acknowledgement is for a state the server
    cleared), the input is delivered again, and the consumer ends with nothing pending."""
    marks = tmp_path / "marks"
    options = {"marker_dir": str(marks), "sleep_s": 1.0}
    stage = ConvertLike(config, StageSettings(ack_wait_s=3, options=options))

    def done() -> dict[str, int]:
        return {p.name[5:]: len(p.read_text().splitlines()) for p in marks.glob("done-*")}

    async with running_stage(stage, config):
        seqs = [
            (await js.publish(arrived(0, c).subject(), arrived(0, c).to_json())).seq
            for c in range(3)
        ]
        await wait_for(lambda: (marks / "start-m0-r0-c0").exists())
        assert done() == {}  # c0 is in flight
        at, _ = await ops.reset(js, STREAM, "convert_like", seqs[0])
        assert at == seqs[0]
        await wait_for(lambda: sum(done().values()) == 4, timeout=30)
        await wait_for(lambda: _acked_all(js, "convert_like"), timeout=30)
        assert done() == {"m0-r0-c0": 2, "m0-r0-c1": 1, "m0-r0-c2": 1}
        info = await js.consumer_info(STREAM, "convert_like")
        assert info.ack_floor.stream_seq == seqs[-1] and info.num_redelivered == 0


async def test_command_stage_runs_its_program_again_only_for_changed_inputs(config, js, tmp_path):
    """A `command` stage records its output's basis: a reset does not run the program for an
    unchanged input; a recomputed input (another basis) and a targeted replay do."""
    runs = tmp_path / "runs.txt"
    options = {
        "consumes": "tile_converted",
        "output": "{acq}/qc/{tile}.txt",
        "command": ["sh", "-c", f"echo {{tile}} >> {runs}; echo {{tile}} > {{output}}"],
    }
    cfg = Config.model_validate(
        {**config.model_dump(), "stages": {"qc": {"impl": "command", "options": options}}}
    )
    stage = stage_for(cfg, "qc")(cfg, stage_settings(cfg, "qc"), name="qc")

    def ran() -> list[str]:
        return runs.read_text().split() if runs.exists() else []

    def converted(col: int, basis: str) -> TileConverted:
        return TileConverted(
            acq="ops",
            tile=TileCoord(slice=0, row=0, col=col),
            path=f"ops/converted/t{col}.zarr",
            raw_path=f"s0/t{col}.nii",
            shape=[1, 2, 3],
            dtype="uint16",
            basis=basis,
        )

    async with running_stage(stage, cfg):
        for col in (0, 1):
            await publish_event(js, converted(col, "b1"))
        await wait_for(lambda: len(ran()) == 2)
        await wait_for(lambda: _acked_all(js, "qc"))
        await ops.reset(js, STREAM, "qc", 1)
        await asyncio.sleep(0.5)
        await wait_for(lambda: _acked_all(js, "qc"))
        assert sorted(ran()) == ["m0-r0-c0", "m0-r0-c1"]  # both skipped on the reset
        await publish_event(js, converted(0, "b2"))  # recomputed upstream: a new event
        await wait_for(lambda: len(ran()) == 3)
        await ops.replay(js, STREAM, "qc", ["tile_converted"], "ops")
        await wait_for(lambda: len(ran()) == 6)  # the targeted replay: all three events
        await wait_for(lambda: _acked_all(js, "qc"))
        assert sorted(ran()) == ["m0-r0-c0"] * 4 + ["m0-r0-c1"] * 2


async def _acked_all(js, name: str) -> bool:
    info = await js.consumer_info(STREAM, name)
    return info.num_pending == 0 and info.num_ack_pending == 0


async def kinds_by_tile(js, kind: str) -> Counter:
    """How many `kind` events each (acq, slice, tile-or-mosaic token) has in the log."""
    found = Counter()
    for m in await stream_messages(js, f"tp.{kind}.>"):
        _tp, _kind, acq, slice_token, token = m.subject.split(".")[:5]
        found[(acq, slice_token, token)] += 1
    return found


async def snapshot(js) -> dict[str, Counter]:
    return {kind: await kinds_by_tile(js, kind) for kind in WORK}


async def drained(natsctl, config) -> bool:
    """Every stage's consumer has nothing waiting and nothing in progress (the JS client)."""
    for name in ("convert", "process", "stitch"):
        info = await ctl(natsctl, config, "info", STREAM, name)
        if info["num_pending"] or info["num_ack_pending"]:
            return False
    return True


async def quiet(natsctl, config, js, timeout: float = 60) -> dict[str, Counter]:
    """Wait until every consumer is drained and the log has stopped growing."""
    last = None
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        await wait_for(lambda: drained(natsctl, config), timeout=timeout)
        now = await snapshot(js)
        if now == last:
            return now
        assert asyncio.get_running_loop().time() < deadline, "the log kept growing"
        last = now
        await asyncio.sleep(1.0)


def new(after: dict[str, Counter], before: dict[str, Counter]) -> dict[str, Counter]:
    return {kind: after[kind] - before[kind] for kind in WORK}


async def test_js_client_pauses_holds_and_resets_running_services_calibration_fix(
    config, js, natsctl
):
    """Every plain-nats row of the operator table, done by the JS client against running
    services, and a calibration fix replayed from the CLI recomputing exactly what changed."""
    started = datetime.now(UTC)
    paths = {}
    for acq in ("calA", "calB"):
        manifest = small_manifest(acq, slices=1, rows=2, cols=2, alines=48, bscans=48, settle_s=0.2)
        paths[acq] = (write_manifest(manifest, config.roots.raw / acq), manifest)
    tiles = {acq: {f"m0-r{r}-c{c}" for r in range(2) for c in range(2)} for acq in paths}

    async with pipeline(config, js, STAGES):
        await asyncio.to_thread(simulate, *paths["calA"], 0.0)
        await wait_for(lambda: kinds_by_tile(js, "slice_stitched"), timeout=90)

        # hold calB everywhere (nats kv put tp-holds calB held) and pause convert
        await ctl(natsctl, config, "kv-put", "tp-holds", "calB", "held")
        paused = await ctl(natsctl, config, "pause", STREAM, "convert", 600)
        assert paused["paused"] is True
        await asyncio.to_thread(simulate, *paths["calB"], 0.0)

        async def backlog() -> bool:
            info = await ctl(natsctl, config, "info", STREAM, "convert")
            return info["num_pending"] == 4 and info["paused"] is True

        await wait_for(backlog, timeout=30)  # `nats consumer info`: the paused backlog
        await asyncio.sleep(1.0)
        assert not any(k[0] == "calB" for k in await kinds_by_tile(js, "tile_converted"))

        # resume: convert takes calB's inputs, and parks them (calB is held)
        resumed = await ctl(natsctl, config, "resume", STREAM, "convert")
        assert resumed["paused"] is False

        async def parked():
            held = await ctl(natsctl, config, "view", STREAM, "tp.hold_convert.calB.>")
            return len(held) == 4

        await wait_for(parked, timeout=30)
        assert not any(k[0] == "calB" for k in await kinds_by_tile(js, "tile_converted"))

        # release with the plain tools (README): delete the hold, then rewind each stage that
        # parked inputs to the first of them (`Nats-Msg-Id` hold:<stage>:<original seq>)
        arrivals = await ctl(natsctl, config, "view", STREAM, "tp.tile_arrived.calB.>")
        parked_by: dict[str, list[int]] = {}
        for m in await ctl(natsctl, config, "view", STREAM, "tp.*.calB.>"):
            if m["subject"].startswith("tp.hold_"):
                _hold, stage, seq = m["headers"][MSG_ID].split(":")
                parked_by.setdefault(stage, []).append(int(seq))
        assert sorted(parked_by["convert"]) == [m["seq"] for m in arrivals]
        assert set(parked_by) <= {"convert", "stitch"}  # stitch parks calB's acq_finished
        await ctl(natsctl, config, "kv-del", "tp-holds", "calB")
        await asyncio.sleep(0.5)  # every stage has seen the release
        for stage, seqs in parked_by.items():
            done = await ctl(natsctl, config, "reset", STREAM, stage, min(seqs))
            assert done["reset_seq"] == min(seqs)
        before = await quiet(natsctl, config, js)
        for kind in ("tile_converted", "tile_processed"):
            assert before[kind] == Counter({("calA", "0", t): 1 for t in tiles["calA"]}) + Counter(
                {("calB", "0", t): 1 for t in tiles["calB"]}
            ), kind
        assert set(before["slice_stitched"]) == {("calA", "0", "m0"), ("calB", "0", "m0")}

        # the event log, failures and one tile's story, as `nats stream view` shows them
        log = await ctl(natsctl, config, "view", STREAM, "tp.*.calA.>")
        assert len(log) == len(await stream_messages(js, "tp.*.calA.>"))
        outside = TileArrived(  # a tile outside calA's 2x2 lattice: convert refuses it
            acq="calA",
            tile=TileCoord(slice=0, row=9, col=9),
            path="calA/nowhere.nii",
            manifest="calA/manifest.toml",
            size_bytes=1,
            completed_at=datetime.now(UTC),
        )
        await publish_event(js, outside)

        async def failed():
            return await ctl(natsctl, config, "view", STREAM, "tp.stage_failed.calA.>")

        failures = await wait_for(failed, timeout=30)
        assert [(m["subject"], m["data"]["stage"]) for m in failures] == [
            ("tp.stage_failed.calA.0.m0-r9-c9.convert", "convert")
        ]
        listed = await asyncio.to_thread(tilepipe, "failed", "calA", config=config)
        assert "r9-c9" in listed.stdout and "convert" in listed.stdout, listed.stdout
        story = await ctl(natsctl, config, "view", STREAM, "tp.*.calA.0.m0-r1-c1")
        assert [m["data"]["type"] for m in story] == [
            "tile_arrived",
            "tile_converted",
            "tile_processed",
        ]

        # the parked copies are still in the log: `tilepipe resume --acq` sends them back
        # (tagged as a repair, which only fills in) and they are skipped, adding no event
        proc = await asyncio.to_thread(tilepipe, "resume", "--acq", "calB", config=config)
        parked = sum(map(len, parked_by.values()))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"{parked} held inputs sent back" in proc.stdout, proc.stdout
        assert await quiet(natsctl, config, js) == before

        # a reset of every stage without a change recomputes nothing and adds no event
        products = {
            (acq, t): config.roots.work
            / products_path(acq, decode_event(m.data).tile)
            / "zarr.json"
            for acq in paths
            for m in await stream_messages(js, f"tp.tile_processed.{acq}.>")
            for t in [m.subject.split(".")[-1]]
        }
        stamps = {k: p.stat().st_mtime_ns for k, p in products.items()}
        for name in ("convert", "process", "stitch"):
            await ctl(natsctl, config, "reset", STREAM, name, 1)
        await asyncio.sleep(1.0)
        after = await quiet(natsctl, config, js)
        assert after == before
        assert {k: p.stat().st_mtime_ns for k, p in products.items()} == stamps

        # a calibration fix in calA, replayed from the CLI: exactly calA is recomputed
        fixed = paths["calA"][1].model_copy(
            update={
                "calibration": paths["calA"][1].calibration.model_copy(update={"autocorr_bins": 30})
            }
        )
        write_atomically(paths["calA"][0], dump_manifest(fixed))
        old_basis = {t: zarr_attrs(p.parent)[BASIS_ATTR] for t, p in products.items()}
        proc = await asyncio.to_thread(
            tilepipe, "replay", "convert", "--since", started.isoformat(), config=config
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr

        async def recomputed():
            now = new(await snapshot(js), before)
            return sum(now["tile_processed"].values()) == 4 and now["slice_stitched"]

        await wait_for(recomputed, timeout=90)
        final = await quiet(natsctl, config, js)
    changed = new(final, before)
    affected = Counter({("calA", "0", t): 1 for t in tiles["calA"]})
    assert changed["tile_converted"] == affected
    assert changed["tile_processed"] == affected
    # every pair of calA's 2x2 mosaic aligned again (once per recomputed tile: 2 each), none
    # of calB's; calA's mosaic re-fused (once per recomputed tile as they come), calB's not
    pairs = {"m0-r0-c0-m0-r0-c1", "m0-r0-c0-m0-r1-c0", "m0-r0-c1-m0-r1-c1", "m0-r1-c0-m0-r1-c1"}
    assert set(changed["pair_aligned"]) == {("calA", "0", p) for p in pairs}
    assert set(changed["slice_stitched"]) == {("calA", "0", "m0")}
    assert 1 <= changed["slice_stitched"][("calA", "0", "m0")] <= 4
    for (acq, tile), path in products.items():
        basis = zarr_attrs(path.parent)[BASIS_ATTR]
        assert (basis != old_basis[(acq, tile)]) == (acq == "calA"), (acq, tile)
        assert (path.stat().st_mtime_ns != stamps[(acq, tile)]) == (acq == "calA")

    # no duplicate event anywhere in the log: every de-duplication id once
    ids = Counter(
        (m.headers or {}).get(MSG_ID)
        for m in await stream_messages(js, "tp.>")
        if not m.subject.startswith("tp.attempt.")
    )
    assert [i for i, n in ids.items() if n > 1] == []
