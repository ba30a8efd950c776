"""Structured logging: JSON lines with acquisition/slice/tile context bound per message."""

from __future__ import annotations

import logging
import sys
import time

import orjson
import structlog

_configured = False
_second: list = [None, ""]  # the current UTC second and its ISO text


def _utc_timestamp(_logger: object, _method: str, event_dict: dict) -> dict:
    """An ISO-8601 UTC `timestamp` with microseconds (`...T12:00:00.123456Z`), as structlog's
    TimeStamper writes it, with the date part formatted once a second (runs for every line)."""
    now = time.time()
    second = int(now)
    if second != _second[0]:
        _second[:] = [second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))]
    event_dict["timestamp"] = f"{_second[1]}.{int((now - second) * 1e6):06d}Z"
    return event_dict


_format_exc_info = structlog.processors.format_exc_info
_LEVEL_OF = {"warn": "warning", "exception": "error"}  # as structlog's add_log_level names them


def _json_line(logger: object, method: str, event_dict: dict) -> bytes:
    """The JSON line of a log call (runs for every line, so one function, not a chain):
    `level` and `timestamp` as structlog's add_log_level and TimeStamper write them, an
    `exc_info` rendered as the `exception` text, then orjson."""
    event_dict["level"] = _LEVEL_OF.get(method, method)
    _utc_timestamp(logger, method, event_dict)
    if "exc_info" in event_dict:
        event_dict = _format_exc_info(logger, method, event_dict)
    return orjson.dumps(event_dict, default=repr)


def configure_logging(level: str = "info", json_format: bool = True, stream=None) -> None:
    """Configure structlog once per process (JSON in services, console for humans)."""
    global _configured
    stream = stream or sys.stderr
    if json_format:  # one processor per line: level, time, traceback and orjson's bytes
        processors = [_json_line]
        factory = structlog.BytesLoggerFactory(file=getattr(stream, "buffer", stream))
    else:
        processors = [
            structlog.processors.add_log_level,
            _utc_timestamp,
            structlog.processors.format_exc_info,
            structlog.dev.ConsoleRenderer(colors=False),
        ]
        factory = structlog.WriteLoggerFactory(file=stream)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
        ),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
    _configured = True


def get_logger(**context: object) -> structlog.stdlib.BoundLogger:
    """A logger carrying `context`; configures defaults on first use."""
    if not _configured:
        configure_logging()
    return structlog.get_logger().bind(**context)
