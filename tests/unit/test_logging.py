"""Structured logs: JSON lines with the request's context, and the ids read from its metadata.

The JSON tests run in subprocesses: ``configure`` caches loggers that hold the stream they write to,
which must not be pytest's capture stream of one test.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mesh.logging import RequestContext, trace_id_of
from mesh.settings import RouterSettings

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}

SCRIPT = """
import structlog
from mesh.logging import bind_request, configure
from mesh.settings import LogSettings

configure(LogSettings(format="json", level="info"), component="runtime")
structlog.contextvars.bind_contextvars(instance_id="i-1")
log = structlog.get_logger("test")
log.info("before any request")
bind_request("m/1", (("x-request-id", "req-7"),
                     ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")))
log.info("model loaded", size_bytes=3, note='quote " and\\nnewline')
log.debug("filtered out")
try:
    1 / 0
except ZeroDivisionError:
    log.exception("failed")
bind_request("m2", ())
log.warning("no ids sent")
"""


def json_lines(text: str) -> list[dict[str, object]]:
    lines = [line for line in text.splitlines() if line.strip()]
    return [json.loads(line) for line in lines]  # each line alone is one JSON object


def test_json_lines_carry_the_request_context() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=ENV,
                          timeout=60, check=True)
    first, loaded, failed, anonymous = json_lines(done.stderr)
    assert first["event"] == "before any request" and "model_id" not in first
    assert first["component"] == "runtime" and first["instance_id"] == "i-1"
    assert loaded["event"] == "model loaded" and loaded["level"] == "info" and loaded["timestamp"]
    assert loaded["model_id"] == "m/1" and loaded["request_id"] == "req-7"
    assert loaded["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736" and loaded["instance_id"] == "i-1"
    assert "ZeroDivisionError" in str(failed["exception"]) and failed["request_id"] == "req-7"
    assert anonymous["model_id"] == "m2" and len(str(anonymous["request_id"])) == 16
    assert "trace_id" not in anonymous


def test_mesh_serve_router_logs_json_lines(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    env = {**ENV, "MESH_LOG_FORMAT": "json", "MESH_REGISTRY_URL": "memory://", "MESH_LOG_ACCESS_LOG": "1"}
    if "metrics_port" in {f.name for f in dataclasses.fields(RouterSettings)}:
        env["MESH_ROUTER_METRICS_PORT"] = "0"  # any free port: 2112 may be taken on a shared machine
    with subprocess.Popen([sys.executable, "-m", "mesh", "serve", "router", "--port", "0",
                           "--ready-file", str(ready)], stderr=subprocess.PIPE, text=True, env=env) as proc:
        try:
            deadline = time.monotonic() + 30
            while not ready.exists():
                assert proc.poll() is None and time.monotonic() < deadline, "the router did not start"
                time.sleep(0.05)
        finally:
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=30)
    lines = json_lines(stderr)
    events = [line["event"] for line in lines]
    assert "router serving" in events and "router stopped" in events
    assert all(line["component"] == "router" for line in lines)
    # not serving while its view is built, then for want of runtimes (none in a memory registry)
    reasons = [line["reason"] for line in lines if line["event"] == "readiness: not serving"]
    assert reasons[0] == "starting: building the view of the registry"
    assert reasons[1] == "no runtime instance in the registry"


def test_ids_are_read_from_metadata_only_when_asked_for() -> None:
    ctx = RequestContext("m", (("x-request-id", "abc"), ("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-00")))
    assert ctx.request_id == "abc" and ctx.trace_id == "1" * 32
    generated = RequestContext("m", ())
    assert generated.request_id == generated.request_id  # made once, then kept
    assert generated.trace_id is None


def test_malformed_traceparents_have_no_trace_id() -> None:
    ok = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert trace_id_of(ok) == "4bf92f3577b34da6a3ce929d0e0e4736"
    for bad in ("", "garbage", "00-" + "0" * 32 + "-00f067aa0ba902b7-01", "ff" + ok[2:],
                "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01", "00-" + "z" * 32 + "-00f067aa0ba902b7-01",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"):
        assert trace_id_of(bad) is None, bad
