"""Security: NATS users with least privilege, TLS, metrics bind address, secrets, raw read-only.

Everything runs against real nats-server processes (with generated authorization and TLS
config), real service processes and real files.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import os
import signal
import ssl
import stat
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from typing import ClassVar

import nats
import pytest
from prometheus_client import REGISTRY

from messages import StageFailed, TileArrived, TileCoord, utcnow
from messages.events import EVENT_TYPES
from messages.subjects import STAGE_NAMED, parse_subject
from services.core.config import Config, NatsSettings, Roots, StageSettings, load_config
from services.core.errors import ConfigError
from services.local.natsauth import (
    ADMIN,
    STAGE_OUTPUTS,
    WATCHER,
    WATCHER_OUTPUTS,
    generate_passwords,
    plugin_permissions,
    render_authorization,
    render_tls,
    service_permissions,
)
from services.local.natsserver import EmbeddedServer, free_port, free_port_block, port_open
from services.runtime.bus import connect, inbox_prefix, publish_event
from services.runtime.provision import ensure_kv, ensure_stream
from services.stages import BUILTIN, stage_class
from tests.conftest import REPO, pipeline, running_stage, stream_messages, wait_for
from tests.procs import running_up
from tests.stages_for_tests import ConvertLike

PLUGIN = "convert_like"


# ---------------------------------------------------------------- the permission table
def test_permission_table_one_user_per_service_and_tight():
    table = service_permissions()
    assert set(table) == {WATCHER, ADMIN, *BUILTIN}
    assert table[ADMIN] == {"publish": [">"], "subscribe": [">"]}
    for name in BUILTIN:  # the outputs are exactly what each stage class declares
        declared = {kind.kind for kind in stage_class(name).produces}
        assert set(STAGE_OUTPUTS[name]) == declared, name
    for user, perms in table.items():
        if user == ADMIN:
            continue
        assert perms["subscribe"] == [f"_INBOX_{user}.>"], user  # its own inbox only
        for subject in perms["publish"]:
            assert subject not in (">", "tp.>", "$JS.API.>", "$JS.>"), (user, subject)
            assert "redo_" not in subject and ".DELETE." not in subject, (user, subject)
            assert "STREAM.CREATE" not in subject and "STREAM.PURGE" not in subject
    # the stream name is a parameter, not baked in
    assert all("OTHER" in s for s in service_permissions("OTHER")["convert"]["publish"][:5])


def test_docs_list_every_permission():
    text = (REPO / "docs" / "security.md").read_text()
    for user, perms in service_permissions().items():
        for subject in perms["publish"] + perms["subscribe"]:
            generic = (
                subject.replace(f".{user}.", ".<stage>.")
                .replace(f"hold_{user}", "hold_<stage>")
                .replace(f"_INBOX_{user}", "_INBOX_<user>")
            )
            generic = generic.removesuffix(f".{user}")
            generic = generic + ".<stage>" if subject.endswith(f".{user}") else generic
            assert f"`{generic}`" in text or f"`{subject}`" in text, (user, subject)


def test_render_authorization_refuses_a_user_without_permissions():
    with pytest.raises(KeyError, match="nobody"):
        render_authorization({"convert": "pw", "nobody": "pw"})


# ---------------------------------------------------------------- a server with users
def allowed_subjects(user: str, subjects: set[str]) -> set[str]:
    """The subjects (of `subjects`) a user may publish: its own kinds of events, and failure
    and attempt records in its own name only."""
    if user == WATCHER:
        kinds = set(WATCHER_OUTPUTS)
    else:
        kinds = {*STAGE_OUTPUTS.get(user, ("tile_converted",)), f"hold_{user}"}
    return {
        s
        for s in subjects
        if (p := parse_subject(s)).kind in kinds or (p.stage == user and user != WATCHER)
    }


class AuthServer:
    """A nats-server with one user per service (plus a plugin stage) and admin."""

    def __init__(self, tmp_path: Path) -> None:
        permissions = {
            **service_permissions(),
            PLUGIN: plugin_permissions(PLUGIN, ["tile_converted"]),
        }
        self.files = generate_passwords(permissions, tmp_path / "auth")
        passwords = {user: path.read_text() for user, path in self.files.items()}
        block = render_authorization(passwords, permissions=permissions)
        self.server = EmbeddedServer(tmp_path / "nats", extra_config=[block])

    def settings(self, user: str, **extra) -> NatsSettings:
        return NatsSettings(url=self.server.url, user=user, password_file=self.files[user], **extra)

    def log(self) -> str:
        return self.server.log_file.read_text(errors="replace")


@pytest.fixture
def auth(tmp_path: Path):
    server = AuthServer(tmp_path)
    server.server.start()
    yield server
    server.server.stop()


@pytest.fixture
async def admin_js(auth: AuthServer):
    nc = await connect(auth.settings(ADMIN), name="test-admin", retry_for_s=10)
    js = nc.jetstream()
    await ensure_stream(js, NatsSettings(url=auth.server.url))
    await ensure_kv(js)
    yield js
    await nc.close()


async def open_as(auth: AuthServer, user: str, errors: list[str]):
    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    return await nats.connect(
        auth.server.url,
        user=user,
        password=auth.files[user].read_text(),
        error_cb=on_error,
        allow_reconnect=False,
        inbox_prefix=inbox_prefix(user),
    )


async def test_each_service_publishes_its_own_events_only(auth, admin_js):
    users = [WATCHER, *STAGE_OUTPUTS]
    kinds = {*EVENT_TYPES, *(f"hold_{u}" for u in STAGE_OUTPUTS), "redo_convert"} - STAGE_NAMED
    for user in users:
        subjects = {f"tp.{kind}.u-{user}.0.m0-r0-c0" for kind in kinds} | {
            f"tp.{kind}.u-{user}.0.m0-r0-c0.{name}"  # failures and attempts in any stage's name
            for kind in STAGE_NAMED
            for name in STAGE_OUTPUTS
        }
        allowed = allowed_subjects(user, subjects)
        errors: list[str] = []
        nc = await open_as(auth, user, errors)
        for subject in sorted(subjects):
            await nc.publish(subject, b"{}")
        await nc.flush(timeout=5)
        forbidden = subjects - allowed
        await wait_for(lambda: len(errors) >= len(forbidden))  # noqa: B023
        await nc.close()
        refused = {e.split('"')[1] for e in errors if "permissions violation" in e}
        assert refused == forbidden, user

        async def landed(user=user):
            info = await admin_js.stream_info("TILEPIPE", subjects_filter=f"tp.*.u-{user}.>")
            return set(info.state.subjects or {})

        await wait_for(lambda: _equal(landed(), allowed))  # noqa: B023
        assert await landed() == allowed, user
        if user != WATCHER:  # its own failures and attempts, nobody else's
            assert {parse_subject(s).stage for s in allowed} == {None, user}, user
    log = auth.log()
    assert violation(log, "convert", "tp.tile_processed.u-convert.0.m0-r0-c0")
    assert violation(log, "convert", "tp.stage_failed.u-convert.0.m0-r0-c0.process")
    assert violation(log, "watcher", "tp.stage_failed.u-watcher.0.m0-r0-c0.convert")


def violation(log: str, user: str, subject: str) -> bool:
    """Whether the server logged a publish violation of `user` on `subject`."""
    return any(
        "Publish Violation" in line and f'"{subject}"' in line and user in line
        for line in log.splitlines()
    )


async def _equal(awaitable, expected) -> bool:
    return await awaitable == expected


def processed_event(i: int = 0):
    from messages.events import TileProcessed

    return TileProcessed(
        acq="forged",
        tile=TileCoord(slice=0, row=0, col=i),
        products={"db": "x/db"},
        device="cpu",
        seconds=0.0,
        producer="convert",
    )


async def test_stage_user_cannot_forge_consume_or_manage(auth, admin_js, tmp_path):
    from services.runtime.provision import ensure_consumer
    from services.stages.convert import Convert
    from services.stages.process import Process

    for name, cls in (("convert", Convert), ("process", Process)):
        await ensure_consumer(admin_js, "TILEPIPE", name, cls, StageSettings())
    errors: list[str] = []
    nc = await open_as(auth, "convert", errors)
    js = nc.jetstream(timeout=2)  # a refused API request surfaces as a timeout
    # a JetStream publish of another stage's completion event gets no ack
    with pytest.raises(nats.errors.TimeoutError):
        await publish_event(js, processed_event(), timeout=2)
    assert await stream_messages(admin_js, "tp.tile_processed.>") == []
    # its own work is fine: publish its output and read its own consumer
    ack = await publish_event(js, arrived_converted(), timeout=5)
    assert ack.stream == "TILEPIPE"
    assert (await js.consumer_info("TILEPIPE", "convert")).name == "convert"
    # another stage's consumer: no info, no messages taken
    with pytest.raises(nats.errors.TimeoutError):
        await js.consumer_info("TILEPIPE", "process")
    sub = await js.pull_subscribe_bind(consumer="process", stream="TILEPIPE")
    with pytest.raises(nats.errors.TimeoutError):
        await sub.fetch(1, timeout=2)
    info = await admin_js.consumer_info("TILEPIPE", "process")
    assert info.num_pending == 1 and info.num_ack_pending == 0  # tile_converted still queued
    assert info.delivered.stream_seq == 0
    # stream management: refused, the stream and its events stay
    for call in (js.delete_stream, js.purge_stream):
        with pytest.raises(nats.errors.TimeoutError):
            await call("TILEPIPE")
    with pytest.raises(nats.errors.TimeoutError):
        await js.delete_consumer("TILEPIPE", "process")
    assert (await admin_js.stream_info("TILEPIPE")).state.messages == 1
    # another service's replies and deliveries: its inbox cannot be subscribed to
    await nc.subscribe("_INBOX_process.>")
    await nc.flush()
    await wait_for(lambda: "_INBOX_process.>" in auth.log(), timeout=10)
    await nc.close()
    log = auth.log()
    assert any(
        "Subscription Violation" in line and "_INBOX_process.>" in line and "convert" in line
        for line in log.splitlines()
    )
    for subject in (
        "$JS.API.CONSUMER.INFO.TILEPIPE.process",
        "$JS.API.CONSUMER.MSG.NEXT.TILEPIPE.process",
        "$JS.API.STREAM.DELETE.TILEPIPE",
        "$JS.API.STREAM.PURGE.TILEPIPE",
        "$JS.API.CONSUMER.DELETE.TILEPIPE.process",
    ):
        assert violation(log, "convert", subject), subject


def arrived_converted():
    from messages.events import TileConverted

    return TileConverted(
        acq="own",
        tile=TileCoord(slice=0, row=0, col=0),
        path="own/t.zarr",
        raw_path="own/t.nii",
        shape=[1, 2, 3],
        dtype="uint16",
        producer="convert",
    )


def arrived(i: int, acq: str = "sec") -> TileArrived:
    return TileArrived(
        acq=acq,
        tile=TileCoord(slice=0, row=0, col=i),
        path=f"raw/t{i}.nii",
        manifest=f"{acq}/manifest.toml",
        size_bytes=1,
        completed_at=utcnow(),
    )


async def test_stage_runs_under_its_own_user_without_violations(auth, admin_js, tmp_path):
    """Consume, retry (attempt records), publish outputs, park a held acquisition."""
    config = Config(nats=auth.settings(PLUGIN), roots=Roots(work=tmp_path))
    stage = ConvertLike(
        config,
        StageSettings(max_deliver=3, backoff_s=[0.1], options={"fail_until_attempt": 1}),
    )
    async with running_stage(stage, config) as runner:
        from services.ops.control import hold

        await hold(admin_js, "TILEPIPE", "held")
        await wait_for(lambda: "held" in runner.held)
        for i in range(3):
            await publish_event(admin_js, arrived(i))
        await publish_event(admin_js, arrived(0, acq="held"))

        async def done():
            converted = await stream_messages(admin_js, "tp.tile_converted.sec.>")
            parked = await stream_messages(admin_js, f"tp.hold_{PLUGIN}.held.>")
            return len(converted) == 3 and len(parked) == 1

        await wait_for(done, timeout=60)
        await wait_for(lambda: stream_messages(admin_js, "tp.attempt.sec.>"), timeout=30)
    assert "Violation" not in auth.log()


# ---------------------------------------------------------------- forged events
async def test_a_stage_user_cannot_pass_a_forged_event_off_as_another_stages(
    auth, admin_js, tmp_path
):
    """convert may not publish `tile_processed`; it tries to slip one to stitch on a failure
    subject. Failure subjects name their stage and each user may publish only its own: the
    server drops the other subjects; on its own failure subject the payload disagrees with
    the subject, and stitch's runtime refuses it (terminated, counted as
    `subject_mismatch`), so the victim acquisition's lattice is untouched."""
    from services.local.simulate import small_manifest, write_manifest
    from services.runtime.transport import NatsTransport
    from services.stages.stitch import Stitch
    from services.state.acquisitions import record_acquisition
    from services.state.lattice import tile_state

    roots = Roots(raw=tmp_path / "raw", work=tmp_path / "work", output=tmp_path / "output")
    manifest = small_manifest("victim", slices=1, rows=2, cols=2)
    write_manifest(manifest, roots.raw / "victim")
    await record_acquisition(NatsTransport(admin_js), manifest, "victim/manifest.toml", "acquiring")
    config = Config(nats=auth.settings("stitch"), roots=roots)
    labels = {"stage": "stitch", "reason": "subject_mismatch"}
    before = REGISTRY.get_sample_value("tilepipe_events_invalid_total", labels) or 0.0
    forged = processed_event().model_copy(
        update={"acq": "victim", "tile": TileCoord(slice=0, row=1, col=0)}
    )
    as_process = StageFailed(
        acq="victim",
        stage="process",
        input_type="tile_converted",
        input_subject="tp.tile_converted.victim.0.m0-r1-c0",
        error="forged",
        attempts=1,
        tile=TileCoord(slice=0, row=1, col=0),
    )
    stage = Stitch(config, StageSettings(backoff_s=[0.1]))
    async with running_stage(stage, config):
        errors: list[str] = []
        nc = await open_as(auth, "convert", errors)
        js = nc.jetstream(timeout=2)
        for subject in (
            "tp.stage_failed.victim.0.m0-r1-c0",  # no stage named
            "tp.stage_failed.victim.0.m0-r1-c0.process",  # another stage's name
            "tp.attempt.victim.0.m0-r1-c0.process",
        ):
            with pytest.raises(nats.errors.TimeoutError):
                await js.publish(subject, forged.to_json())
            assert violation(auth.log(), "convert", subject), subject
        # its own failure subject: the server takes it, stitch refuses what it carries
        own = "tp.stage_failed.victim.0.m0-r1-c0.convert"
        for payload in (forged.to_json(), as_process.to_json()):
            assert (await js.publish(own, payload)).stream == "TILEPIPE"
        await nc.close()

        async def refused() -> bool:
            now = REGISTRY.get_sample_value("tilepipe_events_invalid_total", labels) or 0.0
            info = await admin_js.consumer_info("TILEPIPE", "stitch")
            return now - before == 2 and not info.num_pending and not info.num_ack_pending

        await wait_for(refused, timeout=30)
        await asyncio.sleep(1.0)  # a delivery that was not terminated would come back
        info = await admin_js.consumer_info("TILEPIPE", "stitch")
    assert info.num_redelivered == 0 and info.num_ack_pending == 0
    assert await tile_state(NatsTransport(admin_js), "victim", 0, 0, 1, 0) is None
    assert await stream_messages(admin_js, "tp.attempt.victim.>") == []  # never handled
    assert await stream_messages(admin_js, "tp.tile_processed.>") == []


