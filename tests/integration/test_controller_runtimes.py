"""ServingRuntimes and ClusterServingRuntimes through the controller: models go to the runtime KServe
would select, and a model no runtime serves says so without being registered.

Real: the router and a runtime on 127.0.0.1 sharing a memory:// registry (the runtime started
with the label ``rt:mesh-runtime``, as the controller's workload for the ClusterServingRuntime
``mesh-runtime`` starts its pods), the controller process assembly (``serve_controller``) with the
official ``kubernetes`` client, and models trained here, served from local files. Fake: the
Kubernetes API server (tests/support/fake_kube.py), because no kube-apiserver can be installed on
this machine; it validates writes against deploy/crd's schemas.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from mesh.controller.app import serve_controller
from mesh.settings import load_settings
from tests.integration.test_controller import wait_for  # bounded polling, sync or async
from tests.integration.test_controller_isvc import MODE, NS, Env, isvc, model_form, ready, running
from tests.support.fake_kube import (
    CLUSTER_SERVING_RUNTIMES,
    EVENTS,
    INFERENCE_SERVICES,
    NAMESPACES,
    PREDICTORS,
    SERVING_RUNTIMES,
    FakeKubeApiServer,
)
from tests.support.inprocess import InProcessMesh, memory_url
from tests.support.models import ModelArtifact, assert_outputs_match, make_model

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


def cluster_runtime(name: str, formats: list[str], *, server: str = "mesh", **spec: Any) -> dict[str, Any]:
    adapter: dict[str, Any] = {"serverType": server}
    if server != "mesh":
        adapter["runtimeManagementPort"] = 8001
    return {"apiVersion": "serving.kserve.io/v1alpha1", "kind": "ClusterServingRuntime",
            "metadata": {"name": name},
            "spec": {"multiModel": True, "builtInAdapter": adapter,
                     "supportedModelFormats": [{"name": f, "autoSelect": True} for f in formats],
                     "containers": [{"name": server, "image": f"example/{server}:1"}], **spec}}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelArtifact, ModelArtifact]:
    directory = tmp_path_factory.mktemp("runtime-models")
    return make_model("sklearn", directory, seed=0), make_model("xgboost", directory, seed=1)


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    mesh = InProcessMesh(memory_url(), runtime_overrides={"labels": ("rt:mesh-runtime",)})
    await mesh.start(runtimes=1)
    kube = FakeKubeApiServer(resources=(PREDICTORS, INFERENCE_SERVICES, SERVING_RUNTIMES, CLUSTER_SERVING_RUNTIMES,
                                        EVENTS), bookmark_interval_s=0.5).start()
    async with running(mesh, kube) as environment:
        yield environment


def failure(env: Env, name: str) -> dict[str, Any]:
    return env.model_status(name).get("lastFailureInfo") or {}


async def test_models_go_to_the_selected_runtime_and_wait_for_one(env: Env, models: tuple[ModelArtifact, ...]) -> None:
    sklearn, xgb = models
    env.kube.put(cluster_runtime("mesh-runtime", ["sklearn"]), CLUSTER_SERVING_RUNTIMES)
    env.kube.put(cluster_runtime("triton-2.x", ["onnx", "tensorflow"], server="triton"), CLUSTER_SERVING_RUNTIMES)
    env.apply(isvc("auto", model_form(sklearn)))
    # xgboost: no runtime auto-selects it yet
    env.apply(isvc("boost", {"model": {"modelFormat": {"name": "xgboost"}, "storage": {"path": str(xgb.file)}}}))
    # named runtimes: one that does not exist, and one no running pod carries yet
    env.apply(isvc("named-missing", {"model": {**model_form(sklearn)["model"], "runtime": "nope"}}))
    env.apply(isvc("on-triton", {"model": {"modelFormat": {"name": "onnx"}, "runtime": "triton-2.x",
                                           "storage": {"path": "/models/m.onnx"}}}))
    await env.start_controller()

    await wait_for(ready(env, "auto"), what="sklearn InferenceService Ready on mesh-runtime")
    assert_outputs_match(await env.predict_grpc("auto", sklearn), sklearn.expected)

    await wait_for(lambda: failure(env, "boost").get("reason") == "NoSupportingRuntime", what="NoSupportingRuntime")
    assert "xgboost" in failure(env, "boost")["message"]
    assert env.model_status("boost")["states"]["activeModelState"] == "FailedToLoad"
    assert await env.vmodel_gone("boost")  # nothing registered
    await wait_for(lambda: failure(env, "named-missing").get("reason") == "RuntimeNotRecognized",
                   what="RuntimeNotRecognized")
    assert "'nope'" in failure(env, "named-missing")["message"]
    assert await env.vmodel_gone("named-missing")
    conditions = {c["type"]: c for c in env.status("named-missing")["conditions"]}
    assert conditions["Ready"]["status"] == "False"
    # ... and each says so once in a Warning Event on the InferenceService (kubectl describe shows it)
    events = {(e["involvedObject"]["name"], e["reason"]): e for e in env.kube.objects(EVENTS)}
    assert events[("boost", "NoSupportingRuntime")]["type"] == "Warning"
    assert "xgboost" in events[("boost", "NoSupportingRuntime")]["message"]
    assert events[("named-missing", "RuntimeNotRecognized")]["involvedObject"]["kind"] == "InferenceService"
    assert len([e for e in env.kube.objects(EVENTS) if e["involvedObject"]["name"] == "boost"]) == 1

    # registered for triton-2.x, whose pods are not running: the mesh has no instance labelled so
    await wait_for(lambda: failure(env, "on-triton").get("reason") in ("RuntimeNotRecognized", "RuntimeUnhealthy"),
                   what="waiting for triton-2.x's pods")
    assert "rt:triton-2.x" in failure(env, "on-triton")["message"]

    # A runtime that takes xgboost appears: the waiting model is reconciled at once and served.
    env.kube.put(cluster_runtime("mesh-runtime", ["sklearn", "xgboost"]), CLUSTER_SERVING_RUNTIMES)
    await wait_for(ready(env, "boost"), timeout=20, what="xgboost Ready once a runtime takes it")
    assert_outputs_match(await env.predict_grpc("boost", xgb), xgb.expected)


async def test_a_namespace_runtime_overrides_and_an_invalid_one_is_named(env: Env,
                                                                       models: tuple[ModelArtifact, ...]) -> None:
    sklearn, _ = models
    env.kube.put(cluster_runtime("mesh-runtime", ["sklearn"]), CLUSTER_SERVING_RUNTIMES)
    bad = cluster_runtime("broken", ["sklearn"])
    bad["spec"]["containers"][0]["readinessProbe"] = {"exec": {"command": ["true"]}}
    env.kube.put(bad, CLUSTER_SERVING_RUNTIMES)
    # A ServingRuntime of the namespace with a higher priority takes new sklearn models there; no pod
    # carries its label (rt:<namespace>/<name>), so the model waits for one, named in the status.
    own = cluster_runtime("team-runtime", [])
    own.update(kind="ServingRuntime", metadata={"name": "team-runtime", "namespace": NS})
    own["spec"]["supportedModelFormats"] = [{"name": "sklearn", "autoSelect": True, "priority": 5}]
    env.kube.put(own, SERVING_RUNTIMES)
    await env.start_controller()
    env.apply(isvc("uses-broken", {"model": {**model_form(sklearn)["model"], "runtime": "broken"}}))
    await wait_for(lambda: failure(env, "uses-broken").get("reason") == "RuntimeNotRecognized", what="invalid runtime")
    assert "readinessProbe is not allowed" in failure(env, "uses-broken")["message"]
    assert await env.vmodel_gone("uses-broken")

    env.apply(isvc("team", model_form(sklearn)))
    await wait_for(lambda: f"rt:{NS}/team-runtime" in failure(env, "team").get("message", ""),
                   what="the namespace's runtime chosen")
    assert MODE  # the InferenceServices above carry the ModelMesh annotation


def test_settings_turn_runtimes_off() -> None:
    settings = load_settings(env={"MESH_CONTROLLER_SERVING_RUNTIMES": "false"})
    assert settings.controller.serving_runtimes is False
    assert serve_controller  # the assembly reads it (app.py): without runtimes, the legacy mapping


async def test_cluster_scope_serves_labelled_namespaces_only(models: tuple[ModelArtifact, ...]) -> None:
    """``controller.namespace_label`` (modelmesh-serving's ``modelmesh-enabled``): the controller
    watching every namespace serves a labelled one and its own, leaves the others alone, and
    follows the label as it comes and goes."""
    sklearn, _ = models
    mesh = await InProcessMesh(memory_url()).start(runtimes=1)
    kube = FakeKubeApiServer(resources=(PREDICTORS, INFERENCE_SERVICES, NAMESPACES), bookmark_interval_s=0.5).start()
    label = "modelmesh-enabled"

    def namespace(name: str, value: str | None) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": name, **({"labels": {label: value}} if value is not None else {})}
        return {"apiVersion": "v1", "kind": "Namespace", "metadata": meta, "status": {"phase": "Active"}}

    def in_namespace(obj: dict[str, Any], ns_name: str) -> dict[str, Any]:
        obj["metadata"]["namespace"] = ns_name
        return obj

    def loaded(name: str, ns_name: str) -> bool:
        found = kube.get(ns_name, name, INFERENCE_SERVICES) or {}
        return ((found.get("status") or {}).get("modelStatus") or {}).get("states", {}).get(
            "activeModelState") == "Loaded"

    async with running(mesh, kube) as env:
        for name, value in (("team-a", "true"), ("team-b", None), (NS, None)):
            kube.put(namespace(name, value), NAMESPACES)
        kube.put(in_namespace(isvc("a-model", model_form(sklearn)), "team-a"))
        kube.put(in_namespace(isvc("b-model", model_form(sklearn)), "team-b"))
        kube.put(isvc("home-model", model_form(sklearn)))  # the controller's own namespace (POD_NAMESPACE)
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("POD_NAMESPACE", NS)
            await env.start_controller(namespace="", namespace_label=label)
        await wait_for(lambda: loaded("a-model", "team-a"), what="labelled namespace served")
        await wait_for(lambda: loaded("home-model", NS), what="own namespace served")
        assert (kube.get("team-b", "b-model", INFERENCE_SERVICES) or {}).get("status") is None
        assert await env.vmodel_gone("b-model")

        kube.put(namespace("team-b", "true"), NAMESPACES)  # labelled now: served at once
        await wait_for(lambda: loaded("b-model", "team-b"), what="newly labelled namespace served")
        kube.put(namespace("team-a", "false"), NAMESPACES)  # unlabelled: its vModel goes
        await wait_for(lambda: env.vmodel_gone("a-model"), what="no longer served")
