"""Connecting to NATS and publishing events with de-duplication."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import ssl
import time
import weakref

import nats
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import PubAck

from messages.events import Event
from services.core.config import NatsSettings
from services.core.logs import get_logger
from services.core.metrics import RECONNECTS

MSG_ID = "Nats-Msg-Id"
REPLAY_HEADER = "Tp-Replay"
STATUS = "Status"  # the header nats-py puts a server status line in (408, 409, 503, ...)
_V1_ACK_TOKENS = 9  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>


def delivery_count(msg: Msg) -> int:
    """How many times JetStream has delivered `msg` (1 on the first delivery).

    Read from the ack subject's tokens (as nats-py splits them) without building the whole
    `msg.metadata`, which parses every field and a timestamp on the hot path.
    """
    tokens = Msg.Metadata._get_metadata_fields(msg.reply)
    return int(tokens[4] if len(tokens) == _V1_ACK_TOKENS else tokens[Msg.Ack.NumDelivered])


def inbox_prefix(user: str | None) -> str:
    """Reply subjects of a connection: `_INBOX_<user>` for a named user (its permissions allow
    only its own inbox), nats-py's `_INBOX` otherwise."""
    if user and re.fullmatch(r"[A-Za-z0-9_-]{1,64}", user):
        return f"_INBOX_{user}"
    return "_INBOX"


def _tls_context(settings: NatsSettings) -> ssl.SSLContext | None:
    if settings.tls_ca_file is None and settings.tls_cert_file is None:
        return None
    ctx = ssl.create_default_context(cafile=str(settings.tls_ca_file or "") or None)
    if settings.tls_cert_file is not None:
        ctx.load_cert_chain(str(settings.tls_cert_file), str(settings.tls_key_file or "") or None)
    return ctx


async def connect(settings: NatsSettings, name: str, retry_for_s: float = 60.0) -> Client:
    """Connect (retrying the first connection for `retry_for_s`), reconnecting forever after."""
    log = get_logger(service=name)

    holder: list[Client] = []

    async def on_disconnect() -> None:
        if holder and (holder[0].is_closed or holder[0].is_draining):
            return  # our own close
        log.warning("nats_disconnected")

    async def on_reconnect() -> None:
        RECONNECTS.labels(name).inc()
        log.info("nats_reconnected")

    async def on_error(exc: Exception) -> None:
        log.warning("nats_error", error=str(exc) or type(exc).__name__)

    password = None
    if settings.password_file is not None:
        password = settings.password_file.read_text().strip()
    kwargs = {
        "servers": [u.strip() for u in settings.url.split(",")],
        "name": name,
        "allow_reconnect": True,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "connect_timeout": settings.connect_timeout_s,
        "disconnected_cb": on_disconnect,
        "reconnected_cb": on_reconnect,
        "error_cb": on_error,
        "tls": _tls_context(settings),
        "user": settings.user,
        "password": password,
        "user_credentials": str(settings.creds_file) if settings.creds_file else None,
        "inbox_prefix": inbox_prefix(settings.user),
    }
    # With unlimited reconnects nats-py would also retry the first connection forever: bound it.
    try:
        nc = await asyncio.wait_for(nats.connect(**kwargs), timeout=retry_for_s)
    except (TimeoutError, OSError, nats.errors.NoServersError) as exc:
        raise ConnectionError(
            f"cannot reach NATS at {settings.url} within {retry_for_s:g}s: "
            f"{exc or type(exc).__name__}"
        ) from exc
    holder.append(nc)
    return nc


