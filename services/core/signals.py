"""The one way a tilepipe process hears SIGTERM and SIGINT: an asyncio.Event set by either."""

from __future__ import annotations

import asyncio
import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def stop_on_signals() -> asyncio.Event:
    """An event set when the running loop's process gets SIGTERM or SIGINT (call inside the
    loop; the handlers stay until the loop closes)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    return stop
