"""Shared fixtures. ``etcd``: a private etcd server on 127.0.0.1, one per test (about 0.3 s to start)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.registry.etcd_server import EtcdProcess


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdProcess]:
    server = EtcdProcess(tmp_path / "etcd")
    server.start()
    try:
        yield server
    finally:
        server.stop()
