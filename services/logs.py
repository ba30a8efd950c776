"""Structured logging: JSON lines with acquisition/slice/tile context bound per message."""

from __future__ import annotations

import logging
import sys

import structlog

_configured = False


def configure_logging(level: str = "info", json_format: bool = True, stream=None) -> None:
    """Configure structlog once per process (JSON in services, console for humans)."""
    global _configured
    renderer = (
        structlog.processors.JSONRenderer()
        if json_format
        else structlog.dev.ConsoleRenderer(colors=False)
    )
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
        logger_factory=structlog.PrintLoggerFactory(file=stream or sys.stderr),
        cache_logger_on_first_use=False,
    )
    _configured = True


def get_logger(**context: object) -> structlog.stdlib.BoundLogger:
    """A logger carrying `context`; configures defaults on first use."""
    if not _configured:
        configure_logging()
    return structlog.get_logger().bind(**context)
