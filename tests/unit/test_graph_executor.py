"""GraphRunner: KServe's graph semantics over V2 bytes, against fake steps that compute real answers.

The steps here are plain coroutines doing numpy arithmetic on the decoded request (the real
models, routers and runtimes are the integration tests'); what is under test is the graph logic:
which step runs on what, in which order or concurrently, and what a failure does.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import structlog

from mesh.errors import Code, DeadlineExceeded, InvalidArgument, RemoteError
from mesh.gen.inference import grpc_service_pb2 as pb
from mesh.graphs import v2
from mesh.graphs.condition import MAX_WORK
from mesh.graphs.executor import GraphError, GraphRunner, Headers, StepRefused
from mesh.graphs.spec import Graph, parse_graph
from mesh.tensors import decode_inputs, decode_response, encode_request, encode_response

X = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)
HEADERS: Headers = (("x-tenant", "blue"), ("traceparent", "00-abc-def-01"))


@dataclass
class Call:
    model: str
    request: pb.ModelInferRequest
    headers: Headers
    timeout: float | None


def _compute(model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    first = next(iter(inputs.values()))
    if model.startswith("double"):
        return {"y": first * 2}
    if model.startswith("add1"):
        return {"y": first + 1}
    if model == "split":            # two outputs: y = x, z = 10 x
        return {"y": first.copy(), "z": first * 10}
    if model == "sum":              # every input, summed: checks that names and all inputs came over
        return {"y": np.sum(list(inputs.values()), axis=0)}
    if model == "label":            # a BYTES output
        return {"label": np.array([b"big" if float(first.sum()) > 10 else b"small"], dtype=object)}
    raise AssertionError(f"no fake model {model!r}")


@dataclass
class Models:
    """The StepCall: records every call, computes real answers, fails the models told to."""

    calls: list[Call] = field(default_factory=list)
    failing: dict[str, RemoteError] = field(default_factory=dict)
    typed: set[str] = field(default_factory=set)        # models answering typed contents, not raw
    hooks: dict[str, Callable[[], Awaitable[None]]] = field(default_factory=dict)

    async def __call__(self, model: str, body: bytes, headers: Headers, timeout: float | None) -> bytes:
        request = pb.ModelInferRequest.FromString(body)
        assert request.model_name == model and request.model_version == ""
        # Canonical: the fields are spliced, never repeated (the client's model_name is replaced).
        names = [f for f, _, _, _ in v2._fields(body, "request") if f in (1, 2)]
        assert names == [1, 2]
        self.calls.append(Call(model, request, headers, timeout))
        hook = self.hooks.get(model)
        if hook is not None:
            await hook()
        if model in self.failing:
            raise self.failing[model]
        outputs = _compute(model, decode_inputs(request))
        response = encode_response(model_name=model, model_version="7", request_id=request.id,
                                   outputs=outputs, raw=model not in self.typed)
        response.parameters["answered_by"].string_param = model
        return bytes(response.SerializeToString())

    def models(self) -> list[str]:
        return [c.model for c in self.calls]


def request(x: np.ndarray = X, *, outputs: tuple[str, ...] = (), tenant: str = "gold", raw: bool = True) -> bytes:
    req = encode_request(model_name="g", inputs={"x": x}, request_id="req-1", outputs=outputs, raw=raw)
    req.parameters["tenant"].string_param = tenant
    return bytes(req.SerializeToString())


def answer(body: bytes) -> tuple[pb.ModelInferResponse, dict[str, np.ndarray]]:
    fields = v2._fields(body, "response")
    assert [f for f, _, _, _ in fields if f == 1] == [1]   # one model_name: spliced, not appended
    for f, _, v, e in fields:
        if f == 5:   # one name per output tensor, renamed or not
            assert [g for g, _, _, _ in v2._fields(body[v:e], "tensor") if g == 1] == [1]
    resp = pb.ModelInferResponse.FromString(body)
    return resp, decode_response(resp)


def graph(**nodes: Any) -> Graph:
    return parse_graph("g", {"nodes": nodes})


def seq(*steps: Any) -> dict[str, Any]:
    return {"routerType": "Sequence", "steps": list(steps)}


def ensemble(*steps: Any) -> dict[str, Any]:
    return {"routerType": "Ensemble", "steps": list(steps)}


def switch(*steps: Any) -> dict[str, Any]:
    return {"routerType": "Switch", "steps": list(steps)}


async def run(g: Graph, models: Models, body: bytes | None = None, timeout: float | None = 30.0,
              rng: random.Random | None = None) -> bytes:
    return await GraphRunner(models, rng).run(g, request() if body is None else body, HEADERS, timeout)


def boom(code: Code = Code.FAILED_PRECONDITION, message: str = "model says no") -> RemoteError:
    return RemoteError(code, message)


# --- Sequence ------------------------------------------------------------------------------------


async def test_sequence_feeds_each_response_to_the_next_step() -> None:
    models = Models()
    out = await run(graph(root=seq({"serviceName": "double"}, {"serviceName": "add1", "data": "$response"},
                                   {"serviceName": "double2", "data": "$response"})), models)
    resp, outputs = answer(out)
    np.testing.assert_array_equal(outputs["y"], (X * 2 + 1) * 2)
    assert (resp.model_name, resp.model_version, resp.id) == ("g", "", "req-1")
    assert models.models() == ["double", "add1", "double2"]
    second = models.calls[1].request
    # The previous response's outputs became inputs; the client's id and parameters were kept and
    # the response's own parameters dropped.
    assert [i.name for i in second.inputs] == ["y"]
    assert second.id == "req-1"
    assert dict(second.parameters) == {"tenant": second.parameters["tenant"]}
    assert second.parameters["tenant"].string_param == "gold"
    assert all(c.headers == HEADERS for c in models.calls)


async def test_request_data_gives_the_node_input_again() -> None:
    models = Models()
    out = await run(graph(root=seq({"serviceName": "double"}, {"serviceName": "add1"})), models)
    np.testing.assert_array_equal(answer(out)[1]["y"], X + 1)


async def test_every_output_becomes_an_input_of_the_same_name() -> None:
    models = Models()
    out = await run(graph(root=seq({"serviceName": "split"}, {"serviceName": "sum", "data": "$response"})), models)
    assert [i.name for i in models.calls[1].request.inputs] == ["y", "z"]
    np.testing.assert_array_equal(answer(out)[1]["y"], X * 11)


@pytest.mark.parametrize(("typed", "raw_request"), [({"split"}, True), (set(), False), ({"split", "sum"}, False)])
async def test_typed_and_raw_contents_both_pass_on(typed: set[str], raw_request: bool) -> None:
    models = Models(typed=typed)
    out = await run(graph(root=seq({"serviceName": "split"}, {"serviceName": "sum", "data": "$response"})), models,
                    body=request(raw=raw_request))
    np.testing.assert_array_equal(answer(out)[1]["y"], X * 11)


async def test_bytes_outputs_pass_on() -> None:
    models = Models()
    g = graph(root=seq({"serviceName": "double"}, {"serviceName": "label", "data": "$response"}))
    _, outputs = answer(await run(g, models))
    assert outputs["label"].tolist() == [b"big"]


async def test_a_soft_step_that_fails_is_skipped_and_logged() -> None:
    models = Models(failing={"add1": boom()})
    g = graph(root=seq({"serviceName": "double"}, {"serviceName": "add1", "data": "$response", "name": "flaky"},
                       {"serviceName": "double2", "data": "$response"}))
    with structlog.testing.capture_logs() as logs:
        out = await run(g, models)
    np.testing.assert_array_equal(answer(out)[1]["y"], X * 4)   # double2 got double's response
    assert models.models() == ["double", "add1", "double2"]
    skipped = [e for e in logs if e.get("step") == "flaky"]
    assert skipped and skipped[0]["graph"] == "g" and skipped[0]["node"] == "root"
    assert "model says no" in skipped[0]["error"]


async def test_with_no_successful_step_yet_response_data_is_the_node_input() -> None:
    models = Models(failing={"double": boom()})
    out = await run(graph(root=seq({"serviceName": "double"}, {"serviceName": "add1", "data": "$response"})), models)
    np.testing.assert_array_equal(answer(out)[1]["y"], X + 1)
    assert [i.name for i in models.calls[1].request.inputs] == ["x"]


async def test_a_failing_last_step_fails_the_graph_with_its_place_and_code() -> None:
    models = Models(failing={"add1": boom(Code.RESOURCE_EXHAUSTED, "queue full")})
    with pytest.raises(GraphError) as info:
        await run(graph(root=seq({"serviceName": "double"}, {"serviceName": "add1", "data": "$response"})), models)
    err = info.value
    assert err.code is Code.RESOURCE_EXHAUSTED
    assert err.message == "graph 'g', node 'root', step 'add1' (model 'add1'): queue full"
    assert (err.graph, err.node, err.step) == ("g", "root", "add1")


async def test_a_hard_step_that_fails_stops_the_sequence() -> None:
    models = Models(failing={"double": boom(Code.NOT_FOUND, "model 'double' not found")})
    with pytest.raises(GraphError) as info:
        await run(graph(root=seq({"serviceName": "double", "dependency": "Hard", "name": "first"},
                                 {"serviceName": "add1"})), models)
    assert info.value.code is Code.NOT_FOUND
    assert "graph 'g', node 'root', step 'first' (model 'double'): model 'double' not found" == info.value.message
    assert models.models() == ["double"]


async def test_a_sequence_condition_stops_with_the_previous_response() -> None:
    over_100 = 'outputs.#(name=="y").data.#(>100)'
    g = graph(root=seq({"serviceName": "double"}, {"serviceName": "add1", "data": "$response", "condition": over_100}))
    models = Models()
    np.testing.assert_array_equal(answer(await run(g, models))[1]["y"], X * 2)
    assert models.models() == ["double"]
    models = Models()
    np.testing.assert_array_equal(answer(await run(g, models, body=request(X * 100)))[1]["y"], X * 200 + 1)
    assert models.models() == ["double", "add1"]


# --- Switch --------------------------------------------------------------------------------------


async def test_switch_runs_the_first_matching_step() -> None:
    g = graph(root=switch(
        {"serviceName": "double", "condition": '[@this].#(parameters.tenant=="gold")'},
        {"serviceName": "add1", "condition": 'inputs.#(name=="x").data.#(>2)'},
        {"serviceName": "split", "condition": "@this"}))
    models = Models()
    np.testing.assert_array_equal(answer(await run(g, models))[1]["y"], X * 2)
    models = Models()
    np.testing.assert_array_equal(answer(await run(g, models, body=request(tenant="silver")))[1]["y"], X + 1)
    models = Models()
    out = await run(g, models, body=request(X - 10, tenant="silver"))
    assert set(answer(out)[1]) == {"y", "z"}
    assert models.models() == ["split"]


async def test_switch_with_no_match_fails_with_not_found() -> None:
    g = graph(root=switch({"serviceName": "double", "condition": '[@this].#(parameters.tenant=="gold")'}))
    models = Models()
    with pytest.raises(GraphError) as info:
        await run(g, models, body=request(tenant="silver"))
    assert info.value.code is Code.NOT_FOUND
    assert info.value.message == "graph 'g', node 'root': no step's condition matched the request"
    assert models.calls == []


async def test_switch_on_a_previous_response_in_a_nested_node() -> None:
    g = graph(root=seq({"serviceName": "double"}, {"nodeName": "route", "data": "$response"}),
              route=switch({"serviceName": "add1", "condition": 'inputs.#(name=="y").data.#(>5)'},
                           {"serviceName": "double2", "condition": "@this"}))
    models = Models()
    np.testing.assert_array_equal(answer(await run(g, models))[1]["y"], X * 2 + 1)   # 2*3 = 6 > 5
    models = Models()
    np.testing.assert_array_equal(answer(await run(g, models, body=request(X / 10)))[1]["y"], X / 10 * 4)


# --- Ensemble ------------------------------------------------------------------------------------


async def test_ensemble_steps_run_concurrently_and_merge_in_step_order() -> None:
    started: list[str] = []
    everyone = asyncio.Event()

    def barrier(name: str) -> Callable[[], Awaitable[None]]:
        async def hook() -> None:
            started.append(name)
            if len(started) == 3:
                everyone.set()
            await everyone.wait()   # run one after the other, this would never return
        return hook

    models = Models(hooks={m: barrier(m) for m in ("double", "add1", "split")})
    g = graph(root=ensemble({"serviceName": "double"}, {"serviceName": "add1", "name": "plus"},
                            {"serviceName": "split"}))
    async with asyncio.timeout(10):   # a guard against a hang, not a timing assertion
        resp, outputs = answer(await run(g, models))
    assert [o.name for o in resp.outputs] == ["double.y", "plus.y", "split.y", "split.z"]
    np.testing.assert_array_equal(outputs["double.y"], X * 2)
    np.testing.assert_array_equal(outputs["plus.y"], X + 1)
    np.testing.assert_array_equal(outputs["split.z"], X * 10)
    assert (resp.model_name, resp.id) == ("g", "req-1")


async def test_a_hard_failure_in_an_ensemble_cancels_the_other_steps() -> None:
    slow_started = asyncio.Event()
    cancelled: list[str] = []

    async def slow() -> None:
        slow_started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append("double")
            raise

    async def fail_after_slow_started() -> None:
        await slow_started.wait()

    models = Models(hooks={"double": slow, "add1": fail_after_slow_started},
                    failing={"add1": boom(Code.INTERNAL, "crashed")})
    g = graph(root=ensemble({"serviceName": "double"}, {"serviceName": "add1", "dependency": "Hard"}))
    async with asyncio.timeout(10):
        with pytest.raises(GraphError) as info:
            await run(g, models)
    assert info.value.message == "graph 'g', node 'root', step 'add1' (model 'add1'): crashed"
    assert info.value.code is Code.INTERNAL
    assert cancelled == ["double"]


async def test_a_soft_failure_in_an_ensemble_contributes_nothing() -> None:
    models = Models(failing={"add1": boom()})
    resp, _ = answer(await run(graph(root=ensemble({"serviceName": "double"}, {"serviceName": "add1"})), models))
    assert [o.name for o in resp.outputs] == ["double.y"]


async def test_an_ensemble_with_no_answer_fails_with_its_first_failure() -> None:
    models = Models(failing={"double": boom(Code.UNAVAILABLE, "gone"), "add1": boom()})
    with pytest.raises(GraphError) as info:
        await run(graph(root=ensemble({"serviceName": "double"}, {"serviceName": "add1"})), models)
    assert info.value.code is Code.UNAVAILABLE
    assert "step 'double'" in info.value.message


async def test_an_ensemble_of_raw_and_typed_answers_is_all_raw() -> None:
    models = Models(typed={"add1", "label"})
    g = graph(root=ensemble({"serviceName": "double"}, {"serviceName": "add1"}, {"serviceName": "label"}))
    resp, outputs = answer(await run(g, models))
    assert len(resp.raw_output_contents) == 3
    np.testing.assert_array_equal(outputs["add1.y"], X + 1)
    assert outputs["label.label"].tolist() == [b"small"]


async def test_an_ensemble_of_typed_answers_stays_typed() -> None:
    models = Models(typed={"double", "add1"})
    resp, outputs = answer(await run(graph(root=ensemble({"serviceName": "double"}, {"serviceName": "add1"})),
                                     models))
    assert len(resp.raw_output_contents) == 0
    np.testing.assert_array_equal(outputs["double.y"], X * 2)


async def test_a_bug_in_a_step_is_not_disguised_as_a_graph_error() -> None:
    async def bug() -> None:
        raise KeyError("oops")

    models = Models(hooks={"add1": bug})
    with pytest.raises(KeyError):
        await run(graph(root=ensemble({"serviceName": "double"}, {"serviceName": "add1"})), models)


# --- Splitter ------------------------------------------------------------------------------------


async def test_splitter_shares_follow_the_weights() -> None:
    g = graph(root={"routerType": "Splitter", "steps": [
        {"serviceName": "double", "weight": 20}, {"serviceName": "add1", "weight": 80},
        {"serviceName": "split", "weight": 0}]})
    models = Models()
    runner = GraphRunner(models, random.Random(17))
    n = 4000
    body = request()
    for _ in range(n):
        await runner.run(g, body, HEADERS, None)
    chosen = models.models()
    assert chosen.count("split") == 0
    # Binomial(n, 0.2): within 4 standard deviations of its mean.
    mean, sd = n * 0.2, math.sqrt(n * 0.2 * 0.8)
    assert abs(chosen.count("double") - mean) < 4 * sd, chosen.count("double")
    assert chosen.count("double") + chosen.count("add1") == n


async def test_splitter_uses_the_injected_rng() -> None:
    g = graph(root={"routerType": "Splitter", "steps": [
        {"serviceName": "double", "weight": 50}, {"serviceName": "add1", "weight": 50}]})
    first, second = Models(), Models()
    for models in (first, second):
        runner = GraphRunner(models, random.Random(5))
        for _ in range(50):
            await runner.run(g, request(), HEADERS, None)
    assert first.models() == second.models()
    assert set(first.models()) == {"double", "add1"}


# --- nesting, deadline, outputs, bad input -------------------------------------------------------


async def test_nested_nodes() -> None:
    g = graph(root=ensemble({"nodeName": "chain"}, {"serviceName": "double"}),
              chain=seq({"serviceName": "double"}, {"serviceName": "add1", "data": "$response"}))
    _, outputs = answer(await run(g, Models()))
    np.testing.assert_array_equal(outputs["chain.y"], X * 2 + 1)
    np.testing.assert_array_equal(outputs["double.y"], X * 2)


async def test_a_failure_in_a_nested_node_names_the_innermost_place() -> None:
    models = Models(failing={"add1": boom(Code.INVALID_ARGUMENT, "bad shape")})
    g = graph(root=seq({"nodeName": "inner", "dependency": "Hard"}, {"serviceName": "double"}),
              inner=seq({"serviceName": "add1"}))
    with pytest.raises(GraphError) as info:
        await run(g, models)
    assert info.value.message == "graph 'g', node 'inner', step 'add1' (model 'add1'): bad shape"
    assert info.value.code is Code.INVALID_ARGUMENT


async def test_a_soft_nested_node_that_fails_is_skipped() -> None:
    models = Models(failing={"add1": boom()})
    g = graph(root=seq({"serviceName": "double"}, {"nodeName": "inner", "data": "$response"},
                       {"serviceName": "double2", "data": "$response"}),
              inner=seq({"serviceName": "add1"}))
    np.testing.assert_array_equal(answer(await run(g, models))[1]["y"], X * 4)


async def test_steps_share_the_request_deadline() -> None:
    models = Models()
    await run(graph(root=seq({"serviceName": "double"}, {"serviceName": "add1", "data": "$response"})), models,
              timeout=30.0)
    first, second = (c.timeout for c in models.calls)
    assert first is not None and second is not None
    assert 0 < second <= first <= 30.0
    models = Models()
    await run(graph(root=ensemble({"serviceName": "double"}, {"serviceName": "add1"})), models, timeout=None)
    assert [c.timeout for c in models.calls] == [None, None]


async def test_a_step_after_the_deadline_fails_even_if_soft() -> None:
    async def outlive_the_deadline() -> None:
        # What a real call does when its time is up: wait it out, then raise.
        await asyncio.sleep(0.2)
        raise DeadlineExceeded("deadline exceeded")

    models = Models(hooks={"double": outlive_the_deadline})
    g = graph(root=seq({"serviceName": "double"}, {"serviceName": "add1", "name": "late"},
                       {"serviceName": "add1", "name": "later"}))
    with pytest.raises(GraphError) as info:
        await run(g, models, timeout=0.1)
    assert info.value.code is Code.DEADLINE_EXCEEDED
    assert info.value.message == ("graph 'g', node 'root', step 'late' (model 'add1'): the request's deadline "
                                  "passed before this step started")
    assert models.models() == ["double"]
    models = Models()
    with pytest.raises(GraphError, match=r"step 'double'.*deadline passed"):
        await run(g, models, timeout=0.0)
    assert models.calls == []


async def test_requested_outputs_apply_to_the_graph_answer() -> None:
    models = Models()
    g = graph(root=seq({"serviceName": "split"}, {"serviceName": "split", "name": "again", "data": "$response"}))
    resp, outputs = answer(await run(g, models, body=request(outputs=("z",))))
    assert [o.name for o in resp.outputs] == ["z"] and len(resp.raw_output_contents) == 1
    np.testing.assert_array_equal(outputs["z"], X * 10)   # split on split's first output, y = x
    assert all(len(c.request.outputs) == 0 for c in models.calls)
    with pytest.raises(InvalidArgument, match="graph 'g' has no output 'w'; its outputs: 'y', 'z'"):
        await run(g, Models(), body=request(outputs=("w",)))


async def test_a_malformed_request_is_refused() -> None:
    models = Models()
    with pytest.raises(InvalidArgument, match="malformed"):
        await run(graph(root=seq({"serviceName": "double"})), models, body=b"\x0a\xff")
    assert models.calls == []


# --- the V2 conversions on their own -------------------------------------------------------------


def test_a_response_becomes_a_request_field_by_field() -> None:
    resp = encode_response(model_name="m", model_version="3", request_id="other",
                           outputs={"a": np.arange(6, dtype=np.int64).reshape(2, 3),
                                    "s": np.array([b"x", b"\xff"], dtype=object)}, raw=True)
    resp.outputs[0].parameters["unit"].string_param = "cm"
    resp.parameters["extra"].bool_param = True
    client, _ = v2.Request.from_client(request())
    made = v2.Request.from_response(bytes(resp.SerializeToString()), client)
    req = pb.ModelInferRequest.FromString(made.to("next"))
    assert (req.model_name, req.model_version, req.id) == ("next", "", "req-1")
    assert list(req.parameters) == ["tenant"]
    assert [(i.name, i.datatype, list(i.shape)) for i in req.inputs] == [("a", "INT64", [2, 3]), ("s", "BYTES", [2])]
    assert req.inputs[0].parameters["unit"].string_param == "cm"
    inputs = decode_inputs(req)
    np.testing.assert_array_equal(inputs["a"], np.arange(6).reshape(2, 3))
    assert inputs["s"].tolist() == [b"x", b"\xff"]


def test_views_for_conditions() -> None:
    view = v2.request_view(v2.Request.from_client(request())[0])
    assert view["id"] == "req-1" and view["parameters"] == {"tenant": "gold"}
    assert view["inputs"][0]["name"] == "x" and view["inputs"][0]["shape"] == [1, 3]
    assert view["inputs"][0]["data"].value() == [1.0, 2.0, 3.0]
    resp = encode_response(model_name="m", model_version="", request_id="", raw=False,
                           outputs={"s": np.array([b"ok", b"\xff"], dtype=object)})
    rview = v2.response_view(bytes(resp.SerializeToString()))
    assert rview["model_name"] == "m" and "id" not in rview
    assert rview["outputs"][0]["data"].value() == ["ok", "/w=="]   # not UTF-8: base64, as REST sends it


async def test_switch_on_typed_request_data() -> None:
    g = graph(root=switch({"serviceName": "double", "condition": "inputs.0.data.#(>2.5)"},
                          {"serviceName": "add1", "condition": "@this"}))
    models = Models()
    np.testing.assert_array_equal(answer(await run(g, models, body=request(raw=False)))[1]["y"], X * 2)
    models = Models()
    np.testing.assert_array_equal(answer(await run(g, models, body=request(X / 2, raw=False)))[1]["y"], X / 2 + 1)


async def test_a_condition_that_cannot_be_evaluated_names_the_step() -> None:
    req = encode_request(model_name="g", inputs={"x": X}, request_id="req-1")
    req.raw_input_contents[0] = b"\x00" * 8   # 8 bytes for 3 FP32 values
    g = graph(root=switch({"serviceName": "double", "condition": "inputs.0.data.#(>1)", "name": "big"},
                          {"serviceName": "add1", "condition": "@this"}))
    models = Models()
    with pytest.raises(GraphError) as info:
        await run(g, models, body=bytes(req.SerializeToString()))
    assert info.value.code is Code.INVALID_ARGUMENT
    assert info.value.message.startswith("graph 'g', node 'root', step 'big' (model 'double'): condition "
                                         "'inputs.0.data.#(>1)': input 'x': raw contents hold 8 bytes")
    assert models.calls == []


async def test_the_deepest_graph_allowed_runs() -> None:
    chain: dict[str, Any] = {f"n{i}": seq({"nodeName": f"n{i + 1}"}) for i in range(62)}
    chain["n62"] = seq({"serviceName": "double"}, {"serviceName": "add1", "data": "$response"})
    chain["root"] = seq({"nodeName": "n0"})
    _, outputs = answer(await run(graph(**chain), Models()))
    np.testing.assert_array_equal(outputs["y"], X * 2 + 1)


async def test_a_condition_may_not_turn_a_huge_tensor_into_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(v2, "MAX_VIEW_ELEMENTS", 2)
    g = graph(root=switch({"serviceName": "double", "condition": "inputs.0.data.#(>1)"},
                          {"serviceName": "add1", "condition": "@this"}))
    with pytest.raises(GraphError, match=r"step 'double'.*tensor 'x', 3 elements; conditions read tensors of at most"):
        await run(g, Models())
    # A condition that does not read the data costs nothing of the kind.
    g = graph(root=switch({"serviceName": "double", "condition": 'inputs.#(name=="x")'}))
    np.testing.assert_array_equal(answer(await run(g, Models()))[1]["y"], X * 2)


@pytest.mark.parametrize("typed", [set(), {"add1"}, {"double", "add1"}])
async def test_an_ensemble_answer_feeds_the_next_step(typed: set[str]) -> None:
    models = Models(typed=typed)
    g = graph(root=seq({"nodeName": "both"}, {"serviceName": "sum", "data": "$response"}),
              both=ensemble({"serviceName": "double"}, {"serviceName": "add1"}))
    _, outputs = answer(await run(g, models))
    assert [i.name for i in models.calls[-1].request.inputs] == ["double.y", "add1.y"]
    np.testing.assert_array_equal(outputs["y"], X * 3 + 1)


# --- per-request bounds (review findings 1, 2, 3, 7 and the deadline note) ------------------------


async def test_a_request_without_a_deadline_gets_the_runners_default() -> None:
    models = Models()
    g = graph(root=seq({"serviceName": "double"}, {"serviceName": "add1", "data": "$response"}))
    await GraphRunner(models, default_timeout=5.0).run(g, request(), HEADERS, None)
    assert all(c.timeout is not None and 0 < c.timeout <= 5.0 for c in models.calls)
    models = Models()
    await GraphRunner(models, default_timeout=5.0).run(g, request(), HEADERS, 2.0)   # the client's wins
    assert all(c.timeout is not None and c.timeout <= 2.0 for c in models.calls)


async def test_a_step_the_router_refuses_stops_the_graph_even_if_soft() -> None:
    # The router's own in-flight limits (StepRefused): a Soft step skipped there would answer a
    # partial result for an overloaded router (the review saw 4057 of 4096 calls dropped, answer OK).
    models = Models(failing={"add1": StepRefused("this server has 50 requests in flight")})
    g = graph(root=ensemble({"serviceName": "double"}, {"serviceName": "add1"}))
    with pytest.raises(GraphError) as info:
        await run(g, models)
    assert info.value.code is Code.RESOURCE_EXHAUSTED and info.value.stops
    assert info.value.message == ("graph 'g', node 'root', step 'add1' (model 'add1'): this server has 50 "
                                  "requests in flight")
    models = Models(failing={"double": StepRefused("full")})
    with pytest.raises(GraphError, match=r"step 'double'.*full"):
        await run(graph(root=seq({"serviceName": "double"}, {"serviceName": "add1"})), models)
    assert models.models() == ["double"]   # nothing after it ran


async def test_the_bytes_a_request_makes_are_bounded() -> None:
    # A 64-step Ensemble copies the request for each step (the review's 16 MiB request: +992 MiB).
    # Every step request, answer and merged answer is charged to one budget: counted, not timed.
    x = np.arange(4096, dtype=np.float32).reshape(1, -1)   # 16 KiB of tensor
    body = request(x)
    g = graph(root=ensemble(*[{"serviceName": "double", "name": f"s{i}"} for i in range(64)]))
    models = Models()
    with pytest.raises(GraphError) as info:
        await GraphRunner(models, max_bytes=8 * len(body)).run(g, body, HEADERS, 30.0)
    assert info.value.code is Code.RESOURCE_EXHAUSTED and info.value.stops
    assert "made more than" in info.value.message and "router.max_graph_request_bytes" in info.value.message
    # It stops before the ninth step's request is even sent (each request ~ the body, each answer too).
    assert len(models.calls) <= 8
    # Within the budget: runs, the merged answer included.
    models = Models()
    out = await GraphRunner(models, max_bytes=200 * len(body)).run(g, body, HEADERS, 30.0)
    assert len(answer(out)[0].outputs) == 64
    # A merge is charged as well: two steps fit, their merged answer does not.
    g2 = graph(root=ensemble({"serviceName": "double"}, {"serviceName": "add1"}))
    with pytest.raises(GraphError, match=r"node 'root': the graph's steps made more than"):
        await GraphRunner(Models(), max_bytes=int(4.5 * len(body))).run(g2, body, HEADERS, 30.0)


async def test_the_conditions_of_one_request_share_one_work_budget() -> None:
    # Each condition reads a 300,000-element tensor (~600,000 units: the data decoded, then
    # queried): one alone is within the budget, two are not. Before, every evaluation had a
    # fresh budget, and a Switch of 64 such steps did 64 times the work.
    x = np.zeros((1, 300_000), dtype=np.float32)
    cond = "inputs.0.data.#(==-1)"
    g = graph(root=switch(*[{"serviceName": "double", "condition": cond, "name": f"s{i}"} for i in range(4)],
                          {"serviceName": "add1", "condition": "@this"}))
    models = Models()
    with pytest.raises(GraphError) as info:
        await run(g, models, body=request(x))
    assert info.value.code is Code.INVALID_ARGUMENT
    assert info.value.message.startswith(f"graph 'g', node 'root', step 's1' (model 'double'): condition {cond!r}: "
                                         f"this request's conditions took more than {MAX_WORK:,} steps of work")
    assert models.calls == []
    one = graph(root=switch({"serviceName": "double", "condition": cond, "name": "s0"},
                            {"serviceName": "add1", "condition": "@this"}))
    assert answer(await run(one, Models(), body=request(x)))[0].model_name == "g"


class Clock:
    """A deadline clock the steps move forward: time passes only when a test says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_the_deadline_is_checked_before_a_condition_and_before_a_merge() -> None:
    clock = Clock()

    async def slow() -> None:
        clock.now += 10.0   # the call took 10 s of a 5 s deadline (and answered anyway)

    # A Sequence whose next step has a condition: that condition is not evaluated after the deadline.
    g = graph(root=seq({"serviceName": "double"},
                       {"serviceName": "add1", "condition": "outputs.#(name==nope)", "name": "then"}))
    with pytest.raises(GraphError) as info:
        await GraphRunner(Models(hooks={"double": slow}), clock=clock).run(g, request(), HEADERS, 5.0)
    assert info.value.code is Code.DEADLINE_EXCEEDED
    assert info.value.message == ("graph 'g', node 'root', step 'then' (model 'add1'): the request's deadline "
                                  "passed before its condition was evaluated")
    # An Ensemble does not merge its answers after the deadline.
    g = graph(root=ensemble({"serviceName": "double"}))
    with pytest.raises(GraphError, match="node 'root': the request's deadline passed before the Ensemble's answers"):
        await GraphRunner(Models(hooks={"double": slow}), clock=clock).run(g, request(), HEADERS, 5.0)


