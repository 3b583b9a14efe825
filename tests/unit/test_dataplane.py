"""The router's data plane without any transport: a hand-built view and a scripted link stand in
for the cluster and the runtimes, so retries, resolution and error passing are checked in plain
Python (what the split out of the gRPC servicer makes possible). The real links and front ends are
exercised by the integration tests."""

from __future__ import annotations

from typing import Any

import pytest

from mesh.errors import Code, ModelNotFound, RemoteError, RetryElsewhere
from mesh.registry.keys import Keys
from mesh.registry.records import LOADED, DeviceUsage, InstanceRecord, ModelSpec, PlacementRecord, VModelRecord
from mesh.router.dataplane import INFER, DataPlane, passthrough
from mesh.router.view import ClusterView

RAM = (DeviceUsage("ram", 1 << 30, 0),)


class Specs:
    def __init__(self, *ids: str) -> None:
        self.specs = {i: ModelSpec(model_id=i, type="sklearn") for i in ids}

    async def get(self, model_id: str) -> ModelSpec | None:
        return self.specs.get(model_id)


class ScriptedLink:
    """Answers per instance from a script: bytes, an exception to raise, or a function of
    ``allow_load`` giving either."""

    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, bool, str, tuple[tuple[str, str | bytes], ...]]] = []

    async def call(self, instance_id: str, endpoint: str, allow_load: bool, method: str, model_id: str,
                   body: bytes, metadata: Any, timeout: float | None, spec: Any) -> bytes:
        self.calls.append((instance_id, allow_load, model_id, metadata))
        answer = self.answers[instance_id]
        if callable(answer):
            answer = answer(allow_load)
        if isinstance(answer, BaseException):
            raise answer
        return bytes(answer)


def _plane(link: ScriptedLink, *instances: str, loaded: dict[str, list[str]] | None = None,
           models: tuple[str, ...] = ("m",)) -> DataPlane:
    view = ClusterView(Keys())
    for n, i in enumerate(instances):
        view.instances[i] = InstanceRecord(instance_id=i, endpoint=f"127.0.0.1:{1000 + n}", devices=RAM)
    for model, where in (loaded or {}).items():
        for i in where:
            view.placements.setdefault(model, {})[i] = PlacementRecord(model_id=model, instance_id=i, state=LOADED)
    return DataPlane(view=view, specs=Specs(*models), link=link, max_attempts=4,  # type: ignore[arg-type]
                     load_factor=1.25, ready=lambda: True)


def _not_here() -> RetryElsewhere:
    return RetryElsewhere(RemoteError(Code.UNAVAILABLE, "not here"), gone=False)


def _gone() -> RetryElsewhere:
    return RetryElsewhere(RemoteError(Code.UNAVAILABLE, "connection refused"), gone=True)


async def test_a_loaded_copy_answers_on_the_first_attempt_without_loading() -> None:
    link = ScriptedLink({"a": b"ok", "b": b"ok"})
    plane = _plane(link, "a", "b", loaded={"m": ["a"]})
    assert await plane.relay(INFER, b"body", (("mm-model-id", "m"),), lambda: "", None) == b"ok"
    assert [(i, load) for i, load, _, _ in link.calls] == [("a", False)]


async def test_a_copy_gone_meanwhile_is_dropped_and_the_request_loads_elsewhere() -> None:
    # "a" evicted its copy: it answers "not here" to a hit-only request, and loads when allowed to.
    link = ScriptedLink({"a": lambda load: b"ok" if load else _not_here(), "b": b"ok", "c": b"ok"})
    plane = _plane(link, "a", "b", "c", loaded={"m": ["a"]})
    assert await plane.relay(INFER, b"", (), lambda: "m", None) == b"ok"
    assert link.calls[0][:2] == ("a", False) and link.calls[1][1] is True and len(link.calls) == 2
    assert "a" not in plane.view.copies("m")  # forgotten until the registry's watch says more


