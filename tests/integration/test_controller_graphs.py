"""InferenceGraphs through the controller, against a real mesh and a FAKE Kubernetes API server.

Real: the router (gRPC and REST) and a runtime on 127.0.0.1 sharing a memory:// registry, the
controller process assembly (``serve_controller``) with the official ``kubernetes`` client, and
scikit-learn models trained here, served from local files as ModelMesh-mode InferenceServices.
Fake: the Kubernetes API server (tests/support/fake_kube.py), because no kube-apiserver can be
installed on this machine; it validates every write against deploy/crd's schemas and KServe's
types, the controller's status patches included.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import numpy as np
import pytest

from mesh.gen.mmesh import graphs_pb2 as gp
from mesh.gen.mmesh import graphs_pb2_grpc as gp_grpc
from mesh.tensors import decode_response, encode_request
from tests.integration.test_controller import wait_for
from tests.integration.test_controller_isvc import MODE, NS, OWNER, Env, isvc, model_form, ready, running
from tests.support.fake_kube import EVENTS, INFERENCE_GRAPHS, INFERENCE_SERVICES, PREDICTORS, FakeKubeApiServer
from tests.support.inprocess import InProcessMesh, memory_url
from tests.support.models import ModelArtifact, make_model

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelArtifact, ModelArtifact]:
    directory = tmp_path_factory.mktemp("graph-models")
    return make_model("sklearn", directory, seed=0), make_model("sklearn", directory, seed=3)


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    mesh = await InProcessMesh(memory_url()).start(runtimes=1)
    kube = FakeKubeApiServer(resources=(PREDICTORS, INFERENCE_SERVICES, INFERENCE_GRAPHS, EVENTS),
                             bookmark_interval_s=0.5).start()
    async with running(mesh, kube) as environment:
        yield environment


def graph(name: str, nodes: dict[str, Any], annotations: dict[str, str] | None = MODE,
          namespace: str = NS) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if annotations is not None:
        meta["annotations"] = annotations
    return {"apiVersion": "serving.kserve.io/v1alpha1", "kind": "InferenceGraph", "metadata": meta,
            "spec": {"nodes": nodes}}


ENSEMBLE = {"root": {"routerType": "Ensemble", "steps": [{"name": "first", "serviceName": "first"},
                                                         {"name": "second", "serviceName": "second"}]}}


def graph_status(env: Env, name: str, namespace: str = NS) -> dict[str, Any]:
    obj = env.kube.get(namespace, name, INFERENCE_GRAPHS)
    return (obj or {}).get("status") or {}


def graph_ready(env: Env, name: str, want: str = "True", namespace: str = NS) -> Callable[[], bool]:
    def check() -> bool:
        conditions = graph_status(env, name, namespace).get("conditions") or []
        return any(c["type"] == "Ready" and c["status"] == want for c in conditions)
    return check


async def mesh_graph(env: Env, name: str) -> Any:
    stub = gp_grpc.ModelMeshGraphsStub(env.mesh.channel)  # type: ignore[no-untyped-call]
    return await stub.getGraphStatus(gp.GetGraphStatusRequest(graphId=name), timeout=5)


async def serve_two(env: Env, models: tuple[ModelArtifact, ModelArtifact]) -> None:
    first, second = models
    env.apply(isvc("first", model_form(first)))
    env.apply(isvc("second", model_form(second)))
    await wait_for(ready(env, "first"), what="first Ready")
    await wait_for(ready(env, "second"), what="second Ready")


async def test_an_inference_graph_runs_on_the_routers(env: Env, models: tuple[ModelArtifact, ModelArtifact]) -> None:
    first, _ = models
    await env.start_controller()
    await serve_two(env, models)
    env.apply(graph("both", ENSEMBLE))
    await wait_for(graph_ready(env, "both"), what="InferenceGraph Ready")
    status = graph_status(env, "both")
    assert status["url"] == f"{env.mesh.rest_url}/v2/models/both/infer"
    assert status["observedGeneration"] == env.kube.get(NS, "both", INFERENCE_GRAPHS)["metadata"]["generation"]
    # gRPC, by the graph's name, as a KServe client names an InferenceService
    answer = decode_response(await env.mesh.infer("both", encode_request(
        model_name="both", inputs={"input-0": first.sample}), header=""))
    # each step's outputs, as the model called alone answers the same input
    for step in ("first", "second"):
        alone = decode_response(await env.mesh.infer(step, encode_request(
            model_name=step, inputs={"input-0": first.sample}), header=""))
        assert alone and all(np.array_equal(answer[f"{step}.{output}"], want) for output, want in alone.items())
    assert set(answer) == {f"{step}.{output}" for step in ("first", "second") for output in first.expected}
    # REST, at the status's URL
    body = {"inputs": [{"name": "input-0", "shape": list(first.sample.shape), "datatype": "FP32",
                        "data": first.sample.ravel().tolist()}]}
    async with aiohttp.ClientSession() as session, session.post(
            status["url"], json=body, timeout=aiohttp.ClientTimeout(total=30)) as resp:
        rest = await resp.json()
        assert resp.status == 200, rest
    assert sorted(o["name"] for o in rest["outputs"]) == sorted(answer)


async def test_a_refused_graph_says_why_and_keeps_what_served(env: Env,
                                                              models: tuple[ModelArtifact, ModelArtifact]) -> None:
    await env.start_controller()
    await serve_two(env, models)
    env.apply(graph("both", ENSEMBLE))
    await wait_for(graph_ready(env, "both"), what="InferenceGraph Ready")
    cyclic = {"root": {"routerType": "Sequence", "steps": [{"nodeName": "loop"}]},
              "loop": {"routerType": "Sequence", "steps": [{"nodeName": "root"}]}}
    env.apply(graph("both", cyclic))
    await wait_for(graph_ready(env, "both", "False"), what="Ready False")
    (condition,) = graph_status(env, "both")["conditions"]
    assert condition["reason"] == "InvalidGraphSpec" and "cycle" in condition["message"]
    # the definition the mesh held still serves
    held = await mesh_graph(env, "both")
    assert held.status != gp.GraphStatusInfo.NOT_FOUND and "Ensemble" in held.specJson
    await wait_for(lambda: any(e.get("reason") == "InvalidGraphSpec" for e in env.kube.objects(EVENTS)),
                   what="a Warning Event")


async def test_a_graph_naming_services_applied_later_is_retried(env: Env,
                                                                models: tuple[ModelArtifact, ModelArtifact]) -> None:
    await env.start_controller()
    env.apply(graph("early", ENSEMBLE))
    await wait_for(graph_ready(env, "early", "False"), what="refused: the services do not exist yet")
    await serve_two(env, models)
    await wait_for(graph_ready(env, "early"), what="Ready once they do")


async def test_deleted_or_unannotated_graphs_leave_the_mesh(env: Env,
                                                            models: tuple[ModelArtifact, ModelArtifact]) -> None:
    await env.start_controller()
    await serve_two(env, models)
    env.apply(graph("gone", ENSEMBLE))
    env.apply(graph("mode", ENSEMBLE))
    env.apply(graph("kserves", ENSEMBLE, annotations=None))
    await wait_for(graph_ready(env, "gone"), what="gone Ready")
    await wait_for(graph_ready(env, "mode"), what="mode Ready")
    env.kube.delete(NS, "gone", INFERENCE_GRAPHS)
    unannotated = copy.deepcopy(env.kube.get(NS, "mode", INFERENCE_GRAPHS))
    unannotated["metadata"].pop("annotations")
    env.apply(unannotated)

    async def absent(name: str) -> bool:
        return (await mesh_graph(env, name)).status == gp.GraphStatusInfo.NOT_FOUND

    for name in ("gone", "mode"):
        await wait_for(lambda name=name: absent(name), what=f"{name} removed from the mesh")
    assert await absent("kserves")
    assert not graph_status(env, "kserves")  # KServe's: no status written


async def test_one_name_one_namespace(env: Env, models: tuple[ModelArtifact, ModelArtifact]) -> None:
    await env.start_controller(namespace="")
    await serve_two(env, models)
    env.apply(graph("shared", ENSEMBLE))
    await wait_for(graph_ready(env, "shared"), what="the first namespace's graph Ready")
    third = isvc("third", model_form(models[0]))
    third["metadata"]["namespace"] = "other"
    env.apply(third)

    async def third_registered() -> bool:
        return not await env.vmodel_gone("third")

    await wait_for(third_registered, what="the other namespace's InferenceService registered")
    env.apply(graph("shared", {"root": {"routerType": "Sequence", "steps": [{"serviceName": "third"}]}},
                    namespace="other"))
    await wait_for(graph_ready(env, "shared", "False", namespace="other"), what="the second refused")
    (condition,) = graph_status(env, "shared", "other")["conditions"]
    assert condition["reason"] == "GraphNameTaken"
    assert (await mesh_graph(env, "shared")).owner == f"{OWNER}/{NS}/ig"


async def test_a_graph_may_name_only_its_own_namespaces_services(
        env: Env, models: tuple[ModelArtifact, ModelArtifact]) -> None:
    """KServe resolves a serviceName in the graph's namespace; the mesh's vModel names are global, so
    the controller checks: another namespace's InferenceService is refused, never exposed."""
    await env.start_controller(namespace="")
    await serve_two(env, models)
    env.apply(graph("steal", ENSEMBLE, namespace="evil"))
    await wait_for(graph_ready(env, "steal", "False", namespace="evil"), what="refused")
    (condition,) = graph_status(env, "steal", "evil")["conditions"]
    assert condition["reason"] == "InvalidGraphSpec"
    assert "'first' is not an InferenceService or Predictor of namespace 'evil'" in condition["message"]
    assert (await mesh_graph(env, "steal")).status == gp.GraphStatusInfo.NOT_FOUND


