"""Bad input (hypothesis): events, paths, manifests and configs are refused with a reason.

Pure functions get a few hundred examples each; the end-to-end test runs hypothesis-generated
bad payloads through a real stage on a real nats-server.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from pathlib import Path

import nats
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from nats.js.errors import BadRequestError
from prometheus_client import REGISTRY

from messages.codec import MAX_PAYLOAD_BYTES, InvalidEvent, decode_event
from messages.events import (
    EVENT_TYPES,
    StageFailed,
    TileArrived,
    TileConverted,
    TileCoord,
    TileProcessed,
    utcnow,
)
from messages.paths import resolve_in_root
from services.core.config import Config, NatsSettings, Roots, StageSettings, load_config
from services.core.errors import ConfigError, ManifestError
from services.core.manifest import load_manifest
from services.core.tomlio import to_toml
from services.local.natsserver import EmbeddedServer
from services.local.simulate import small_manifest
from services.runtime.bus import publish_event
from services.runtime.provision import ensure_kv, ensure_stream
from services.runtime.runner import StageRunner
from tests.conftest import running_stage, stream_messages, wait_for
from tests.stages_for_tests import ConvertLike

REASONS = {
    "too_large",
    "not_json",
    "not_object",
    "unknown_type",
    "unexpected_type",
    "unsupported_version",
    "invalid_fields",
    "subject_mismatch",
}
PURE = settings(max_examples=200, deadline=None)

# ---------------------------------------------------------------- strategies
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=20,
)


def valid_events() -> list[dict]:
    tile = TileCoord(slice=1, row=2, col=3)
    events = [
        TileArrived(
            acq="fz",
            tile=tile,
            path="fz/slice001/tile_0001.nii",
            manifest="fz/manifest.toml",
            size_bytes=10,
            completed_at=utcnow(),
        ),
        TileConverted(
            acq="fz", tile=tile, path="fz/c.zarr", raw_path="fz/t.nii", shape=[1, 2], dtype="u2"
        ),
        TileProcessed(acq="fz", tile=tile, products={"db": "fz/p/db"}, device="cpu", seconds=1.0),
        StageFailed(
            acq="fz",
            stage="convert",
            input_type="tile_arrived",
            input_subject="tp.x",
            error="boom",
            attempts=3,
            tile=tile,
        ),
    ]
    return [json.loads(e.to_json()) for e in events]


VALID = valid_events()


@st.composite
def mutated_events(draw) -> dict:
    """A valid event with one field replaced, removed, or an unknown field added."""
    event = json.loads(json.dumps(draw(st.sampled_from(VALID))))
    target = event
    if draw(st.booleans()) and isinstance(event.get("tile"), dict):
        target = event["tile"]
    key = draw(st.sampled_from(sorted(target)))
    action = draw(st.sampled_from(["replace", "delete", "add"]))
    if action == "replace":
        target[key] = draw(json_values)
    elif action == "delete":
        del target[key]
    else:
        target[draw(st.text(min_size=1, max_size=12))] = draw(json_values)
    return event


segment = st.text(alphabet="abc.~/\\\x00 ", min_size=0, max_size=6)
escaping_paths = st.one_of(
    st.builds(lambda s: "/" + s, st.text(max_size=30)),
    st.builds(lambda a, b: f"{a}/../{b}", st.text(max_size=10), st.text(max_size=10)),
    st.builds(lambda s: "../" + s, st.text(max_size=20)),
    st.builds(lambda s: "~" + s, st.text(max_size=20)),
    st.builds(lambda a, b: f"{a}\x00{b}", st.text(max_size=10), st.text(max_size=10)),
    st.builds(lambda a, b: f"{a}\\..\\{b}", st.text(max_size=10), st.text(max_size=10)),
    st.just(""),
    st.just(".."),
    st.text(min_size=1025, max_size=1100),
)


def check_decode(data: bytes, accept=None):
    """decode_event's whole contract: an Event, or InvalidEvent with a known reason."""
    try:
        event = decode_event(data, accept=accept)
    except InvalidEvent as exc:
        assert exc.reason in REASONS, exc.reason
        assert exc.detail is not None
        return exc.reason
    assert type(event) is EVENT_TYPES[event.kind]
    assert decode_event(event.to_json()) == event  # what was accepted round-trips
    return None


