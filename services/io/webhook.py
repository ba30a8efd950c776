"""POST Slack-compatible JSON (``{"text": ..., "blocks": [...]}``) to a webhook URL.

The URL is a secret (a Slack webhook URL is its own credential): it is read from a file that
group and others cannot read (:func:`services.core.config.check_secret_file`), never logged, and
errors are logged by type and HTTP status only. A delivery is retried after each of
``backoff_s`` (a refused connection, a timeout, HTTP 429 or 5xx); then it is dropped: logged
(``notification_dropped``) and counted (``tilepipe_notify_messages_total{outcome="dropped"}``),
never raised, so a receiver that is down never holds up anything else.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from services.core.config import check_secret_file
from services.core.metrics import NOTIFY_MESSAGES


def read_webhook_url(path: Path) -> str:
    """The URL in a secret file (first non-empty line); ValueError without naming it."""
    check_secret_file(Path(path), forbidden=0o077)
    lines = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
    if not lines or not lines[0].startswith(("http://", "https://")):
        raise ValueError(f"{path}: the first line must be an http(s) webhook URL")
    return lines[0]


def slack_message(text: str, lines: Sequence[str] = ()) -> dict[str, Any]:
    """`text` (the fallback and title) and one mrkdwn section with `lines`."""
    body = "\n".join([f"*{text}*", *lines])
    return {"text": text, "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": body}}]}


class Webhook:
    """One destination; :meth:`post` retries then drops (module doc)."""

    def __init__(self, url: str, timeout_s: float, backoff_s: Sequence[float], log: Any) -> None:
        self._url = url
        self.timeout_s = timeout_s
        self.backoff_s = list(backoff_s)
        self.log = log

    def __repr__(self) -> str:  # never show the URL
        return "Webhook(<secret url>)"

    def _send(self, body: bytes) -> int:
        request = urllib.request.Request(
            self._url, data=body, method="POST", headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    async def post(self, message: dict[str, Any], kind: str) -> bool:
        """Deliver `message`; True when the receiver answered 2xx."""
        body = json.dumps(message).encode()
        error = ""
        for attempt in range(len(self.backoff_s) + 1):
            try:
                status = await asyncio.to_thread(self._send, body)
            except (OSError, ValueError, http.client.HTTPException) as exc:  # down, timeout, junk
                error = type(exc).__name__
            else:
                if 200 <= status < 300:
                    NOTIFY_MESSAGES.labels(kind, "sent").inc()
                    return True
                error = f"HTTP {status}"
                if 400 <= status < 500 and status != 429:
                    break  # the receiver refuses this message: retrying will not help
            if attempt < len(self.backoff_s):
                await asyncio.sleep(self.backoff_s[attempt])
        NOTIFY_MESSAGES.labels(kind, "dropped").inc()
        self.log.warning(
            "notification_dropped", notification=kind, attempts=attempt + 1, error=error
        )
        return False