async def test_a_graph_whose_service_changes_namespace_leaves_the_mesh(
        env: Env, models: tuple[ModelArtifact, ModelArtifact]) -> None:
    """The check is made at every resync too: the service's name freed in this namespace and taken
    in another no longer serves this graph."""
    first, _ = models
    await env.start_controller(namespace="")
    await serve_two(env, models)
    env.apply(graph("both", ENSEMBLE))
    await wait_for(graph_ready(env, "both"), what="Ready")
    env.kube.delete(NS, "first", INFERENCE_SERVICES)

    async def vmodel_gone() -> bool:
        return await env.vmodel_gone("first")

    await wait_for(vmodel_gone, what="the InferenceService's vModel removed")
    taken = isvc("first", model_form(first))
    taken["metadata"]["namespace"] = "other"
    env.apply(taken)

    async def taken_by_other() -> bool:
        return (await env.vmodel("first")).owner == f"{OWNER}/other/isvc"

    await wait_for(taken_by_other, what="the name taken in another namespace")

    async def absent() -> bool:
        return (await mesh_graph(env, "both")).status == gp.GraphStatusInfo.NOT_FOUND

    await wait_for(absent, what="the graph removed from the mesh")
    await wait_for(graph_ready(env, "both", "False"), what="Ready False")
    assert "not an InferenceService or Predictor of namespace" in graph_status(env, "both")["conditions"][0]["message"]
