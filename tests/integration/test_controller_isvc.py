"""InferenceServices (ModelMesh deployment mode) through the controller, against a real mesh and a
FAKE Kubernetes API server serving Predictors and InferenceServices.

Real: the router (gRPC and REST) and a runtime on 127.0.0.1 sharing a memory:// registry, the
controller process assembly (``serve_controller``: one controller per kind) with the official
``kubernetes`` client, and scikit-learn models trained here, served from local files. Fake: the
Kubernetes API server (tests/support/fake_kube.py), because no kube-apiserver can be installed on
this machine; it validates every write, the controller's status patches included, against
deploy/crd's schemas, so every object here is one the hand-written InferenceService CRD accepts.

The InferenceServices are modelmesh-serving's quickstart ones (docs/kserve-notes.md section 8) with
the storage made local: ``spec.predictor.model.storage.path`` an absolute path, or ``storageUri``
``file://``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import numpy as np
import pytest

from mesh.controller.app import serve_controller
from mesh.gen.mmesh import model_mesh_pb2 as mm
from mesh.settings import load_settings
from mesh.tensors import decode_response, encode_request
from tests.integration.test_controller import wait_for  # bounded polling, sync or async
from tests.support.fake_kube import INFERENCE_SERVICES, PREDICTORS, FakeKubeApiServer
from tests.support.inprocess import Component, InProcessMesh, memory_url, start
from tests.support.models import ModelArtifact, assert_outputs_match, make_model

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

NS = "modelmesh-serving"
OWNER = "mesh-controller"
MODE = {"serving.kserve.io/deploymentMode": "ModelMesh"}
NAME = "example-sklearn-isvc"  # the quickstart's


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelArtifact, ModelArtifact]:
    directory = tmp_path_factory.mktemp("isvc-models")
    return make_model("sklearn", directory, seed=0), make_model("sklearn", directory, seed=3)


def model_form(model: ModelArtifact, **storage: Any) -> dict[str, Any]:
    """``spec.predictor`` of the quickstart's InferenceService, stored at the model's local path."""
    return {"model": {"modelFormat": {"name": "sklearn"}, "storage": {"path": str(model.file), **storage}}}


def isvc(name: str, predictor: dict[str, Any], annotations: dict[str, str] | None = MODE) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": NS}
    if annotations is not None:
        meta["annotations"] = annotations
    return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService", "metadata": meta,
            "spec": {"predictor": predictor}}


@dataclass
class Env:
    mesh: InProcessMesh
    kube: FakeKubeApiServer
    controller: Component | None = None

    @property
    def grpc_url(self) -> str:
        assert self.mesh.router is not None
        return f"grpc://{self.mesh.router.endpoint}"

    async def start_controller(self, **overrides: Any) -> None:
        assert self.mesh.router is not None and self.mesh.rest_url.startswith("http://")
        settings = load_settings(env={}, overrides={
            "controller": {"api_server": self.kube.url, "router_endpoint": self.mesh.router.endpoint,
                           "rest_endpoint": self.mesh.rest_url.removeprefix("http://"), "namespace": NS,
                           "resync_s": 1.0, "watch_timeout_s": 5, "backoff_max_s": 0.5, **overrides},
            "log": {"level": "warning"}})
        self.controller = await start(serve_controller, settings)

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        return self.kube.put(obj)

    def status(self, name: str) -> dict[str, Any]:
        obj = self.kube.get(NS, name, INFERENCE_SERVICES)
        return (obj or {}).get("status") or {}

    def model_status(self, name: str) -> dict[str, Any]:
        return self.status(name).get("modelStatus") or {}

    async def vmodel(self, name: str) -> mm.VModelStatusInfo:
        return await self.mesh.mesh.getVModelStatus(mm.GetVModelStatusRequest(vModelId=name), timeout=5)

    async def vmodel_gone(self, name: str) -> bool:
        return (await self.vmodel(name)).status == mm.VModelStatusInfo.NOT_FOUND

    async def predict_grpc(self, name: str, model: ModelArtifact) -> dict[str, Any]:
        """By ``model_name`` only, as a KServe client calls an InferenceService (no mm-* header)."""
        request = encode_request(model_name=name, inputs={"input-0": model.sample})
        return decode_response(await self.mesh.infer(name, request, header=""))

    async def predict_rest(self, name: str, model: ModelArtifact) -> dict[str, np.ndarray]:
        """Open Inference Protocol over the router's REST port, at the status's restUrl."""
        rest_url = self.status(name)["components"]["predictor"]["restUrl"]
        body = {"inputs": [{"name": "input-0", "shape": list(model.sample.shape), "datatype": "FP32",
                            "data": model.sample.ravel().tolist()}]}
        async with aiohttp.ClientSession() as session, session.post(
                f"{rest_url}/v2/models/{name}/infer", json=body, timeout=aiohttp.ClientTimeout(total=30)) as resp:
            answer = await resp.json()
            assert resp.status == 200, answer
        return {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in answer["outputs"]}


def conditions(status: dict[str, Any]) -> dict[str, str]:
    return {c["type"]: c["status"] for c in status.get("conditions") or []}


def ready(env: Env, name: str) -> Callable[[], bool]:
    def check() -> bool:
        s = env.status(name)
        ms = s.get("modelStatus") or {}
        return (conditions(s) == {"PredictorReady": "True", "Ready": "True"}
                and ms.get("transitionStatus") == "UpToDate"
                and (ms.get("states") or {}).get("activeModelState") == "Loaded"
                and "targetModelState" not in (ms.get("states") or {}))
    return check


def invalid(env: Env, name: str) -> Callable[[], bool]:
    return lambda: env.model_status(name).get("transitionStatus") == "InvalidSpec"


@contextlib.asynccontextmanager
async def running(mesh: InProcessMesh, kube: FakeKubeApiServer) -> AsyncIterator[Env]:
    """An Env on a started mesh and API server; the controller (if started), the server and the
    mesh stopped at the end."""
    environment = Env(mesh, kube)
    try:
        yield environment
    finally:
        if environment.controller is not None:
            await environment.controller.stop()
        kube.stop()
        await mesh.stop()


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    mesh = await InProcessMesh(memory_url()).start(runtimes=1)
    async with running(mesh, FakeKubeApiServer(resources=(PREDICTORS, INFERENCE_SERVICES),
                                               bookmark_interval_s=0.5).start()) as environment:
        yield environment


async def test_quickstart_isvc_becomes_ready_and_serves_by_name(env: Env, models: tuple[ModelArtifact, ...]) -> None:
    first, _ = models
    env.apply(isvc(NAME, model_form(first)))
    await env.start_controller()  # lists the existing InferenceService at start
    await wait_for(ready(env, NAME), what="InferenceService Ready")
    status = env.status(NAME)
    # the status modelmesh-serving writes (docs/kserve-notes.md section 3), with our router's URLs
    assert status["url"] == env.grpc_url and status["address"] == {"url": env.grpc_url}
    model_id = (await env.vmodel(NAME)).activeModelId
    assert status["components"] == {"predictor": {
        "url": env.grpc_url, "grpcUrl": env.grpc_url, "restUrl": env.mesh.rest_url,
        # KServe's revision fields, our model IDs as the revisions (test_controller_canary.py)
        "traffic": [{"revisionName": model_id, "percent": 100, "latestRevision": True}],
        "latestCreatedRevision": model_id, "latestReadyRevision": model_id, "latestRolledoutRevision": model_id}}
    assert status["modelStatus"]["copies"] == {"failedCopies": 0, "totalCopies": 1}
    assert "lastFailureInfo" not in status["modelStatus"]
    assert all(c.get("lastTransitionTime") for c in status["conditions"])
    info = await env.vmodel(NAME)
    assert info.activeModelId.startswith(f"{NAME}__isvc-") and info.owner == f"{OWNER}/{NS}/isvc"
    # served by the InferenceService's name, over gRPC and REST
    assert_outputs_match(await env.predict_grpc(NAME, first), first.expected)
    assert_outputs_match(await env.predict_rest(NAME, first), first.expected)
    # the Predictor controller sees no Predictor, and wrote none
    assert env.kube.objects(PREDICTORS) == []


async def test_older_framework_form_and_file_uri(env: Env, models: tuple[ModelArtifact, ...]) -> None:
    first, second = models
    await env.start_controller()
    env.apply(isvc("framework", {"sklearn": {"storageUri": str(first.file)}}))
    env.apply(isvc("file-uri", {"model": {"modelFormat": {"name": "sklearn"},
                                          "storageUri": f"file://{second.file}"}}))
    await wait_for(ready(env, "framework"), what="spec.predictor.sklearn Ready")
    await wait_for(ready(env, "file-uri"), what="storageUri file:// Ready")
    assert (await env.vmodel("framework")).activeModelId.startswith("framework__isvc-")
    assert_outputs_match(await env.predict_grpc("framework", first), first.expected)
    assert_outputs_match(await env.predict_grpc("file-uri", second), second.expected)


async def test_isvc_without_the_annotation_is_left_to_kserve(env: Env, models: tuple[ModelArtifact, ...]) -> None:
    first, _ = models
    await env.start_controller()
    env.apply(isvc("kserve-owned", model_form(first), annotations=None))
    env.apply(isvc("serverless", model_form(first), annotations={"serving.kserve.io/deploymentMode": "Serverless"}))
    env.apply(isvc("served", model_form(first)))
    await wait_for(ready(env, "served"), what="the annotated one Ready")
    await asyncio.sleep(1.5)  # past a resync (1 s): still nothing for the others
    for name in ("kserve-owned", "serverless"):
        assert env.status(name) == {}
        assert await env.vmodel_gone(name)
    patches = [r.path for r in env.kube.requests if r.method == "PATCH"]
    assert all(p.endswith("/inferenceservices/served/status") for p in patches), patches

    # losing the annotation hands it back to KServe: the vModel goes (its status is left as it was)
    env.apply(isvc("served", model_form(first), annotations=None))
    await wait_for(lambda: env.vmodel_gone("served"), timeout=10, what="vModel removed")


async def test_annotation_changes_are_acted_on_without_waiting_for_a_resync(
        env: Env, models: tuple[ModelArtifact, ...]) -> None:
    first, _ = models
    await env.start_controller(resync_s=60.0)
    env.apply(isvc("late", model_form(first), annotations=None))
    await asyncio.sleep(0.5)
    env.apply(isvc("late", model_form(first)))  # annotated later: now the mesh's
    await wait_for(ready(env, "late"), timeout=5, what="served once annotated")


@pytest.mark.parametrize(("predictor", "problem"), [
    pytest.param({"model": {"modelFormat": {"name": "sklearn"}, "storageUri": "file:///models/a.joblib",
                            "storage": {"path": "/models/b.joblib"}}},
                 "both the storageUri and the storage.path", id="storageUri-and-storage.path"),
    pytest.param({}, "no predictor found", id="no-predictor"),
    pytest.param({"model": {"modelFormat": {"name": "tensorflow"}, "storage": {"path": "/models/m"}}},
                 "tensorflow", id="unknown-format"),
])
async def test_bad_spec_is_reported_and_registers_nothing(env: Env, models: tuple[ModelArtifact, ...],
                                                          predictor: dict[str, Any], problem: str) -> None:
    first, _ = models
    await env.start_controller()
    env.apply(isvc("bad", predictor))
    env.apply(isvc("good", model_form(first)))
    await wait_for(invalid(env, "bad"), what="InvalidSpec")
    status = env.status("bad")
    failure = status["modelStatus"]["lastFailureInfo"]
    assert failure["reason"] == "InvalidPredictorSpec" and problem in failure["message"], failure
    assert failure["modelRevisionName"].startswith("bad__isvc-")
    assert status["modelStatus"]["states"]["activeModelState"] == "Pending"
    assert conditions(status) == {"PredictorReady": "False", "Ready": "False"}
    assert "url" not in status and "components" not in status
    assert await env.vmodel_gone("bad")
    registered = await env.mesh.mesh.getModelStatus(mm.GetStatusRequest(modelId=failure["modelRevisionName"]),
                                                    timeout=5)
    assert registered.status == mm.ModelStatusInfo.NOT_FOUND  # nothing half-way
    # another InferenceService beside it is served as usual
    await wait_for(ready(env, "good"), what="the good one Ready")
    assert_outputs_match(await env.predict_grpc("good", first), first.expected)


async def test_spec_change_moves_to_a_new_model_then_delete(env: Env, models: tuple[ModelArtifact, ...]) -> None:
    first, second = models
    await env.start_controller()
    env.apply(isvc(NAME, model_form(first)))
    await wait_for(ready(env, NAME), what="Ready")
    old = (await env.vmodel(NAME)).activeModelId
    assert old.startswith(f"{NAME}__isvc-")

    env.apply(isvc(NAME, model_form(second)))  # a new storage path: a new concrete model

    async def moved() -> bool:
        return (await env.vmodel(NAME)).activeModelId not in ("", old) and ready(env, NAME)()

    await wait_for(moved, timeout=15, what="moved to the new model, Ready")
    new = (await env.vmodel(NAME)).activeModelId
    assert new.startswith(f"{NAME}__isvc-") and new != old
    assert conditions(env.status(NAME)) == {"PredictorReady": "True", "Ready": "True"}
    assert_outputs_match(await env.predict_grpc(NAME, second), second.expected)

    env.kube.delete(NS, NAME, INFERENCE_SERVICES)
    await wait_for(lambda: env.vmodel_gone(NAME), what="vModel deleted")
    status = await env.mesh.mesh.getModelStatus(mm.GetStatusRequest(modelId=new), timeout=5)
    assert status.status == mm.ModelStatusInfo.NOT_FOUND


async def test_predictor_and_isvc_of_one_name_clash(env: Env, models: tuple[ModelArtifact, ...]) -> None:
    first, second = models
    await env.start_controller()
    env.apply({"apiVersion": "serving.kserve.io/v1alpha1", "kind": "Predictor",
               "metadata": {"name": "iris", "namespace": NS},
               "spec": {"modelType": {"name": "sklearn"}, "storage": {"path": str(first.file)}}})

    def predictor_up() -> bool:
        s = (env.kube.get(NS, "iris", PREDICTORS) or {}).get("status") or {}
        return s.get("available") is True and s.get("activeModelState") == "Loaded"

    await wait_for(predictor_up, what="Predictor Loaded")
    served = (await env.vmodel("iris")).activeModelId

    env.apply(isvc("iris", model_form(second)))
    await wait_for(lambda: (env.model_status("iris").get("lastFailureInfo") or {}).get("reason")
                   == "InvalidPredictorSpec", what="the clash reported")
    status = env.status("iris")
    assert "iris" in status["modelStatus"]["lastFailureInfo"]["message"], status
    # the InferenceService is not the one serving: not Ready, no URL of its own
    assert conditions(status) == {"PredictorReady": "False", "Ready": "False"}, status
    assert "url" not in status, status
    # the Predictor keeps its vModel and serves its own model
    info = await env.vmodel("iris")
    assert (info.activeModelId, info.owner) == (served, f"{OWNER}/{NS}")
    assert_outputs_match(await env.predict_grpc("iris", first), first.expected)
    # and deleting the InferenceService does not take the Predictor's vModel with it
    env.kube.delete(NS, "iris", INFERENCE_SERVICES)
    await asyncio.sleep(1.5)
    assert (await env.vmodel("iris")).activeModelId == served and predictor_up()
