"""notify: webhook notifications (Slack-compatible JSON) from the event stream.

A stage like the others (its own durable consumer ``notify``, deliver-all), configured as a
plugin stage with the URL in a secret file:

    [stages.notify]
    impl = "services.stages.notify:Notify"
    options = { url_file = "/etc/tilepipe/webhook.url", link_base = "https://lab.example.org/" }

It sends:

- ``acq_started``: the acquisition, its lattice and the path of its preview index;
- slice done: on ``slice_axis`` (the slice's last product with two illuminations; with
  ``slice_done_on = "registered"`` on mosaic 0's ``slice_registered``), with the links of the
  slice's previews and of the index (``link_base`` + the output-root-relative path, or the
  path under this host's output root when ``link_base`` is empty);
- stage failures, grouped: the first failure at once, then at most one message per
  ``failure_interval_s`` with the failures since the last one counted per stage and acquisition
  (a few examples each). Failures of this stage itself are not notified (failures never trigger
  failures). Failures still waiting for their message when the stage stops are not sent.

Events older than ``max_age_s`` when they arrive (a consumer created after the fact back-fills
the whole log) are skipped and counted. Delivery problems never fail an event: each message is
retried (``backoff_s``) and then dropped with a log line (services/io/webhook.py).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from messages.events import AcquisitionStarted, Event, SliceAxis, SliceRegistered, StageFailed
from messages.subjects import parse_subject
from services.core.errors import ConfigError
from services.core.logs import get_logger
from services.core.metrics import NOTIFY_SKIPPED
from services.io.layout import index_path
from services.io.webhook import Webhook, read_webhook_url, slack_message
from services.runtime.options import StageOptions
from services.runtime.stage import Context, Result, Stage

EXAMPLES_PER_GROUP = 3


class NotifyOptions(StageOptions):
    """`[stages.notify] options`."""

    url_file: Path = Field(description="file holding the webhook URL (mode 600)")
    failure_interval_s: float = Field(
        default=300.0, gt=0, description="failures are grouped into one message per interval"
    )
    max_age_s: float = Field(default=3600.0, gt=0, description="older events are not notified")
    slice_done_on: Literal["axis", "registered"] = Field(
        default="axis", description="a slice is done at its slice_axis or slice_registered"
    )
    link_base: str = Field(default="", description="URL of the output root for links")
    timeout_s: float = Field(default=10.0, gt=0, description="one post's time limit")
    backoff_s: list[float] = Field(
        default_factory=lambda: [2.0, 10.0, 30.0],
        max_length=10,
        description="delays of the retries of a post, then it is dropped",
    )


class FailureDigest:
    """Failures since the last failure message, counted per (stage, acquisition)."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.last_sent = -float("inf")
        self.counts: dict[tuple[str, str], int] = defaultdict(int)
        self.examples: dict[tuple[str, str], list[str]] = defaultdict(list)

    def add(self, event: StageFailed) -> None:
        key = (event.stage, event.acq)
        self.counts[key] += 1
        if len(self.examples[key]) < EXAMPLES_PER_GROUP:
            where = parse_subject(event.subject()).where()  # <acq>.<slice>.<tile>.<stage>
            self.examples[key].append(f"{where}: {event.error.splitlines()[0][:200]}")

    def next_due(self) -> float:
        return self.last_sent + self.interval_s

    def take(self, now: float) -> dict[str, Any] | None:
        """The message of what is pending (None if nothing is), and start a new interval."""
        if not self.counts:
            return None
        total = sum(self.counts.values())
        lines = []
        for (stage, acq), n in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"• {stage} × {n} ({acq})")
            lines.extend(f"    {e}" for e in self.examples[(stage, acq)])
        self.counts.clear()
        self.examples.clear()
        self.last_sent = now
        return slack_message(f"tilepipe: {total} stage failure{'s' * (total != 1)}", lines)


