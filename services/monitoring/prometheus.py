"""Prometheus scrape configurations for the services `tilepipe up` or systemd run."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from services.io.atomic import write_atomically
from services.stages import configured_services, metrics_port_for

# ---------------------------------------------------------------------------- Prometheus
JOB_PREFIX = "tilepipe-"  # Prometheus job of a service: tilepipe-<service>
_UP_LINE = re.compile(r"^\s*(?P<name>[\w.-]+)\s+metrics\s+https?://(?P<target>[^/\s]+)/metrics")


def targets_from_up_output(text: str) -> dict[str, list[str]]:
    """Service -> ["host:port"] from what `tilepipe up` printed."""
    targets: dict[str, list[str]] = {}
    for line in text.splitlines():
        found = _UP_LINE.match(line)
        if found:
            targets.setdefault(found["name"], []).append(found["target"])
    return targets


def targets_for_config(config, services: Iterable[str] | None = None) -> dict[str, list[str]]:
    """Service -> ["host:port"] of services run by `tilepipe run` with this config."""

    if services is None:
        services = configured_services(config)
    host = config.metrics.host
    host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    return {name: [f"{host}:{metrics_port_for(config, name)}"] for name in services}


def _duration(seconds: float) -> str:
    return f"{int(seconds * 1000)}ms" if seconds < 1 else f"{seconds:g}s"


def scrape_config(
    targets: Mapping[str, str | Sequence[str]],
    interval_s: float = 15.0,
    host: str | None = None,
    rule_files: Sequence[str | Path] = (),
) -> dict:
    """A Prometheus configuration scraping each service as job `tilepipe-<service>`."""
    host = host or socket.gethostname()
    return {
        "global": {
            "scrape_interval": _duration(interval_s),
            "scrape_timeout": _duration(min(interval_s, 10.0)),
            "evaluation_interval": _duration(interval_s),
        },
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [
            {
                "job_name": f"{JOB_PREFIX}{name}",
                "metrics_path": "/metrics",
                "static_configs": [
                    {
                        "targets": [found] if isinstance(found, str) else list(found),
                        "labels": {"host": host},
                    }
                ],
            }
            for name, found in targets.items()
        ],
    }


def write_prometheus_config(path: Path | str, targets, **kwargs) -> Path:
    """Write `scrape_config(...)` (JSON, which is YAML) atomically; returns the path."""

    return write_atomically(Path(path), json.dumps(scrape_config(targets, **kwargs), indent=2))
