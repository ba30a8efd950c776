"""Webhook notifications (services/stages/notify.py) against a real HTTP receiver on 127.0.0.1.

The real stage runs under the real runtime on a real nats-server; events are published as the
stages publish them; the receiver records every POST and answers what the test says."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from messages.events import (
    AcquisitionStarted,
    SliceAxis,
    SliceRegistered,
    StageFailed,
    TileCoord,
)
from services.core.config import StageSettings
from services.core.errors import ConfigError
from services.core.logs import configure_logging
from services.core.metrics import NOTIFY_MESSAGES
from services.runtime.bus import publish_event
from services.runtime.runner import StageRunner
from services.stages.notify import FailureDigest, Notify
from tests.conftest import stream_messages, wait_for


class Receiver:
    """An HTTP server recording POSTed JSON; `statuses` are answered first, then 200."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.posts: list[dict] = []
        self.statuses = list(statuses or [])
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                status = outer.statuses.pop(0) if outer.statuses else 200
                if status == 200:
                    outer.posts.append(json.loads(body))
                self.send_response(status)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/T000/secret-token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def texts(self) -> list[str]:
        return [p["text"] for p in self.posts]


def url_file(tmp_path: Path, url: str, mode: int = 0o600) -> Path:
    path = tmp_path / "webhook.url"
    path.write_text(url + "\n")
    path.chmod(mode)
    return path


@contextlib.asynccontextmanager
async def notifier(config, **options):
    settings = StageSettings(**{**Notify.defaults, "options": options})
    runner = StageRunner(Notify(config, settings), config)
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    await wait_for(runner.ready.is_set)
    try:
        yield runner
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def started(acq: str = "a1", **kw) -> AcquisitionStarted:
    return AcquisitionStarted(
        acq=acq, manifest=f"{acq}/manifest.toml", slices=2, mosaics=2, rows=3, cols=3,
        tiles_expected=36, producer="watcher", **kw,
    )  # fmt: skip


def failed(stage: str, row: int, acq: str = "a1") -> StageFailed:
    tile = TileCoord(slice=0, mosaic=0, row=row, col=0)
    return StageFailed(
        acq=acq, tile=tile, stage=stage, input_type="tile_arrived",
        input_subject=f"tp.tile_arrived.{acq}.0.{tile.token()}",
        error=f"boom {row}\ntraceback", attempts=3, producer=stage,
    )  # fmt: skip


def registered(acq: str, k: int, mosaic: int = 0) -> SliceRegistered:
    return SliceRegistered(
        acq=acq, slice=k, mosaic=mosaic, path=f"{acq}/volume/registered.ome.zarr",
        transform=[[1, 0, 0], [0, 1, 0], [0, 0, 1]], quality=0.9, accepted=True,
        producer="register",
    )  # fmt: skip


def axis_done(acq: str, k: int) -> SliceAxis:
    return SliceAxis(
        acq=acq, slice=k, mosaic=0, path=f"{acq}/axis/slice{k:04d}.ome.zarr", tilted_mosaic=1,
        transform=[[1, 0, 0], [0, 1, 0], [0, 0, 1]], quality=0.9, accepted=True, gamma_deg=-15,
        fitted_fraction=0.5, producer="register",
    )  # fmt: skip