async def test_a_known_field_with_another_wire_type_is_an_unknown_field() -> None:
    # Field 7 (raw_input_contents) as a varint: protobuf reads it as an unknown field; it used to
    # become an extra, empty raw_input_contents in every step's request.
    req = encode_request(model_name="g", inputs={"x": X}, request_id="req-1", raw=False)
    body = bytes(req.SerializeToString()) + bytes([(7 << 3) | 0, 5])
    models = Models()
    _, outputs = answer(await run(graph(root=seq({"serviceName": "double"})), models, body=body))
    assert list(models.calls[0].request.raw_input_contents) == []
    np.testing.assert_array_equal(outputs["y"], X * 2)
    assert all(f > 0 for f, _, _, _ in v2._fields(bytes(req.SerializeToString()), "request"))
    assert [f for f, _, _, _ in v2._fields(body, "request")][-1] == -7


async def test_a_failed_steps_error_keeps_no_frames_and_so_not_its_request() -> None:
    # A failure is kept while its node runs (a Soft one until the Ensemble answers); the frames of
    # its traceback hold the step's request, a copy of the client's tensors. They are dropped.
    async def fails(model: str, body: bytes, headers: Headers, timeout: float | None) -> bytes:
        try:
            raise ValueError("deep inside")
        except ValueError as inner:
            raise RemoteError(Code.UNAVAILABLE, "runtime gone") from inner

    with pytest.raises(GraphError) as info:
        await GraphRunner(fails).run(graph(root=seq({"serviceName": "double"})), request(), HEADERS, 30.0)
    cause = info.value.__cause__
    assert isinstance(cause, RemoteError) and cause.__traceback__ is None
    assert isinstance(cause.__cause__, ValueError) and cause.__cause__.__traceback__ is None