class PubAcks:
    """JetStream publishes of one connection, their acknowledgements matched on one wildcard
    reply subscription.

    What `js.publish` does, without its per-call costs: a fresh random inbox token and an
    `asyncio.wait_for` per publish. Tokens are a counter; one sweeper task fails the
    publishes whose acknowledgement is overdue (a lost connection, a server that never
    answered) with `nats.errors.TimeoutError`, as `js.publish` would.
    """

    SWEEP_S = 0.25  # how late past its timeout an unanswered publish may fail

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.prefix = f"{nc._inbox_prefix.decode()}.{nc._nuid.next().decode()}."
        self._tokens = itertools.count()
        self._waiting: dict[str, tuple[asyncio.Future, float]] = {}
        self._sub: asyncio.Future | None = None  # the reply subscription, once made
        self._sweeper: asyncio.Task | None = None

    async def publish(
        self, subject: str, payload: bytes, headers: dict[str, str], timeout: float
    ) -> PubAck:
        sub = self._sub
        if sub is None:  # one subscription, however many publishes come first at once
            sub = self._sub = asyncio.ensure_future(
                self.nc.subscribe(self.prefix + "*", cb=self._on_reply)
            )
        if not sub.done():
            try:
                await asyncio.shield(sub)
            except Exception:
                if self._sub is sub:
                    self._sub = None  # the next publish subscribes again
                raise
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.create_task(self._sweep())
        token = str(next(self._tokens))
        future = asyncio.get_running_loop().create_future()
        self._waiting[token] = (future, time.monotonic() + timeout)
        try:
            await self.nc.publish(subject, payload, reply=self.prefix + token, headers=headers)
            return await future
        finally:
            self._waiting.pop(token, None)

    async def _on_reply(self, msg: Msg) -> None:
        waiting = self._waiting.get(msg.subject[len(self.prefix) :])
        if waiting is None or waiting[0].done():
            return  # answered after its timeout
        future = waiting[0]
        if msg.headers and msg.headers.get(STATUS) == "503":  # no stream takes the subject
            future.set_exception(nats.js.errors.NoStreamResponseError())
            return
        try:
            resp = json.loads(msg.data)
            if "error" in resp:
                nats.js.errors.APIError.from_error(resp["error"])  # raises the typed error
            future.set_result(PubAck.from_response(resp))
        except Exception as exc:  # handed to the publisher
            future.set_exception(exc)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.SWEEP_S)
            closed, now = self.nc.is_closed, time.monotonic()
            for future, deadline in list(self._waiting.values()):
                if future.done():
                    continue
                if closed:
                    future.set_exception(nats.errors.ConnectionClosedError())
                elif deadline < now:
                    future.set_exception(nats.errors.TimeoutError())
            if closed:
                return


_PUBACKS: weakref.WeakKeyDictionary[Client, PubAcks] = weakref.WeakKeyDictionary()


def pubacks(js: JetStreamContext) -> PubAcks:
    """The acknowledgement matcher of `js`'s connection (one per connection)."""
    nc = js._nc
    found = _PUBACKS.get(nc)
    if found is None:
        found = _PUBACKS[nc] = PubAcks(nc)
    return found


def event_msg_id(event: Event, msg_id: str | None = None, replay: str | None = None) -> str:
    """The de-duplication id an event is published with: its own (or `msg_id`), made new by a
    replay tag, so a replayed chain is not mistaken for duplicates of the first run."""
    base = msg_id or event.msg_id()
    return f"{base}:replay:{replay}" if replay else base


def headers_of(msg_id: str, replay: str | None = None) -> dict[str, str]:
    """The headers of every publish: the de-duplication id and the replay tag, if any."""
    return {MSG_ID: msg_id, REPLAY_HEADER: replay} if replay else {MSG_ID: msg_id}


async def publish(
    js: JetStreamContext,
    subject: str,
    payload: bytes,
    msg_id: str,
    replay: str | None = None,
    timeout: float = 10.0,
) -> PubAck:
    """The one JetStream publish: `payload` on `subject` with its de-duplication id (the
    server drops a repeat) and the replay tag that travels downstream; the PubAck, or the
    typed nats-py error (NoStreamResponseError, APIError, TimeoutError)."""
    return await pubacks(js).publish(subject, payload, headers_of(msg_id, replay), timeout)


async def send(nc: Client, subject: str, payload: bytes, msg_id: str) -> None:
    """A publish nobody waits on (history, not a work item): no PubAck is awaited."""
    await nc.publish(subject, payload, headers=headers_of(msg_id))


async def publish_event(
    js: JetStreamContext,
    event: Event,
    msg_id: str | None = None,
    replay: str | None = None,
    timeout: float = 10.0,
) -> PubAck:
    """Publish one event on its subject (see `publish` and `event_msg_id`)."""
    return await publish(
        js, event.subject(), event.to_json(), event_msg_id(event, msg_id, replay), replay, timeout
    )