async def test_expected_notifications_and_nothing_more(config, js, tmp_path):
    """Started, slice done with its previews' links, failures: the first at once, the next
    four in one message after the interval (counted per stage); an old event, a failure of
    the notifier itself and a slice_registered send nothing. The URL is never logged."""
    receiver = Receiver()
    for name in ("m0/aip.png", "m1/aip.png", "axis/inplane.png"):
        label, file = name.split("/")
        png = config.roots.output / f"a1/previews/slice0001-{label}/{file}"
        png.parent.mkdir(parents=True, exist_ok=True)
        png.write_bytes(b"png")
    options = {
        "url_file": str(url_file(tmp_path, receiver.url)),
        "failure_interval_s": 2.0,
        "backoff_s": [0.1],
        "link_base": "https://lab.example.org/out",
    }
    configure_logging()  # capture_logs restores the processors it found: the service's
    try:
        with capture_logs() as logs:
            async with notifier(config, **options):
                old = dt.datetime.now(dt.UTC) - dt.timedelta(hours=3)
                await publish_event(js, started("old", emitted_at=old))
                await publish_event(js, started())
                await wait_for(lambda: len(receiver.posts) == 1)
                await publish_event(js, registered("a1", 1))
                await publish_event(js, axis_done("a1", 1))
                await wait_for(lambda: len(receiver.posts) == 2)
                await publish_event(js, failed("convert", 0))
                await wait_for(lambda: len(receiver.posts) == 3)
                for stage, row in [("convert", 1), ("process", 2), ("convert", 3), ("stitch", 4)]:
                    await publish_event(js, failed(stage, row))
                await publish_event(js, failed("notify", 5))
                await asyncio.sleep(1.0)
                assert len(receiver.posts) == 3  # grouped: nothing before the interval ends
                await wait_for(lambda: len(receiver.posts) == 4, timeout=5)
                await asyncio.sleep(2.5)  # and nothing more
    finally:
        receiver.close()
    first, slice_done, one, grouped = receiver.posts
    assert receiver.texts() == [
        "tilepipe: acquisition a1 started",
        "tilepipe: a1 slice 1 done",
        "tilepipe: 1 stage failure",
        "tilepipe: 4 stage failures",
    ]
    assert "https://lab.example.org/out/a1/index.html" in json.dumps(first)
    body = slice_done["blocks"][0]["text"]["text"]
    for rel in ("slice0001-m0/aip.png", "slice0001-m1/aip.png", "slice0001-axis/inplane.png"):
        assert f"https://lab.example.org/out/a1/previews/{rel}" in body
    assert "convert × 1 (a1)" in one["blocks"][0]["text"]["text"]
    text = grouped["blocks"][0]["text"]["text"]
    assert "convert × 2 (a1)" in text and "process × 1 (a1)" in text and "stitch × 1" in text
    assert "boom 3" in text and "notify" not in text and "traceback" not in text
    assert [e["notification"] for e in logs if e["event"] == "notification_sent"] == [
        "acq_started", "slice_done", "failures", "failures"
    ]  # fmt: skip
    assert "secret-token" not in repr(logs)


async def test_receiver_errors_are_retried_then_dropped_without_failing(config, js, tmp_path):
    """Two 500s then 200: delivered once. A receiver that is gone: dropped after the retries,
    logged and counted, and the event is handled (no stage_failed, the next one goes on)."""
    receiver = Receiver(statuses=[500, 500])
    path = url_file(tmp_path, receiver.url)
    try:
        async with notifier(config, url_file=str(path), backoff_s=[0.1, 0.1]):
            await publish_event(js, started())
            await wait_for(lambda: len(receiver.posts) == 1)
    finally:
        receiver.close()
    dropped = NOTIFY_MESSAGES.labels("acq_started", "dropped")._value.get()
    gone = Receiver()
    gone.close()  # nothing listens there any more
    path.write_text(gone.url + "\n")
    async with notifier(config, url_file=str(path), backoff_s=[0.1, 0.1]) as runner:
        await publish_event(js, started("a2"))
        await publish_event(js, started("a3"))
        await wait_for(
            lambda: NOTIFY_MESSAGES.labels("acq_started", "dropped")._value.get() == dropped + 2,
            timeout=15,
        )
        handled = await stream_messages(js, "tp.acq_started.>")
        assert len(handled) == 3 and runner.ready.is_set()
    assert await stream_messages(js, "tp.stage_failed.>") == []


def test_url_file_must_be_private_and_a_url(config, tmp_path):
    settings = lambda path: StageSettings(**{**Notify.defaults, "options": {"url_file": path}})  # noqa: E731
    open_to_all = url_file(tmp_path, "https://hooks.example.org/x", mode=0o644)
    with pytest.raises(ConfigError, match="chmod 600") as exc:
        Notify(config, settings(str(open_to_all)))
    assert "hooks.example.org" not in str(exc.value)
    not_url = url_file(tmp_path, "hooks.example.org/x")
    with pytest.raises(ConfigError, match="webhook URL"):
        Notify(config, settings(str(not_url)))
    with pytest.raises(ConfigError, match="unknown_option"):
        Notify(
            config,
            StageSettings(options={"url_file": str(not_url), "unknown_option": 1}),
        )


async def test_slice_done_on_registered_for_one_illumination(config, js, tmp_path):
    """`slice_done_on = "registered"`: mosaic 0's slice_registered is the slice done; another
    mosaic's, or a slice_axis, sends nothing."""
    receiver = Receiver()
    options = {"url_file": str(url_file(tmp_path, receiver.url)), "slice_done_on": "registered"}
    try:
        async with notifier(config, **options):
            await publish_event(js, axis_done("a1", 0))
            await publish_event(js, registered("a1", 0, mosaic=1))
            await publish_event(js, registered("a1", 2))
            await wait_for(lambda: len(receiver.posts) >= 1)
            await asyncio.sleep(1.5)
    finally:
        receiver.close()
    assert receiver.texts() == ["tilepipe: a1 slice 2 done"]


@pytest.mark.unit
def test_a_failure_example_says_where_it_failed_and_its_first_line():
    digest = FailureDigest(60.0)
    digest.add(failed("convert", 2))
    assert digest.examples[("convert", "a1")] == ["a1.0.m0-r2-c0.convert: boom 2"]
