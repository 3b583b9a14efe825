"""Shared fixtures. ``etcd``: a private etcd server on 127.0.0.1, one per test (about 0.3 s to start).

Routers serve REST on a free port in tests (``MESH_ROUTER_REST_PORT=0``, inherited by the
processes tests start), not on 8008: tests run routers side by side, and a developer's machine may
have 8008 taken. A test that needs a fixed REST port sets it itself."""

from __future__ import annotations

import os

# Before anything imports grpc: no gRPC fork handlers in the test process. Tests start servers with
# a ``preexec_fn`` (mesh.procs.die_with_parent), which makes Python fork() rather than spawn; gRPC's
# fork handlers then run in the child while other threads of the parent are inside gRPC ("skipping
# fork() handlers") and now and then abort it (SIGABRT before it even execs). The child execs at
# once and needs none of gRPC's state, so the handlers protect nothing here.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.registry.etcd_server import EtcdProcess

os.environ.setdefault("MESH_ROUTER_REST_PORT", "0")


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdProcess]:
    server = EtcdProcess(tmp_path / "etcd")
    server.start()
    try:
        yield server
    finally:
        server.stop()