# ---------------------------------------------------------------- decoding
@PURE
@given(st.binary(max_size=3000))
def test_arbitrary_bytes_refused_with_a_reason(data):
    check_decode(data)


@PURE
@given(json_values)
def test_arbitrary_json_refused_with_a_reason(value):
    assert check_decode(json.dumps(value).encode()) is not None


@PURE
@given(mutated_events())
def test_mutated_events_refused_or_valid(event):
    check_decode(json.dumps(event).encode())
    check_decode(json.dumps(event).encode(), accept={"tile_arrived"})


@PURE
@given(st.sampled_from(VALID), json_values | st.integers())
def test_unknown_versions_refused(event, version):
    # only the integer 1 is version 1 (not `true`, not `1.0`): every other value is refused
    assume(not (type(version) is int and version == 1))
    payload = json.dumps({**event, "v": version}).encode()
    assert check_decode(payload) == "unsupported_version"


def test_huge_numbers_and_deep_nesting_are_not_json_errors():
    """Found by fuzzing: a 5000-digit integer made json.loads raise a bare ValueError."""
    assert check_decode(b"1" * 5000) == "not_json"
    assert check_decode(b'{"type": "tile_arrived", "v": ' + b"9" * 5000 + b"}") == "not_json"
    assert check_decode(b"[" * 100_000) == "not_json"


@settings(max_examples=15, deadline=None)
@given(st.integers(min_value=MAX_PAYLOAD_BYTES + 1, max_value=2_500_000), st.sampled_from(VALID))
def test_huge_payloads_refused_before_parsing(size, event):
    body = json.dumps({**event, "producer": ""}).encode()
    payload = body[:-1] + b', "pad": "' + b"x" * max(0, size - len(body) - 10) + b'"}'
    assert len(payload) > MAX_PAYLOAD_BYTES
    assert check_decode(payload) == "too_large"


@PURE
@given(escaping_paths, st.sampled_from(["path", "manifest"]))
def test_paths_escaping_their_root_refused(path, field):
    event = {**VALID[0], field: path}
    assert check_decode(json.dumps(event).encode()) == "invalid_fields"


# ---------------------------------------------------------------- path resolution on disk
@pytest.fixture(scope="module")
def tree():
    """A root with symlinks inside it, out of it, to its parent, and a loop."""
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        root = base / "root"
        (root / "a" / "b").mkdir(parents=True)
        (root / "a" / "f.nii").write_bytes(b"x")
        (base / "outside").mkdir()
        (base / "outside" / "secret").write_bytes(b"s")
        os.symlink(base / "outside", root / "out")
        os.symlink("..", root / "a" / "up")  # to root (inside)
        os.symlink("../..", root / "a" / "upup")  # to base (outside)
        os.symlink("b", root / "a" / "in")
        os.symlink("loop", root / "loop")
        os.symlink("/etc/hostname", root / "abs")
        yield root


@PURE
@given(
    st.lists(
        st.sampled_from(
            [
                "a",
                "b",
                "f.nii",
                "out",
                "up",
                "upup",
                "in",
                "loop",
                "abs",
                "secret",
                ".",
                "..",
                "",
                "x",
            ]
        ),
        min_size=1,
        max_size=6,
    )
)
def test_resolve_in_root_never_leaves_the_root(tree, parts):
    rel = "/".join(parts)
    roots = Roots(raw=tree)
    try:
        resolved = roots.resolve("raw", rel)
    except ValueError:  # PathEscapeError is a ValueError, like check_relative's refusals
        return
    base = tree.resolve()
    assert resolved == base or base in resolved.parents, (rel, resolved)


