"""Fixtures shared by the integration tests."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from mesh.logging import add_request_context


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    """Log events as the configured JSON renderer would get them (context merged in)."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    with structlog.testing.capture_logs(
            processors=[structlog.contextvars.merge_contextvars, add_request_context]) as entries:
        yield entries
    structlog.reset_defaults()
