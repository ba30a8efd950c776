"""What a stage author writes: `handle(event, ctx) -> Result`. The runtime does the rest.

The contract has no NATS in it: a handler gets its event and a `Context` (log, config, its
settings, the attempt, the replay/force flags, and key-value bookkeeping through `ctx.kv` and
`ctx.acquisition`), and returns the events to publish. A test calls `handle` with
`services.runtime.testing.context()`.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Any, ClassVar

from messages.events import Event
from services.core.config import Config, StageSettings
from services.runtime.options import StageOptions, parse_options
from services.state.acquisitions import lookup_acquisition
from services.state.buckets import Buckets, KeyValue

HOSTNAME = socket.gethostname()
REPAIR_PREFIX = "repair-"  # repairs only fill in what is missing


@dataclass
class Result:
    """What handling one event produced: the events to publish next and I/O figures."""

    events: list[Event] = field(default_factory=list)
    bytes_read: int = 0
    bytes_written: int = 0
    detail: str = ""  # recorded in the tile's history (e.g. an external program's exit code)
    # the outputs were complete with the same basis (nothing recomputed): their events are
    # published only where the log lacks them, so a rewound consumer adds no duplicates
    unchanged: bool = False


@dataclass
class Context:
    """Per-delivery facts a handler may use, and its bookkeeping buckets (`Buckets`)."""

    config: Config
    settings: StageSettings
    attempt: int
    host: str = HOSTNAME
    worker: str = ""
    store: Buckets | None = None  # the runtime's transport; None: no bookkeeping here
    log: Any = None
    replay: str | None = None  # tag of a `tilepipe replay`/`retry`/`repair` delivery

    async def kv(self, bucket: str) -> KeyValue:
        """A key-value bucket (one the stage lists in `Stage.buckets`)."""
        if self.store is None:
            raise RuntimeError(f"no key-value store in this context (bucket {bucket})")
        return await self.store.kv(bucket)

    async def acquisition(self, acq: str) -> dict | None:
        """The watcher's record of an acquisition (`{"manifest": ..., "state": ...}`), or
        None (unknown, or no store in this context)."""
        return None if self.store is None else await lookup_acquisition(self.store, acq)

    @property
    def force(self) -> bool:
        """Recompute even if the outputs are complete (a replay or retry, not a repair)."""
        return self.replay is not None and not self.replay.startswith(REPAIR_PREFIX)


class Stage:
    """Base of every stage: declare `name`, `consumes`, and implement `handle`.

    `handle` may be a plain function (run in a worker thread, so NumPy/CuPy work does not block
    the event loop; a stage whose handler is cheap sets `blocking = False` to run it inline)
    or a coroutine. It must be idempotent: a redelivered event must not duplicate or corrupt
    outputs.
    """

    name: ClassVar[str]
    blocking: ClassVar[bool] = True
    consumes: ClassVar[tuple[type[Event], ...]]
    produces: ClassVar[tuple[type[Event], ...]] = ()
    buckets: ClassVar[tuple[str, ...]] = ()  # KV buckets it keeps bookkeeping in (usage gauges)
    defaults: ClassVar[dict[str, Any]] = {}  # its StageSettings over the global defaults
    options_model: ClassVar[type[StageOptions]] = StageOptions  # `options`: none unless declared

    def __init__(self, config: Config, settings: StageSettings, name: str | None = None) -> None:
        self.config = config
        self.settings = settings
        self.name = name or type(self).name
        self.options = parse_options(self.options_model, settings.options, self.name)

    async def setup(self, store: Buckets) -> None:
        """Called once after connecting (open KV buckets, warm caches)."""

    def handle(self, event: Event, ctx: Context) -> Result:  # pragma: no cover - abstract
        raise NotImplementedError