def test_symlink_loop_refused_as_an_escape(tree):
    """Found by fuzzing: a symlink loop raised RuntimeError (Python 3.11) instead."""
    from messages.paths import PathEscapeError

    for rel in ("loop", "loop/x", "out/secret", "a/upup/outside/secret", "abs"):
        with pytest.raises(PathEscapeError):
            resolve_in_root(tree, rel)


# ---------------------------------------------------------------- manifests and configs
MANIFEST = small_manifest("fz", slices=2, rows=2, cols=2).model_dump(mode="json")
toml_scalars = (
    st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=30)
)
toml_values = toml_scalars | st.lists(toml_scalars, max_size=4)


def leaves(tree: dict, prefix=()) -> list[tuple]:
    out = []
    for key, value in tree.items():
        if isinstance(value, dict):
            out += leaves(value, (*prefix, key))
        out.append((*prefix, key))
    return out


@st.composite
def mutated_documents(draw, base: dict) -> dict:
    doc = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(leaves(doc) or [("x",)]))
        node = doc
        for key in path[:-1]:
            node = node.get(key) if isinstance(node.get(key), dict) else node.setdefault(key, {})
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            node[path[-1]] = draw(toml_values)
        elif action == "delete":
            node.pop(path[-1], None)
        else:
            node[draw(st.text(alphabet="abcxyz_", min_size=1, max_size=8))] = draw(toml_values)
    return doc


def _write(text: str) -> Path:
    fd, name = tempfile.mkstemp(suffix=".toml")
    with os.fdopen(fd, "w", encoding="utf-8", errors="surrogatepass") as fh:
        fh.write(text)
    return Path(name)


@PURE
@given(mutated_documents(MANIFEST) | st.text(max_size=300).map(lambda t: {"__text__": t}))
def test_manifest_fuzz_only_manifest_errors(doc):
    text = doc["__text__"] if "__text__" in doc else to_toml(doc)
    path = _write(text)
    try:
        manifest = load_manifest(path)
    except ManifestError as exc:
        assert str(exc)
    else:
        assert manifest.tiles >= 1 and manifest.raw.expected_bytes > 0
    finally:
        path.unlink()


CONFIG = json.loads(json.dumps(Config().model_dump(mode="json", by_alias=True)))
CONFIG["stages"] = {"process": {"concurrency": 2, "options": {"device": "cpu"}}}
env_keys = st.lists(
    st.sampled_from(
        [
            "NATS",
            "ROOTS",
            "METRICS",
            "LOG",
            "WATCHER",
            "STAGES",
            "PROCESS",
            "URL",
            "RAW",
            "HOST",
            "BASE_PORT",
            "CONCURRENCY",
            "PASSWORD_FILE",
            "X",
            "",
        ]
    ),
    min_size=1,
    max_size=4,
).map(lambda parts: "TILEPIPE_" + "__".join(parts))
env_values = st.text(max_size=20) | st.integers().map(str) | st.just("1" * 5000)


@PURE
@given(
    mutated_documents(CONFIG) | st.text(max_size=300).map(lambda t: {"__text__": t}),
    st.dictionaries(env_keys, env_values, max_size=3),
)
def test_config_fuzz_only_config_errors(doc, environ):
    text = doc["__text__"] if "__text__" in doc else to_toml(doc)
    path = _write(text)
    try:
        config = load_config(path, environ)
    except ConfigError as exc:
        assert str(exc)
    else:
        assert isinstance(config, Config)
    finally:
        path.unlink()


@pytest.mark.parametrize(
    "environ",
    [
        {"TILEPIPE_NATS__URL": "x", "TILEPIPE_NATS__URL__HOST": "y"},  # was a TypeError
        {"TILEPIPE_NATS__URL__HOST": "y", "TILEPIPE_NATS__URL": "x"},
        {"TILEPIPE_ROOTS__RAW": "a\x00b"},  # was a bare ValueError
        {"TILEPIPE_STAGES__PROCESS__CONCURRENCY": "9" * 5000},  # was a bare ValueError
    ],
)
def test_config_bugs_found_by_fuzzing_are_config_errors(environ):
    with pytest.raises(ConfigError):
        load_config(None, environ)


