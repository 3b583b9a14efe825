"""The Predictor controller against a real mesh and a FAKE Kubernetes API server.

Real: the router and a runtime as gRPC servers on 127.0.0.1 (sharing a memory:// registry), the
controller process assembly (``serve_controller``) with its official ``kubernetes`` client, the
watch thread and the gRPC management client, and trained scikit-learn models served through the
router. Fake: the Kubernetes API server (tests/support/fake_kube.py), because no kube-apiserver can
be installed on this machine; it speaks the real REST paths and watch protocol and validates
Predictors against deploy/crd's schema.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from mesh.controller.app import serve_controller
from mesh.gen.mmesh import model_mesh_pb2 as mm
from mesh.registry import open_store
from mesh.registry.keys import Keys
from mesh.settings import load_settings
from mesh.tensors import decode_response, encode_request
from tests.support.fake_kube import FakeKubeApiServer
from tests.support.inprocess import Component, InProcessMesh, memory_url, start
from tests.support.models import ModelArtifact, assert_outputs_match, make_model

pytestmark = pytest.mark.integration

NS = "ml"
OWNER = "mesh-controller"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelArtifact, ModelArtifact]:
    directory = tmp_path_factory.mktemp("models")
    return make_model("sklearn", directory, seed=0), make_model("sklearn", directory, seed=3)


@dataclass
class Env:
    mesh: InProcessMesh
    kube: FakeKubeApiServer
    controller: Component | None = None

    async def start_controller(self, **overrides: Any) -> None:
        assert self.mesh.router is not None
        settings = load_settings(env={}, overrides={
            "controller": {"api_server": self.kube.url, "router_endpoint": self.mesh.router.endpoint,
                           "namespace": NS, "resync_s": 1.0, "watch_timeout_s": 5, "backoff_max_s": 0.5,
                           **overrides},
            "log": {"level": "warning"}})
        self.controller = await start(serve_controller, settings)

    def apply(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        return self.kube.put({"apiVersion": "serving.kserve.io/v1alpha1", "kind": "Predictor",
                              "metadata": {"name": name, "namespace": NS}, "spec": spec})

    def status(self, name: str) -> dict[str, Any]:
        obj = self.kube.get(NS, name)
        return (obj or {}).get("status") or {}

    async def vmodel(self, name: str) -> mm.VModelStatusInfo:
        return await self.mesh.mesh.getVModelStatus(mm.GetVModelStatusRequest(vModelId=name), timeout=5)

    async def predict(self, name: str, model: ModelArtifact) -> dict[str, Any]:
        response = await self.mesh.infer(name, encode_request(model_name="", inputs={"input-0": model.sample}),
                                         header="mm-vmodel-id")
        return decode_response(response)


async def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``predicate`` (sync or async) until it is truthy; fail after ``timeout`` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = predicate()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what}: not met within {timeout} s")
        await asyncio.sleep(0.05)


def spec_for(model: ModelArtifact, model_type: str = "sklearn") -> dict[str, Any]:
    return {"modelType": {"name": model_type}, "storage": {"path": str(model.path)}}


def up_to_date(env: Env, name: str) -> Callable[[], bool]:
    def check() -> bool:
        s = env.status(name)
        return (s.get("available") is True and s.get("activeModelState") == "Loaded"
                and s.get("transitionStatus") == "UpToDate" and s.get("targetModelState") == "")
    return check


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    mesh = await InProcessMesh(memory_url()).start(runtimes=1)
    kube = FakeKubeApiServer(bookmark_interval_s=0.5).start()
    environment = Env(mesh, kube)
    try:
        yield environment
    finally:
        if environment.controller is not None:
            await environment.controller.stop()
        kube.stop()
        await mesh.stop()


async def test_predictor_lifecycle_create_change_delete(env: Env, models: tuple[ModelArtifact, ...]) -> None:
    first, second = models
    env.apply("iris", spec_for(first))
    await env.start_controller()  # lists the existing Predictor at start
    await wait_for(up_to_date(env, "iris"), what="created Predictor available and Loaded")
    status = env.status("iris")
    assert status["totalCopies"] == 1 and status["failedCopies"] == 0 and "lastFailureInfo" not in status
    assert status["grpcEndpoint"] == f"grpc://{env.mesh.router.endpoint}"  # type: ignore[union-attr]
    assert_outputs_match(await env.predict("iris", first), first.expected)
    old = (await env.vmodel("iris")).activeModelId
    assert old.startswith("iris__") and (await env.vmodel("iris")).owner == f"{OWNER}/{NS}"

    # a spec change is a new concrete model; the old one serves until the new one has loaded
    writes_before = env.kube.count("PATCH", "/status")
    env.apply("iris", spec_for(second))
    await wait_for(lambda: env.vmodel("iris"), what="vModel")

    async def moved() -> bool:
        info = await env.vmodel("iris")
        return info.activeModelId not in ("", old) and up_to_date(env, "iris")()

    await wait_for(moved, what="vModel moved to the new model")
    assert env.kube.count("PATCH", "/status", since=0) > writes_before
    assert_outputs_match(await env.predict("iris", second), second.expected)

    async def old_gone() -> bool:
        status = await env.mesh.mesh.getModelStatus(mm.GetStatusRequest(modelId=old), timeout=5)
        return status.status == mm.ModelStatusInfo.NOT_FOUND

    await wait_for(old_gone, what="old concrete model auto-deleted")

    # deleting the Predictor deletes the vModel (and the model it created)
    new = (await env.vmodel("iris")).activeModelId
    env.kube.delete(NS, "iris")

    async def vmodel_gone() -> bool:
        return (await env.vmodel("iris")).status == mm.VModelStatusInfo.NOT_FOUND

    await wait_for(vmodel_gone, what="vModel deleted")
    status = await env.mesh.mesh.getModelStatus(mm.GetStatusRequest(modelId=new), timeout=5)
    assert status.status == mm.ModelStatusInfo.NOT_FOUND


async def test_transition_is_reported_in_progress_then_up_to_date(env: Env, models: tuple[ModelArtifact, ...]) -> None:
    first, second = models
    await env.start_controller()
    env.apply("iris", spec_for(first))
    await wait_for(up_to_date(env, "iris"), what="first model Loaded")
    # a model path that cannot load keeps the transition pending: InProgress, then BlockedByFailedLoad
    env.apply("iris", spec_for(first) | {"storage": {"path": str(first.path / "missing.joblib")}})
    await wait_for(lambda: env.status("iris").get("transitionStatus") == "BlockedByFailedLoad", timeout=15,
                   what="blocked by the failed load")
    status = env.status("iris")
    assert status["available"] is True and status["activeModelState"] == "Loaded"  # the old model still serves
    assert status["targetModelState"] == "FailedToLoad"
    assert status["lastFailureInfo"]["reason"] == "ModelLoadFailed"
    assert "does not exist" in status["lastFailureInfo"]["message"]
    assert_outputs_match(await env.predict("iris", first), first.expected)
    # fixing the spec moves on: InProgress while the new model loads, then UpToDate
    since = len(env.kube.requests)
    env.apply("iris", spec_for(second))
    await wait_for(up_to_date(env, "iris"), timeout=15, what="UpToDate again")
    written = [r.body["status"] for r in env.kube.requests[since:]
               if r.method == "PATCH" and r.path.endswith("/status")]
    assert any(w.get("transitionStatus") == "InProgress" for w in written), written
    assert written[-1].get("transitionStatus", "UpToDate") == "UpToDate"
    assert "lastFailureInfo" not in env.status("iris")
    assert_outputs_match(await env.predict("iris", second), second.expected)


async def test_invalid_spec_is_reported_and_leaves_the_serving_model(env: Env,
                                                                    models: tuple[ModelArtifact, ...]) -> None:
    first, _ = models
    await env.start_controller()
    env.apply("bad", spec_for(first, model_type="tensorflow"))  # schema-valid, but no runtime serves it
    await wait_for(lambda: env.status("bad").get("transitionStatus") == "InvalidSpec", what="InvalidSpec")
    status = env.status("bad")
    assert status["available"] is False and status["activeModelState"] == "Pending"
    assert status["lastFailureInfo"]["reason"] == "InvalidPredictorSpec"
    assert "tensorflow" in status["lastFailureInfo"]["message"]
    assert (await env.vmodel("bad")).status == mm.VModelStatusInfo.NOT_FOUND
    # a valid Predictor edited into an invalid one keeps serving its last valid model
    env.apply("iris", spec_for(first))
    await wait_for(up_to_date(env, "iris"), what="iris Loaded")
    env.apply("iris", spec_for(first, model_type="tensorflow"))
    await wait_for(lambda: env.status("iris").get("transitionStatus") == "InvalidSpec", what="iris InvalidSpec")
    assert env.status("iris")["available"] is True and env.status("iris")["activeModelState"] == "Loaded"
    assert_outputs_match(await env.predict("iris", first), first.expected)


async def test_a_runtime_nobody_runs_is_reported(env: Env, models: tuple[ModelArtifact, ...]) -> None:
    first, _ = models
    await env.start_controller()
    env.apply("pinned", spec_for(first) | {"runtime": {"name": "triton-2.x"}})  # no runtime has rt:triton-2.x
    await wait_for(lambda: env.status("pinned").get("activeModelState") == "FailedToLoad", what="FailedToLoad")
    status = env.status("pinned")
    assert status["available"] is False
    assert status["lastFailureInfo"]["reason"] == "RuntimeNotRecognized"
    assert "rt:triton-2.x" in status["lastFailureInfo"]["message"]


async def test_watch_expiry_relists_and_keeps_following(env: Env, models: tuple[ModelArtifact, ...]) -> None:
    first, second = models
    await env.start_controller()
    env.apply("iris", spec_for(first))
    await wait_for(up_to_date(env, "iris"), what="iris Loaded")

    def lists() -> int:
        return sum(1 for r in env.kube.requests if r.method == "GET" and "watch" not in r.query
                   and r.path.endswith(f"/namespaces/{NS}/predictors"))

    before = lists()
    with env.kube.hold_watches():  # the watch is cut off while things change and history is compacted
        env.apply("later", spec_for(second))
        env.kube.delete(NS, "iris")
        env.kube.compact()
    # the resumed watch gets 410 Gone: the controller lists again and catches up from the list
    await wait_for(lambda: lists() > before, what="relist")
    await wait_for(up_to_date(env, "later"), what="a Predictor created while the watch was down")
    assert_outputs_match(await env.predict("later", second), second.expected)

    async def iris_gone() -> bool:
        return (await env.vmodel("iris")).status == mm.VModelStatusInfo.NOT_FOUND

    await wait_for(iris_gone, what="a deletion missed by the watch is noticed in the list")
    # and it keeps following live changes
    env.apply("latest", spec_for(first))
    await wait_for(up_to_date(env, "latest"), what="a Predictor created after the relist")


async def test_resync_restores_a_wiped_registry(env: Env, models: tuple[ModelArtifact, ...]) -> None:
    first, _ = models
    await env.start_controller()
    env.apply("iris", spec_for(first))
    await wait_for(up_to_date(env, "iris"), what="iris Loaded")
    store, prefix = open_store(env.mesh.registry_url)
    keys = Keys(prefix)
    await store.delete_prefix(keys.vmodels)
    await store.delete_prefix(keys.models)
    assert (await env.vmodel("iris")).status == mm.VModelStatusInfo.NOT_FOUND
    # within a resync period or two the controller notices and registers the Predictor again
    await wait_for(lambda: env.vmodel("iris"), what="vModel")

    async def restored() -> bool:
        return (await env.vmodel("iris")).status == mm.VModelStatusInfo.DEFINED and up_to_date(env, "iris")()

    await wait_for(restored, timeout=10, what="registration restored")
    assert_outputs_match(await env.predict("iris", first), first.expected)


async def test_api_server_failures_back_off_and_recover(env: Env, models: tuple[ModelArtifact, ...]) -> None:
    first, _ = models
    env.apply("iris", spec_for(first))
    env.kube.fail_next(3, code=500)  # the first list (and two retries) fail
    await env.start_controller()
    await wait_for(up_to_date(env, "iris"), what="iris Loaded after the API server recovered")
    assert [r.injected for r in env.kube.requests[:3]] == [500, 500, 500]
    # Status writes that fail are retried until one lands. The new status must differ from the
    # stored one at every try (an invalid spec), so each retry writes: exactly two fail, the third lands.
    env.kube.fail_next(2, code=503, method="PATCH", path_suffix="/status")
    env.apply("iris", spec_for(first, model_type="tensorflow"))
    await wait_for(lambda: env.status("iris").get("transitionStatus") == "InvalidSpec", timeout=10,
                   what="the status went through")
    assert [r.injected for r in env.kube.requests if r.injected == 503] == [503, 503]


async def test_router_unreachable_at_start_is_retried(env: Env, models: tuple[ModelArtifact, ...]) -> None:
    first, _ = models
    env.apply("iris", spec_for(first))
    await env.start_controller(router_endpoint="127.0.0.1:1")  # nothing listens there
    await asyncio.sleep(1.0)
    assert env.status("iris") == {}  # nothing written: the router's absence is not the Predictor's fault
    assert env.controller is not None and not env.controller.task.done()


async def test_no_status_write_loop(env: Env, models: tuple[ModelArtifact, ...]) -> None:
    first, _ = models
    await env.start_controller()
    env.apply("iris", spec_for(first))
    env.apply("bad", spec_for(first, model_type="tensorflow"))
    await wait_for(up_to_date(env, "iris"), what="iris Loaded")
    await wait_for(lambda: env.status("bad").get("transitionStatus") == "InvalidSpec", what="bad InvalidSpec")
    await asyncio.sleep(0.5)  # let the last poll settle
    since = len(env.kube.requests)
    await asyncio.sleep(2.0)  # two resync periods: statuses are recomputed, none has changed
    assert env.kube.count("PATCH", "/status", since=since) == 0
    assert env.kube.count("PUT", since=since) == 0
