"""A continuous pull from one durable JetStream consumer into a callback.

nats-py's `fetch` costs a pull request, a JSON encode and a timed wait per call, and a stage
that refills its free slots one at a time calls it once per message. `PullFeed` keeps pull
requests standing instead (the way the NATS clients' `Consume` APIs do): it asks for the
free slots in one request that waits on the server up to `expires_s`, receives messages on
one inbox subscription and asks again when a quarter of the slots are free.

Bookkeeping: `requested` counts messages asked for and not yet received, `in_hand` messages
received and not yet released; it never asks beyond `capacity - in_hand - requested`. A
request the server ends early (408 expired, 409 leadership change, consumer deleted, ...)
says how many of its messages it did not deliver (`Nats-Pending-Messages`); without that
header, or after a reconnect, or when neither a message nor a heartbeat came for two
heartbeat intervals, the standing requests are presumed lost and asked for again. The
server's `max_ack_pending` (the stage's concurrency) still bounds the consumer as a whole.

On `stop()` it asks for nothing more and unsubscribes its inbox, so the server drops the
standing requests; a delivery already on its way is handed back (nak, redelivered at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable

from nats.aio.client import Client
from nats.aio.msg import Msg

from services.core.logs import get_logger
from services.runtime.bus import STATUS

PENDING_MESSAGES = "Nats-Pending-Messages"
HEARTBEAT = "100"
ENDED = {"404", "408", "409"}  # no messages / expired / ended by the server (with a reason)


class PullFeed:
    """Standing pull requests for one consumer; `on_message` gets each delivery."""

    def __init__(
        self,
        nc: Client,
        stream: str,
        consumer: str,
        capacity: int,
        on_message: Callable[[Msg], None],
        expires_s: float = 30.0,
        heartbeat_s: float = 5.0,
        log=None,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if not 0 < 2 * heartbeat_s < expires_s:
            raise ValueError("heartbeat_s must be below half of expires_s")
        self.nc = nc
        self.capacity = capacity
        self.on_message = on_message
        self.expires_ns = int(expires_s * 1e9)
        self.heartbeat_s = heartbeat_s
        self.request_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self.inbox = nc.new_inbox()
        self.threshold = max(1, capacity // 4)
        self.requested = 0
        self.in_hand = 0
        self.stopped = False
        self.log = log or get_logger(stage=consumer)
        self._sub = None
        self._seen = time.monotonic()
        self._reconnects = nc.stats["reconnects"]
        self._retry_after = 0.0  # monotonic time before which an ended request is not renewed

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(self.inbox, cb=self._on_msg)
        await self.pull()

    async def pull(self) -> None:
        """Ask for the free slots when a quarter of the capacity is free or nothing is asked."""
        free = self.capacity - self.in_hand - self.requested
        if free < 1 or (self.requested and free < self.threshold) or self.stopped:
            return
        if time.monotonic() < self._retry_after:
            return
        request = {
            "batch": free,
            "expires": self.expires_ns,
            "idle_heartbeat": int(self.heartbeat_s * 1e9),
        }
        self.requested += free
        try:
            await self.nc.publish(self.request_subject, json.dumps(request).encode(), self.inbox)
        except Exception as exc:  # a lost connection: the watchdog asks again
            self.requested -= free
            self.log.warning("pull_request_failed", error=str(exc) or type(exc).__name__)

    async def release(self) -> None:
        """One delivery is finished (acked, nak'd or abandoned): its slot is free again."""
        self.in_hand -= 1
        await self.pull()

    async def _on_msg(self, msg: Msg) -> None:
        self._seen = time.monotonic()
        status = msg.headers.get(STATUS) if msg.headers else None
        if status is None:
            self.requested = max(0, self.requested - 1)
            if self.stopped:  # left over from a standing request: someone else takes it
                await _nak(msg)
                return
            self.in_hand += 1
            self.on_message(msg)
            return
        if status == HEARTBEAT:
            return
        pending = msg.headers.get(PENDING_MESSAGES)
        if status in ENDED and pending is not None and pending.isdigit():
            self.requested = max(0, self.requested - int(pending))
        else:
            self.requested = 0  # what is still standing is unknown: start over
        if status != "408":  # an expiry is routine, anything else is worth a line and a pause
            self.log.warning(
                "pull_request_ended", status=status, description=msg.headers.get("Description")
            )
            self._retry_after = time.monotonic() + 1.0
        await self.pull()

    async def watch(self, stop: asyncio.Event, every_s: float = 1.0) -> None:
        """Renew requests presumed lost (reconnect, silence) or ended early, until `stop`."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=every_s)
                return
            except TimeoutError:
                pass
            reconnects = self.nc.stats["reconnects"]
            silent = time.monotonic() - self._seen > 2 * self.heartbeat_s
            if reconnects != self._reconnects or (self.requested and silent):
                self._reconnects = reconnects
                self.requested = 0
                self._seen = time.monotonic()
            await self.pull()

    async def stop(self) -> None:
        """Ask for nothing more and drop the inbox (the server then drops the standing
        requests); a delivery already on its way is handed back. Deliveries in hand are not
        touched: their owner still acks them and calls `release`."""
        self.stopped = True
        if self._sub is not None:
            sub, self._sub = self._sub, None
            with contextlib.suppress(Exception):  # closing anyway
                await sub.drain()


async def _nak(msg: Msg) -> None:
    with contextlib.suppress(Exception):  # else redelivered after ack_wait
        await msg.nak()
