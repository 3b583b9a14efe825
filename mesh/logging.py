"""structlog set-up: readable on a terminal, JSON lines otherwise; configured once per process.

Context (model id, instance id, request id) is bound with ``structlog.contextvars`` so that every
line logged while serving a request carries it without passing it around.
"""

from __future__ import annotations

import logging
import sys

import structlog

from mesh.settings import LogSettings


def configure(settings: LogSettings, *, component: str) -> None:
    level = getattr(logging, settings.level.upper(), None)
    if not isinstance(level, int):
        level = logging.INFO
    fmt = settings.format
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: structlog.types.Processor = (
        structlog.dev.ConsoleRenderer(colors=False) if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(component=component)
    # Libraries that use the standard logging module (grpc, aetcd) go to stderr at warning level.
    logging.basicConfig(level=max(level, logging.WARNING), stream=sys.stderr)