# ---------------------------------------------------------------- KV buckets
async def test_kv_permissions_are_what_each_service_needs(auth, admin_js):
    """Only the bookkeepers (stitch, register) may read `tp-lattice`, and each writes only
    its own keys; no stage writes the holds (operators do, `tilepipe pause --acq`)."""
    from nats.js.api import ConsumerConfig, DeliverPolicy

    from services.ops.control import hold

    lattice = await admin_js.key_value("tp-lattice")
    await lattice.put("victim.0.m0.tile.r0-c0", b'{"state": "processed"}')
    await hold(admin_js, "TILEPIPE", "victim")
    direct = "$JS.API.DIRECT.GET.KV_tp-lattice.$KV.tp-lattice.victim.0.m0.tile.r0-c0"
    for user in ("convert", "process", "upload", PLUGIN):
        nc = await open_as(auth, user, [])
        js = nc.jetstream(timeout=2)
        with pytest.raises(nats.errors.TimeoutError):  # the bucket's info
            await js.key_value("tp-lattice")
        with pytest.raises(nats.errors.TimeoutError):  # a watch: a consumer on its stream
            await js.add_consumer(
                "KV_tp-lattice",
                ConsumerConfig(
                    filter_subject="$KV.tp-lattice.>",
                    deliver_subject=nc.new_inbox(),
                    deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
                ),
            )
        with pytest.raises(nats.errors.TimeoutError):  # a key by direct get
            await nc.request(direct, b"", timeout=2)
        await nc.close()
        for subject in ("$JS.API.STREAM.INFO.KV_tp-lattice", direct):
            assert violation(auth.log(), user, subject), (user, subject)
    mine = {"stitch": "victim.0.m0.tile.r1-c0", "register": "victim.register.m0.0.stitched"}
    for user, own in mine.items():
        nc = await open_as(auth, user, [])
        js = nc.jetstream(timeout=2)
        kv = await js.key_value("tp-lattice")
        assert (await kv.get("victim.0.m0.tile.r0-c0")).value == b'{"state": "processed"}'
        await kv.put(own, b"{}")
        other = next(key for name, key in mine.items() if name != user)
        with pytest.raises(nats.errors.TimeoutError):  # the other bookkeeper's keys
            await kv.put(other, b"{}")
        holds = await js.key_value("tp-holds")  # watched by every stage, written by admin
        with pytest.raises(nats.errors.TimeoutError):
            await holds.put("other", b"held")
        await nc.close()
    assert await lattice.keys() == [
        "victim.0.m0.tile.r0-c0",
        "victim.0.m0.tile.r1-c0",
        "victim.register.m0.0.stitched",
    ]
    assert await (await admin_js.key_value("tp-holds")).keys() == ["victim"]