# ---------------------------------------------------------------- through a running stage
bad_payloads = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    mutated_events().map(lambda e: json.dumps(e).encode()),
    escaping_paths.map(lambda p: json.dumps({**VALID[0], "path": p}).encode()),
    st.sampled_from(VALID[1:]).map(lambda e: json.dumps(e).encode()),  # not this stage's input
).filter(lambda data: _reason(data) is not None)


FUZZ_SUBJECT = "tp.tile_arrived.fz.0.m0-r0-c0"  # where the batch is published


def _reason(data: bytes) -> str | None:
    try:
        decode_event(data, accept={"tile_arrived"}, subject=FUZZ_SUBJECT)
    except InvalidEvent as exc:
        return exc.reason
    return None


def invalid_count(reason: str) -> float:
    labels = {"stage": "convert_like", "reason": reason}
    return REGISTRY.get_sample_value("tilepipe_events_invalid_total", labels) or 0.0


@pytest.fixture(scope="module")
def server():
    with tempfile.TemporaryDirectory() as tmp:
        srv = EmbeddedServer(Path(tmp) / "nats").start()
        yield srv
        srv.stop()


RUNS = iter(range(10_000))


@settings(
    max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(bad_payloads, min_size=15, max_size=30))
def test_bad_payloads_through_a_running_stage(server, tmp_path, batch):
    batch = [*batch, b'{"type": "tile_arrived", "pad": "' + b"x" * 300_000 + b'"}']
    asyncio.run(_through_stage(server, tmp_path / f"run{next(RUNS)}", batch))


async def _through_stage(server: EmbeddedServer, tmp: Path, batch: list[bytes]) -> None:
    config = Config(nats=NatsSettings(url=server.url), roots=Roots(work=tmp))
    limit = config.nats.max_msg_size  # larger: the stream itself refuses it (issue 19)
    expected: dict[str, int] = {}
    for data in batch:
        if len(data) > limit:
            continue
        reason = _reason(data)
        expected[reason] = expected.get(reason, 0) + 1
    before = {reason: invalid_count(reason) for reason in REASONS}
    nc = await nats.connect(server.url)
    js = nc.jetstream()
    await ensure_stream(js, config.nats)
    await ensure_kv(js)
    marks = tmp / "marks"
    stage = ConvertLike(config, StageSettings(ack_wait_s=1, options={"marker_dir": str(marks)}))
    runner = StageRunner(stage, config)
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:
        await wait_for(lambda: runner.ready.is_set() or task.done(), timeout=30)
        for data in batch:
            if len(data) > limit:
                with pytest.raises(BadRequestError, match="message size exceeds maximum"):
                    await js.publish(FUZZ_SUBJECT, data)
                continue
            await js.publish(FUZZ_SUBJECT, data)
        good = TileArrived(
            acq=f"good{tmp.name}",
            tile=TileCoord(slice=0, row=0, col=0),
            path="fz/t.nii",
            manifest="fz/manifest.toml",
            size_bytes=1,
            completed_at=utcnow(),
        )
        await publish_event(js, good)
        await wait_for(lambda: stream_messages(js, f"tp.tile_converted.{good.acq}.>"), timeout=60)
        await wait_for(
            lambda: all(invalid_count(r) - before[r] == expected.get(r, 0) for r in REASONS),
            timeout=30,
        )
        await asyncio.sleep(2.5)  # two ack_wait periods: an un-terminated message would return
        info = await js.consumer_info("TILEPIPE", "convert_like")
        assert not task.done()  # the service is still up
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await nc.close()
    assert {r: invalid_count(r) - before[r] for r in REASONS} == {
        r: expected.get(r, 0) for r in REASONS
    }
    assert info.num_ack_pending == 0 and info.num_pending == 0 and info.num_redelivered == 0
    assert sorted(p.name for p in marks.iterdir()) == ["done-m0-r0-c0", "start-m0-r0-c0"]