async def test_a_gone_instance_is_reported_and_routed_around() -> None:
    told: list[str] = []
    link = ScriptedLink({"a": _gone(), "b": b"ok"})
    plane = _plane(link, "a", "b", loaded={"m": ["a"]})
    plane.on_gone = told.append
    assert await plane.relay(INFER, b"", (), lambda: "m", None) == b"ok"
    assert told == ["a"]


async def test_the_runtimes_own_error_goes_back_as_it_is() -> None:
    link = ScriptedLink({"a": RemoteError(Code.INVALID_ARGUMENT, "input 'x': bad shape")})
    plane = _plane(link, "a", loaded={"m": ["a"]})
    with pytest.raises(RemoteError) as caught:
        await plane.relay(INFER, b"", (), lambda: "m", None)
    assert (caught.value.code, caught.value.message) == (Code.INVALID_ARGUMENT, "input 'x': bad shape")
    assert len(link.calls) == 1


async def test_a_failed_load_is_tried_on_other_instances_up_to_the_limit() -> None:
    failed = RemoteError(Code.FAILED_PRECONDITION, "cannot unpickle")
    link = ScriptedLink({i: failed for i in "abcde"})
    plane = _plane(link, *"abcde")
    with pytest.raises(RemoteError) as caught:
        await plane.relay(INFER, b"", (), lambda: "m", None)
    assert caught.value.message == "cannot unpickle"
    assert len({i for i, *_ in link.calls}) == 3  # MAX_LOAD_FAILURES instances, each once


async def test_when_every_attempt_is_not_here_the_last_answer_is_returned() -> None:
    link = ScriptedLink({i: _gone() for i in "ab"})
    plane = _plane(link, "a", "b")
    with pytest.raises(RemoteError) as caught:
        await plane.relay(INFER, b"", (), lambda: "m", None)
    assert caught.value.code is Code.UNAVAILABLE and "connection refused" in caught.value.message


async def test_names_resolve_as_vmodels_from_the_body_or_the_header_but_not_as_models_from_the_header() -> None:
    link = ScriptedLink({"a": b"ok"})
    plane = _plane(link, "a", models=("m", "v"))
    plane.view.vmodels["prod"] = VModelRecord(vmodel_id="prod", active_model_id="m", target_model_id="m")
    await plane.relay(INFER, b"", (), lambda: "prod", None)  # a name that is a vModel: as one
    await plane.relay(INFER, b"", (("mm-vmodel-id", "prod"),), lambda: "ignored", None)
    assert [model for _, _, model, _ in link.calls] == ["m", "m"]
    with pytest.raises(ModelNotFound, match="model 'prod' not found"):  # mm-model-id names a model only
        await plane.relay(INFER, b"", (("mm-model-id", "prod"),), lambda: "", None)
    with pytest.raises(ModelNotFound, match="vModel 'nope'"):
        await plane.relay(INFER, b"", (("mm-vmodel-id", "nope"),), lambda: "", None)


async def test_credentials_and_selection_headers_never_reach_a_runtime() -> None:
    link = ScriptedLink({"a": b"ok"})
    plane = _plane(link, "a", loaded={"m": ["a"]})
    headers = (("mm-model-id", "m"), ("authorization", "Bearer s3cret"), ("cookie", "c"),
               ("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-01"), ("x-request-id", "r1"))
    await plane.relay(INFER, b"", headers, lambda: "", None)
    sent = dict(link.calls[0][3])
    assert set(sent) == {"traceparent", "x-request-id"}
    assert passthrough(headers) == tuple((k, v) for k, v in headers if k in sent)


async def test_model_ready_needs_a_registration_and_a_loaded_copy() -> None:
    plane = _plane(ScriptedLink({}), "a", loaded={"m": ["a"]}, models=("m", "cold"))
    assert await plane.model_ready((), lambda: "m") is True
    assert await plane.model_ready((), lambda: "cold") is False
    with pytest.raises(ModelNotFound):
        await plane.model_ready((), lambda: "unknown")
