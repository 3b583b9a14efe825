"""W3C trace context and request ids across the router hop, through an in-process mesh.

Without tracing the ids travel in the client's metadata and land in both components' log context
(seen here in the access log and in the load's log line); with ``log.tracing = "otel"`` the router's
span is the parent of the runtime's, in the client's trace when it sent one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from mesh.tensors import encode_request
from tests.support.inprocess import InProcessMesh, memory_url
from tests.support.models import ModelArtifact, make_model

pytestmark = pytest.mark.integration

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_SPAN}-01"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> ModelArtifact:
    return make_model("sklearn", tmp_path_factory.mktemp("models"), seed=3)


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    """One SDK tracer provider per process (OpenTelemetry allows setting it once)."""
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


async def started(**log: Any) -> InProcessMesh:
    return await InProcessMesh(memory_url(), log_overrides=log).start(runtimes=1)


@pytest.fixture(params=[2, 0], ids=["multiplexed", "unary"])
async def mesh(request: pytest.FixtureRequest) -> AsyncIterator[InProcessMesh]:
    m = InProcessMesh(memory_url(), router_overrides={"streams_per_runtime": request.param},
                      log_overrides={"access_log": True})
    await m.start(runtimes=1)
    try:
        yield m
    finally:
        await m.stop()


async def infer(m: InProcessMesh, model: ModelArtifact, *headers: tuple[str, str]) -> None:
    await m.v2.ModelInfer(encode_request(model_name="", inputs={"input-0": model.sample}),
                          metadata=(("mm-model-id", "m"), *headers), timeout=30)


async def test_trace_and_request_ids_reach_the_runtime_log_context(
        mesh: InProcessMesh, model: ModelArtifact, logs: list[dict[str, Any]]) -> None:
    await mesh.register("m", "sklearn", str(model.path))
    await infer(mesh, model, ("traceparent", TRACEPARENT), ("x-request-id", "req-1"))
    await infer(mesh, model)  # no ids: the router makes a request id (access log on), no trace id

    access = [e for e in logs if e["event"] in ("request", "inference")]
    routed, answered = [e for e in access if e["event"] == "request"], [e for e in access if e["event"] == "inference"]
    assert len(routed) == 2 and len(answered) == 2
    for line in (routed[0], answered[0]):
        assert line["trace_id"] == TRACE_ID and line["request_id"] == "req-1"
        assert line["model_id"] == "m" and line["code"] == "OK"
    assert routed[0]["method"] == "ModelInfer" and routed[0]["bytes_in"] > 0 and routed[0]["bytes_out"] > 0
    assert routed[0]["instance_id"] == answered[0]["instance_id"]  # the router's target, the runtime's own
    assert "trace_id" not in routed[1] and "trace_id" not in answered[1]
    assert len(routed[1]["request_id"]) == 16 and routed[1]["request_id"] == answered[1]["request_id"]
    # The cold load ran in the context of the request that caused it: one line, with its reason.
    loaded = [e for e in logs if e["event"] == "model loaded"]
    assert len(loaded) == 1 and loaded[0]["reason"] == "request" and loaded[0]["trace_id"] == TRACE_ID


async def test_errors_are_access_logged_with_their_code(
        mesh: InProcessMesh, model: ModelArtifact, logs: list[dict[str, Any]]) -> None:
    with pytest.raises(Exception, match="not found"):
        await infer(mesh, model, ("x-request-id", "req-2"))
    (line,) = [e for e in logs if e["event"] == "request"]
    assert line["code"] == "NOT_FOUND" and line["request_id"] == "req-2" and line["model_id"] == "m"


async def test_router_span_is_the_parent_of_the_runtime_span(
        model: ModelArtifact, spans: InMemorySpanExporter) -> None:
    m = await started(tracing="otel")
    try:
        await m.register("m", "sklearn", str(model.path))
        spans.clear()
        await infer(m, model, ("traceparent", TRACEPARENT))
        router, runtime = _pair(spans)
        assert f"{router.context.trace_id:032x}" == TRACE_ID
        assert f"{router.parent.span_id:016x}" == PARENT_SPAN  # the client's span
        assert runtime.context.trace_id == router.context.trace_id
        assert runtime.parent.span_id == router.context.span_id
        assert runtime.attributes["mesh.model_id"] == "m"
        assert router.attributes["mesh.instance_id"] == runtime.attributes["mesh.instance_id"]

        spans.clear()
        await infer(m, model)  # no traceparent: the router starts a trace
        router, runtime = _pair(spans)
        assert router.parent is None
        assert runtime.parent.span_id == router.context.span_id
        assert runtime.context.trace_id == router.context.trace_id
    finally:
        await m.stop()


def _pair(exporter: InMemorySpanExporter) -> tuple[Any, Any]:
    finished = exporter.get_finished_spans()
    by_component = {s.attributes["mesh.component"]: s for s in finished}
    assert len(finished) == 2 and set(by_component) == {"router", "runtime"}
    for span in finished:
        assert span.name == "inference.GRPCInferenceService/ModelInfer"
        assert span.status.is_ok
    return by_component["router"], by_component["runtime"]


async def test_failed_request_span_has_an_error_status(model: ModelArtifact, spans: InMemorySpanExporter) -> None:
    m = await started(tracing="otel")
    try:
        spans.clear()
        with pytest.raises(Exception, match="not found"):
            await infer(m, model)
        (router,) = spans.get_finished_spans()
        assert not router.status.is_ok and "NOT_FOUND" in (router.status.description or "")
        assert router.attributes["rpc.grpc.status_code"] == 5
    finally:
        await m.stop()