async def test_symlink_out_of_the_raw_root_fails_at_once(config, js, tmp_path):
    """A valid event whose raw file is a symlink out of the root: refused on the first attempt
    (no retries), recorded with the reason, nothing converted."""
    from services.local.simulate import write_manifest
    from services.stages.convert import Convert

    manifest = small_manifest("esc", slices=1, rows=1, cols=1, alines=8, bscans=8)
    write_manifest(manifest, config.roots.raw / "esc")
    outside = tmp_path / "outside.nii"
    outside.write_bytes(b"\0" * manifest.raw.expected_bytes)
    os.symlink(outside, config.roots.raw / "esc" / "link.nii")
    event = TileArrived(
        acq="esc",
        tile=TileCoord(slice=0, row=0, col=0, index=0),
        path="esc/link.nii",
        manifest="esc/manifest.toml",
        size_bytes=manifest.raw.expected_bytes,
        completed_at=utcnow(),
    )
    settings = StageSettings(max_deliver=3, backoff_s=[0.2, 0.2])
    async with running_stage(Convert(config, settings), config):
        await publish_event(js, event)
        failed = await wait_for(lambda: stream_messages(js, "tp.stage_failed.esc.>"), timeout=60)
        await asyncio.sleep(1.0)  # a retry (backoff 0.2 s) would show as a redelivery
        info = await js.consumer_info("TILEPIPE", "convert")
    record = decode_event(failed[0].data)
    assert record.attempts == 1 and "PathEscapeError" in record.error
    assert "resolves outside its root" in record.error
    assert info.num_redelivered == 0 and info.num_ack_pending == 0
    assert await stream_messages(js, "tp.tile_converted.esc.>") == []
    assert not list(config.roots.work.rglob("*.zarr"))


async def test_watcher_survives_a_symlink_out_of_the_raw_root(config, js, tmp_path):
    from services.local.simulate import simulate, write_manifest
    from services.watcher.service import Watcher

    manifest = small_manifest("wesc", slices=1, rows=1, cols=3, alines=8, bscans=8, settle_s=0.1)
    path = write_manifest(manifest, config.roots.raw / "wesc")
    await asyncio.to_thread(simulate, path, manifest, 0)
    (tmp_path / "outside.nii").write_bytes(b"x")
    os.symlink(tmp_path / "outside.nii", config.roots.raw / "wesc" / "escape.nii")
    # a tile-named link to a file outside the root: refused and counted, never announced
    tiles = sorted(p for p in (config.roots.raw / "wesc").rglob("*") if p.suffix == ".nii")
    linked = tiles[-1]
    os.replace(linked, tmp_path / "moved.nii")
    os.symlink(tmp_path / "moved.nii", linked)
    refused = (
        REGISTRY.get_sample_value("tilepipe_watcher_files_total", {"outcome": "outside_root"})
        or 0.0
    )
    stop = asyncio.Event()
    watcher = Watcher(config, js)
    task = asyncio.create_task(watcher.run(stop))
    try:
        await wait_for(lambda: watcher.ready.is_set() or task.done(), timeout=30)
        if task.done():
            task.result()  # raises the watcher's error
        await wait_for(lambda: _count(js, "tp.tile_arrived.wesc.>", 2), timeout=30)
        await wait_for(
            lambda: (
                REGISTRY.get_sample_value(
                    "tilepipe_watcher_files_total", {"outcome": "outside_root"}
                )
                == refused + 1
            )
        )
        events = [decode_event(m.data) for m in await stream_messages(js, "tp.tile_arrived.>")]
        assert linked.name not in {Path(e.path).name for e in events}
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 30)


async def _count(js, subject: str, n: int) -> bool:
    return len(await stream_messages(js, subject)) == n