# ---------------------------------------------------------------- stream and KV limits
def init_with(tmp_path: Path, url: str, **limits: int) -> subprocess.CompletedProcess:
    """`tilepipe init` with these `[nats]` limits in its config file."""
    cfg = tmp_path / "limits.toml"
    cfg.write_text(
        f'[nats]\nurl = "{url}"\n' + "".join(f"{key} = {value}\n" for key, value in limits.items())
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("TILEPIPE_")}
    return subprocess.run(
        [sys.executable, "-m", "services.ops.cli", "init", "--config", str(cfg)],
        cwd=REPO,
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_init_applies_stream_and_kv_limits_and_they_hold(nats_server, tmp_path):
    """An unbounded stream and bucket (as an older `tilepipe init` made them) get the
    configured limits from `tilepipe init`, which updates them again when the config changes
    and keeps every event; then the server enforces them: an oversized event or KV value is
    refused, a subject keeps its newest `max_msgs_per_subject` records, and a full stream
    refuses new events instead of dropping old ones (a flood cannot erase the log)."""
    from nats.js.api import DiscardPolicy, KeyValueConfig, StreamConfig
    from nats.js.errors import APIError

    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="TILEPIPE", subjects=["tp.>"]))
    await js.create_key_value(KeyValueConfig(bucket="tp-lattice", history=5))
    first = await js.publish("tp.acq_started.old._._", b"{}")
    limits = {
        "max_bytes": 1 << 20,
        "max_msg_size": 4096,
        "max_msgs_per_subject": 3,
        "kv_max_bytes": 1 << 19,
        "kv_max_value_size": 512,
        "kv_history": 2,
    }
    try:
        for attempt in ({**limits, "max_bytes": 2 << 20, "kv_history": 4}, limits, limits):
            init = init_with(tmp_path, nats_server.url, **attempt)
            assert init.returncode == 0, init.stdout + init.stderr
            info = await js.stream_info("TILEPIPE")
            assert (
                info.config.max_bytes,
                info.config.max_msg_size,
                info.config.max_msgs_per_subject,
                info.config.discard,
            ) == (attempt["max_bytes"], 4096, 3, DiscardPolicy.NEW)
            for bucket in ("tp-lattice", "tp-acquisitions", "tp-holds"):
                kv = (await js.stream_info(f"KV_{bucket}")).config
                assert (kv.max_bytes, kv.max_msg_size, kv.max_msgs_per_subject) == (
                    1 << 19,
                    512,
                    attempt["kv_history"],
                ), bucket
        assert (await js.get_msg("TILEPIPE", first.seq)).data == b"{}"  # kept
        # every stage exports how full the streams it uses are (alert TilepipeStreamNearlyFull)
        config = Config(nats=NatsSettings(url=nats_server.url), roots=Roots(work=tmp_path))

        def gauge(name: str, stream: str) -> float | None:
            return REGISTRY.get_sample_value(f"tilepipe_stream_{name}_bytes", {"stream": stream})

        async with running_stage(ConvertLike(config, StageSettings()), config):
            await wait_for(
                lambda: (
                    gauge("max", "TILEPIPE") == 1 << 20 and gauge("max", "KV_tp-holds") == 1 << 19
                ),
                timeout=30,
            )
            assert gauge("used", "TILEPIPE") == (await js.stream_info("TILEPIPE")).state.bytes
        # an oversized event (payload and headers) and KV value are refused
        attempt_subject = "tp.attempt.flood.0.m0-r0-c0.convert"
        with pytest.raises(APIError, match="message size exceeds maximum allowed"):
            await js.publish(attempt_subject, b"x" * 4000, headers={"Nats-Msg-Id": "y" * 100})
        lattice = await js.key_value("tp-lattice")
        with pytest.raises(APIError):
            await lattice.put("big", b"z" * 513)
        await lattice.put("small", b"z" * 512)
        # one subject keeps its newest records
        for i in range(5):
            await js.publish(attempt_subject, str(i).encode())
        kept = await js.stream_info("TILEPIPE", subjects_filter=attempt_subject)
        assert kept.state.subjects == {attempt_subject: 3}
        # a flood on many subjects fills the stream, then is refused; the log is kept
        with pytest.raises(APIError, match="maximum bytes exceeded"):
            for i in range(1000):
                await js.publish(f"tp.attempt.flood.{i}.m0-r0-c0.convert", b"f" * 3000)
        assert (await js.stream_info("TILEPIPE")).state.bytes <= 1 << 20
        assert (await js.get_msg("TILEPIPE", first.seq)).data == b"{}"
    finally:
        await nc.close()