class Notify(Stage):
    """Post notifications for acquisitions started, slices done and grouped failures."""

    name = "notify"
    blocking = False
    consumes = (AcquisitionStarted, SliceAxis, SliceRegistered, StageFailed)
    defaults: ClassVar[dict[str, Any]] = {
        "concurrency": 1,
        "record_attempts": False,
        "ack_wait_s": 120,
    }
    options_model = NotifyOptions
    options: NotifyOptions

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        try:
            url = read_webhook_url(self.options.url_file)
        except ValueError as exc:
            raise ConfigError(f"stages.{self.name}.options.url_file: {exc}") from None
        self.log = get_logger(stage=self.name)
        self.webhook = Webhook(url, self.options.timeout_s, self.options.backoff_s, self.log)
        self.failures = FailureDigest(self.options.failure_interval_s)
        self._lock = asyncio.Lock()
        self._flush: asyncio.Task | None = None

    async def handle(self, event: Event, ctx: Context) -> Result:
        age = (dt.datetime.now(dt.UTC) - event.emitted_at).total_seconds()
        if age > self.options.max_age_s:
            NOTIFY_SKIPPED.labels("old").inc()
            return Result(detail="not notified: older than max_age_s")
        if isinstance(event, StageFailed):
            return await self._failure(event)
        if isinstance(event, AcquisitionStarted):
            text = f"tilepipe: acquisition {event.acq} started"
            lines = [
                f"{event.slices} slices × {event.mosaics} mosaics of {event.rows} × "
                f"{event.cols} tiles ({event.tiles_expected} tiles expected)",
                f"previews: {self._link(index_path(event.acq))}",
            ]
            await self._post(slack_message(text, lines), "acq_started")
        elif self._slice_done(event):
            assert isinstance(event, SliceAxis | SliceRegistered)
            await self._post(self._slice_message(event), "slice_done")
        return Result()

    def _slice_done(self, event: Event) -> bool:
        if self.options.slice_done_on == "axis":
            return isinstance(event, SliceAxis)
        return isinstance(event, SliceRegistered) and event.mosaic == 0

    def _slice_message(self, event: SliceAxis | SliceRegistered) -> dict[str, Any]:
        k = event.slice
        lines = []
        if isinstance(event, SliceAxis):
            figures = f"registration quality {event.quality:.2f}" + (
                "" if event.accepted else f" (not accepted: {event.reason[:200]})"
            )
            lines.append(f"3-D axis fitted on {event.fitted_fraction:.0%} of the mask, {figures}")
        root = self.config.roots.output
        for png in sorted((root / event.acq / "previews").glob(f"slice{k:04d}-*/*.png")):
            rel = png.relative_to(root).as_posix()
            lines.append(f"<{self._link(rel)}|{png.parent.name.split('-', 1)[1]} {png.stem}>")
        lines.append(f"index: {self._link(index_path(event.acq))}")
        return slack_message(f"tilepipe: {event.acq} slice {k} done", lines)

    def _link(self, rel: str) -> str:
        if self.options.link_base:
            return self.options.link_base.rstrip("/") + "/" + rel
        return str(self.config.roots.output / rel)

    async def _failure(self, event: StageFailed) -> Result:
        if event.stage == self.name:
            NOTIFY_SKIPPED.labels("own_failure").inc()
            return Result(detail="own failure: not notified")
        self.failures.add(event)
        now = time.monotonic()
        if now >= self.failures.next_due():
            await self._send_failures()
        elif self._flush is None or self._flush.done():
            self._flush = asyncio.create_task(self._flush_later(self.failures.next_due() - now))
        return Result()

    async def _flush_later(self, delay: float) -> None:
        await asyncio.sleep(delay)
        await self._send_failures()

    async def _send_failures(self) -> None:
        async with self._lock:
            message = self.failures.take(time.monotonic())
        if message is not None:
            await self._post(message, "failures")

    async def _post(self, message: dict[str, Any], kind: str) -> None:
        ok = await self.webhook.post(message, kind)
        self.log.info("notification_sent" if ok else "notification_not_sent", notification=kind)
