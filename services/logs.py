"""Structured logging: JSON lines with acquisition/slice/tile context bound per message."""

from __future__ import annotations

import logging
import sys

import orjson
import structlog

_configured = False


def configure_logging(level: str = "info", json_format: bool = True, stream=None) -> None:
    """Configure structlog once per process (JSON in services, console for humans)."""
    global _configured
    stream = stream or sys.stderr
    if json_format:  # orjson renders bytes: about twice as fast as json + print per line
        renderer = structlog.processors.JSONRenderer(serializer=orjson.dumps)
        factory = structlog.BytesLoggerFactory(file=getattr(stream, "buffer", stream))
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
        factory = structlog.WriteLoggerFactory(file=stream)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
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