# ---------------------------------------------------------------- tilepipe up --auth
async def test_up_with_auth_runs_a_simulated_acquisition(tmp_path):
    from services.local.simulate import simulate, small_manifest, write_manifest

    work = tmp_path / "work"
    roots = {name: tmp_path / "data" / name for name in ("raw", "work", "output")}
    cfg = tmp_path / "tp.toml"
    base_port = free_port_block(16)
    cfg.write_text(
        "[roots]\n"
        + "".join(f'{name} = "{path}"\n' for name, path in roots.items())
        + f"[metrics]\nbase_port = {base_port}\n"
        + f'[nats]\nurl = "nats://127.0.0.1:{free_port_block(1)}"\n'  # `up --config` listens there
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env = {k: v for k, v in env.items() if not k.startswith("TILEPIPE_")}
    services = "watcher,convert,process,stitch,register"  # the bookkeepers too
    args = ["--auth", "--config", str(cfg), "--work", str(work), "--services", services]
    with running_up(*args, env=env) as proc:
        await wait_for(lambda: (work / "tilepipe.toml").exists(), timeout=60)
        written = tomllib.loads((work / "tilepipe.toml").read_text())
        admin = NatsSettings(
            url=written["nats"]["url"], user="admin", password_file=work / "auth" / "admin.pass"
        )
        manifest = small_manifest("secure", slices=1, rows=2, cols=2, alines=32, bscans=32)
        path = write_manifest(manifest, roots["raw"] / "secure")
        await asyncio.to_thread(simulate, path, manifest, 0)
        nc = await connect(admin, name="test-admin", retry_for_s=10)
        js = nc.jetstream()

        async def registered():
            processed = await stream_messages(js, "tp.tile_processed.secure.>")
            return len(processed) == 4 and await stream_messages(js, "tp.slice_registered.>")

        await wait_for(registered, timeout=240)
        await nc.close()
        # the operator CLI works as admin; without credentials the server refuses a client
        status = subprocess.run(
            [
                sys.executable,
                "-m",
                "services.ops.cli",
                "status",
                "secure",
                "--json",
                "--config",
                str(work / "tilepipe.toml"),
            ],
            cwd=REPO,
            env={
                **env,
                "TILEPIPE_NATS__USER": "admin",
                "TILEPIPE_NATS__PASSWORD_FILE": str(work / "auth" / "admin.pass"),
            },
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert status.returncode == 0, status.stderr
        with pytest.raises(Exception, match=r"[Aa]uthorization"):
            await nats.connect(written["nats"]["url"], allow_reconnect=False)
        proc.send_signal(signal.SIGINT)
        out, _ = await asyncio.to_thread(proc.communicate, timeout=120)
    assert proc.returncode == 0, out
    assert f"export TILEPIPE_NATS__PASSWORD_FILE={work / 'auth' / 'admin.pass'}" in out
    passwords = [p.read_text() for p in (work / "auth").glob("*.pass")]
    assert len(passwords) == 6  # watcher, convert, process, stitch, register, admin
    text = (work / "tilepipe.toml").read_text()
    for secret in passwords:
        assert secret not in out and secret not in text
    assert "password" not in text and "user" not in written["nats"]
    for p in [*(work / "auth").glob("*.pass"), work / "nats" / "nats-server.conf"]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    assert "Violation" not in (work / "nats" / "nats-server.log").read_text()
    for log in (work / "logs").glob("*.log"):
        assert "Violation" not in log.read_text(), log


def test_auth_refuses_an_external_server(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.ops.cli",
            "up",
            "--auth",
            "--nats-url",
            "nats://127.0.0.1:1",
            "--work",
            str(tmp_path / "w"),
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "--auth" in proc.stderr


# ---------------------------------------------------------------- TLS
def write_private(path: Path, data: bytes) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return path


def make_pki(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by it."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def pem_key(key) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("tilepipe test CA"))
        .issuer_name(name("tilepipe test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    out = {"ca": directory / "ca.pem"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for role, usage in (
        ("server", ExtendedKeyUsageOID.SERVER_AUTH),
        ("client", ExtendedKeyUsageOID.CLIENT_AUTH),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(f"tilepipe {role}"))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if role == "server":
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
                ),
                critical=False,
            )
        cert = builder.sign(ca_key, hashes.SHA256())
        out[role] = directory / f"{role}.pem"
        out[role].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[f"{role}_key"] = write_private(directory / f"{role}-key.pem", pem_key(key))
    return out


async def test_tls_with_client_certificates(tmp_path):
    pki = make_pki(tmp_path)
    block = render_tls(pki["server"], pki["server_key"], pki["ca"], verify=True)
    server = EmbeddedServer(tmp_path / "nats", extra_config=[block]).start()
    try:
        tls = NatsSettings(
            url=server.url,
            tls_ca_file=pki["ca"],
            tls_cert_file=pki["client"],
            tls_key_file=pki["client_key"],
        )
        nc = await connect(tls, name="test-tls", retry_for_s=10)
        js = nc.jetstream()
        await ensure_stream(js, tls)
        await ensure_kv(js)
        config = Config(nats=tls, roots=Roots(work=tmp_path))
        async with running_stage(ConvertLike(config, StageSettings()), config):
            await publish_event(js, arrived(1, acq="tls"))
            await wait_for(lambda: stream_messages(js, "tp.tile_converted.tls.>"), timeout=30)
        await nc.close()
        # refused: a plain client, a client that does not trust the CA, one without a cert
        for kwargs in ({}, {"tls": ssl.create_default_context()}):
            with pytest.raises(Exception):  # noqa: B017 - nats-py raises SSL or connect errors
                await nats.connect(server.url, allow_reconnect=False, connect_timeout=3, **kwargs)
        no_cert = NatsSettings(url=server.url, tls_ca_file=pki["ca"])
        with pytest.raises(ConnectionError):
            await connect(no_cert, name="test-no-cert", retry_for_s=3)
    finally:
        server.stop()


# ---------------------------------------------------------------- metrics bind address
async def test_metrics_bind_to_the_configured_address(nats_server, tmp_path):
    port = free_port("127.0.0.2")
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "TILEPIPE_NATS__URL": nats_server.url,
        "TILEPIPE_METRICS__HOST": "127.0.0.2",
        "TILEPIPE_ROOTS__WORK": str(tmp_path),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.ops.cli", "run", "convert", "--metrics-port", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await wait_for(lambda: port_open("127.0.0.2", port), timeout=60)
        body = urllib.request.urlopen(f"http://127.0.0.2:{port}/metrics", timeout=10).read()
        assert b"tilepipe_events_handled_total" in body
        assert not port_open("127.0.0.1", port)
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- secrets
def test_no_inline_password_field():
    assert "password" not in NatsSettings.model_fields
    assert "password_file" in NatsSettings.model_fields


@pytest.mark.parametrize("where", ["file", "env"])
def test_inline_password_refused_clearly(tmp_path, where):
    cfg = tmp_path / "tp.toml"
    cfg.write_text(
        '[nats]\nuser = "convert"\n' + ('password = "s3cret"\n' if where == "file" else "")
    )
    env = {"TILEPIPE_NATS__PASSWORD": "s3cret"} if where == "env" else {}
    with pytest.raises(ConfigError) as err:
        load_config(cfg, env)
    assert "password_file" in str(err.value) and "s3cret" not in str(err.value)


def test_password_file_missing_or_readable_by_others_refused(tmp_path):
    secret = tmp_path / "convert.pass"
    env = {"TILEPIPE_NATS__USER": "convert", "TILEPIPE_NATS__PASSWORD_FILE": str(secret)}
    with pytest.raises(ConfigError, match=r"nats\.password_file: .*No such file"):
        load_config(None, env)
    secret.write_text("pw")
    secret.chmod(0o644)
    with pytest.raises(ConfigError, match=r"nats\.password_file: .*mode 0644.*chmod 600"):
        load_config(None, env)
    secret.chmod(0o600)
    assert load_config(None, env).nats.password_file == secret
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(None, {**env, "TILEPIPE_NATS__PASSWORD_FILE": str(tmp_path)})


def test_tls_key_must_not_be_world_readable_and_pairs_with_cert(tmp_path):
    key = tmp_path / "client-key.pem"
    key.write_text("key")
    key.chmod(0o644)
    cert = tmp_path / "client.pem"
    cert.write_text("cert")
    env = {"TILEPIPE_NATS__TLS_CERT_FILE": str(cert), "TILEPIPE_NATS__TLS_KEY_FILE": str(key)}
    with pytest.raises(ConfigError, match=r"tls_key_file: .*mode 0644"):
        load_config(None, env)
    key.chmod(0o640)
    assert load_config(None, env).nats.tls_key_file == key
    with pytest.raises(ConfigError, match="go together"):
        load_config(None, {"TILEPIPE_NATS__TLS_CERT_FILE": str(cert)})


# ---------------------------------------------------------------- raw data read-only
class RawAudit:
    """Records every open/rename/remove/chmod/utime a Python stage makes under the raw root."""

    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    MUTATING = (
        "os.rename",
        "os.remove",
        "os.rmdir",
        "os.mkdir",
        "os.chmod",
        "os.utime",
        "os.truncate",
        "os.symlink",
        "os.link",
        "shutil.rmtree",
        "shutil.move",
    )
    root: str | None = None
    writes: ClassVar[list] = []
    reads: ClassVar[list] = []
    installed = False

    @classmethod
    def install(cls) -> None:
        if not cls.installed:
            sys.addaudithook(cls._hook)
            cls.installed = True

    @classmethod
    def _under(cls, path) -> bool:
        if cls.root is None or isinstance(path, int) or path is None:
            return False
        try:
            return os.path.abspath(os.fsdecode(path)).startswith(cls.root)
        except (TypeError, ValueError):
            return False

    @classmethod
    def _hook(cls, event: str, args: tuple) -> None:
        if cls.root is None:
            return
        if event == "open" and cls._under(args[0]):
            mode, flags = args[1], args[2] or 0
            if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                flags & cls.WRITE_FLAGS
            ):
                cls.writes.append((event, args[0], mode, flags))
            else:
                cls.reads.append(args[0])
        elif event in cls.MUTATING and any(cls._under(a) for a in args[:2]):
            if event == "os.mkdir" and os.path.isdir(args[0]):
                return  # mkdir(exist_ok=True) of the existing root (the watcher's) changes nothing
            cls.writes.append((event, *args[:2]))


def tree_state(root: Path) -> dict[str, tuple]:
    """Every entry under `root`: kind, mode, size, mtime and content hash."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            st = p.lstat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
            state[str(p.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return state


async def test_raw_tree_read_only_end_to_end(config, js):
    from services.local.simulate import simulate, small_manifest, write_manifest
    from services.stages.convert import Convert
    from services.stages.process import Process

    manifest = small_manifest("ro", slices=1, rows=2, cols=2, alines=32, bscans=32, settle_s=0.2)
    path = write_manifest(manifest, config.roots.raw / "ro")
    await asyncio.to_thread(simulate, path, manifest, 0)
    for p in [config.roots.raw, *config.roots.raw.rglob("*")]:  # read-only for everyone
        p.chmod(0o555 if p.is_dir() else 0o444)
    before = tree_state(config.roots.raw)
    RawAudit.install()
    RawAudit.root, RawAudit.writes, RawAudit.reads = str(config.roots.raw.resolve()), [], []
    try:
        async with pipeline(config, js, (Convert, Process)):

            async def done():
                return len(await stream_messages(js, "tp.tile_processed.ro.>")) == 4

            await wait_for(done, timeout=180)
        after = tree_state(config.roots.raw)
    finally:
        RawAudit.root = None
        for p in [config.roots.raw, *config.roots.raw.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)  # let tmp_path clean up
    assert RawAudit.writes == []
    assert sum(str(p).endswith(".nii") for p in RawAudit.reads) >= 4  # the audit saw the reads
    assert after == before  # same entries, modes, sizes, mtimes and contents
    ok = REGISTRY.get_sample_value(
        "tilepipe_events_handled_total", {"stage": "process", "outcome": "ok"}
    )
    assert ok and ok >= 4
