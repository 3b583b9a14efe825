"""Runtime workloads (mesh.controller.workloads) against a FAKE Kubernetes API server, through the
official ``kubernetes`` client: each runtime in use becomes a StatefulSet, scaled to zero when no
model uses it, back up at its first model, deleted with its runtime; an invalid runtime gets an
Event; a StatefulSet the controller does not manage is never touched; a runtime annotated
``serving.kserve.io/autoscalerClass: hpa`` also gets its HorizontalPodAutoscaler.

Real: ``run_workloads`` as the controller runs it, ``WorkloadApi``/``HpaApi``/``EventApi`` on the client
library, HTTP on 127.0.0.1; in the last test the whole controller (``serve_controller``). Fake: the
API server (tests/support/fake_kube.py: no kube-apiserver can be installed here; it stores
StatefulSets and Events and runs no pods), and, but in the last test, the catalog and usage, filled
by hand as the runtime watches and the Predictor reconcilers fill them.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s

from mesh.controller.app import serve_controller
from mesh.controller.kube import api_client
from mesh.controller.runtimes import RuntimeCatalog, ServingRuntime, parse_runtime
from mesh.controller.workloads import MANAGED_BY, RuntimeUsage, render_hpa, render_workload, run_workloads
from mesh.settings import ControllerSettings, load_settings
from tests.integration.test_controller import wait_for  # bounded polling, sync or async
from tests.support.fake_kube import (
    CLUSTER_SERVING_RUNTIMES,
    EVENTS,
    HPAS,
    PREDICTORS,
    SERVING_RUNTIMES,
    STATEFULSETS,
    FakeKubeApiServer,
)
from tests.support.inprocess import start

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

ROOT = Path(__file__).resolve().parents[2]
NS = "mesh-serving"


def shipped(name: str) -> ServingRuntime:
    rt = parse_runtime(yaml.safe_load((ROOT / "deploy" / "runtimes" / f"{name}.yaml").read_text()))
    assert rt is not None and not rt.error
    return rt


HAND_MADE = {"apiVersion": "apps/v1", "kind": "StatefulSet",
             "metadata": {"name": "mesh-rt-mesh-runtime-old", "namespace": NS, "labels": {"app": "mine"}},
             "spec": {"replicas": 1, "serviceName": "x", "selector": {"matchLabels": {"app": "mine"}},
                      "template": {"metadata": {"labels": {"app": "mine"}},
                                   "spec": {"containers": [{"name": "c", "image": "busybox"}]}}}}


@dataclass
class Env:
    api: FakeKubeApiServer
    settings: ControllerSettings
    catalog: RuntimeCatalog
    usage: RuntimeUsage

    def sts(self, name: str) -> dict[str, Any] | None:
        return self.api.get(NS, name, STATEFULSETS)

    def replicas(self, name: str) -> int | None:
        obj = self.sts(name)
        return None if obj is None else int(obj["spec"]["replicas"])

    def hpa(self, name: str) -> dict[str, Any] | None:
        return self.api.get(NS, name, HPAS)


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    with FakeKubeApiServer(resources=(STATEFULSETS, EVENTS, HPAS)) as api:
        api.put(HAND_MADE, STATEFULSETS)
        settings = ControllerSettings(api_server=api.url, workload_namespace=NS, resync_s=0.5, backoff_max_s=0.5,
                                      scale_to_zero_grace_s=1.0, pods_per_runtime=2)
        catalog, usage = RuntimeCatalog(), RuntimeUsage()
        for name in ("mesh-runtime", "mlserver-1.x"):
            catalog.put(shipped(name))
        client = api_client(settings)
        task = asyncio.create_task(run_workloads(settings, client, catalog, usage), name="runtime-workloads")
        try:
            yield Env(api, settings, catalog, usage)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            assert api.get(NS, HAND_MADE["metadata"]["name"], STATEFULSETS)["metadata"]["resourceVersion"] == "2"
            await asyncio.to_thread(client.close)


async def test_runtimes_in_use_run_scale_to_zero_come_back_and_go(env: Env) -> None:
    mesh = shipped("mesh-runtime")
    mlserver_name = render_workload(shipped("mlserver-1.x"), env.settings, NS)["metadata"]["name"]
    await asyncio.sleep(0.7)
    assert env.api.objects(STATEFULSETS) == [env.sts(HAND_MADE["metadata"]["name"])]  # nothing used: nothing runs
    env.usage.set(("Predictor", "ml", "a"), mesh.ref)
    env.usage.set(("InferenceService", "ml", "b"), "mlserver-1.x")
    await wait_for(lambda: env.replicas("mesh-rt-mesh-runtime") == 2 and env.replicas(mlserver_name) == 2,
                   what="both runtimes running")
    stored = env.sts("mesh-rt-mesh-runtime")
    assert stored is not None
    rendered = render_workload(mesh, env.settings, NS)
    # what went through the client's models is what was rendered: nothing lost on the way
    assert stored["spec"] == rendered["spec"] and stored["metadata"]["labels"] == rendered["metadata"]["labels"]
    assert stored["metadata"]["labels"][MANAGED_BY] == "mesh-controller"

    env.usage.set(("Predictor", "ml", "a"), None)  # its last model goes
    await asyncio.sleep(0.5)
    assert env.replicas("mesh-rt-mesh-runtime") == 2  # within the grace period (1 s)
    await wait_for(lambda: env.replicas("mesh-rt-mesh-runtime") == 0, timeout=5, what="scaled to zero")
    assert env.replicas(mlserver_name) == 2
    env.usage.set(("Predictor", "ml", "c"), mesh.ref)
    await wait_for(lambda: env.replicas("mesh-rt-mesh-runtime") == 2, timeout=3, what="back up at its first model")

    env.catalog.remove("", "mlserver-1.x")
    await wait_for(lambda: env.sts(mlserver_name) is None, timeout=3, what="deleted with its runtime")
    assert env.sts("mesh-rt-mesh-runtime") is not None


async def test_a_changed_runtime_is_replaced_and_an_invalid_one_kept_with_an_event(env: Env) -> None:
    mesh = shipped("mesh-runtime")
    env.usage.set(("Predictor", "ml", "a"), mesh.ref)
    await wait_for(lambda: env.sts("mesh-rt-mesh-runtime"), what="running")
    spec = {**mesh.spec, "nodeSelector": {"pool": "models"}}
    changed = parse_runtime({"metadata": {"name": mesh.name, "generation": 2}, "spec": spec})
    assert changed is not None
    env.catalog.put(changed)
    await wait_for(lambda: (env.sts("mesh-rt-mesh-runtime") or {}).get("spec", {}).get("template", {}).get(
        "spec", {}).get("nodeSelector") == {"pool": "models"}, timeout=3, what="replaced")
    assert env.api.count("PUT", "/statefulsets/mesh-rt-mesh-runtime") == 1

    invalid = parse_runtime({"metadata": {"name": mesh.name, "generation": 3}, "spec": {**spec, "containers": []}})
    assert invalid is not None and invalid.error
    env.catalog.put(invalid)
    await wait_for(lambda: env.api.objects(EVENTS), timeout=3, what="an Event")
    # a bad edit leaves what runs as it was
    assert (env.sts("mesh-rt-mesh-runtime") or {})["spec"]["template"]["spec"]["nodeSelector"] == {"pool": "models"}
    [event] = env.api.objects(EVENTS)
    assert (event["type"], event["reason"], event["message"]) == ("Warning", "InvalidServingRuntime", invalid.error)
    assert event["involvedObject"]["kind"] == "ClusterServingRuntime" and event["metadata"]["namespace"] == NS
    await asyncio.sleep(1.2)  # a few resyncs: still one Event for this generation
    assert len(env.api.objects(EVENTS)) == 1


async def test_an_hpa_runtime_gets_its_hpa_which_goes_with_its_annotation_and_before_scaling_to_zero(
        env: Env) -> None:
    doc = yaml.safe_load((ROOT / "deploy" / "runtimes" / "mesh-runtime.yaml").read_text())
    plain = parse_runtime(doc)
    doc["metadata"]["annotations"] = {"serving.kserve.io/autoscalerClass": "hpa", "serving.kserve.io/min-scale": "1",
                                      "serving.kserve.io/max-scale": "4"}
    auto = parse_runtime(doc)
    assert auto is not None and plain is not None
    env.catalog.put(auto)
    env.usage.set(("Predictor", "ml", "a"), auto.ref)
    await wait_for(lambda: env.hpa("mesh-rt-mesh-runtime"), what="the StatefulSet and its HPA")
    assert env.replicas("mesh-rt-mesh-runtime") == 2
    stored = env.hpa("mesh-rt-mesh-runtime")
    assert stored is not None
    rendered = render_hpa(auto, env.settings, render_workload(auto, env.settings, NS))
    assert stored["spec"] == rendered["spec"] and stored["metadata"]["labels"][MANAGED_BY] == "mesh-controller"
    model = k8s.ApiClient().deserialize(json.dumps(stored), "V2HorizontalPodAutoscaler", "application/json")
    [metric] = model.spec.metrics
    assert metric.external.metric.selector.match_labels == {"runtime": "mesh-runtime"}
    assert (model.spec.scale_target_ref.kind, model.spec.scale_target_ref.name) == ("StatefulSet",
                                                                                    "mesh-rt-mesh-runtime")
    env.catalog.put(plain)  # the annotation goes (the catalog compares annotations)
    await wait_for(lambda: env.hpa("mesh-rt-mesh-runtime") is None, timeout=3, what="the HPA deleted")
    assert env.replicas("mesh-rt-mesh-runtime") == 2
    env.catalog.put(auto)
    await wait_for(lambda: env.hpa("mesh-rt-mesh-runtime"), timeout=3, what="the HPA again")
    since = len(env.api.requests)
    env.usage.set(("Predictor", "ml", "a"), None)  # its last model goes
    await wait_for(lambda: env.replicas("mesh-rt-mesh-runtime") == 0, timeout=5, what="scaled to zero")
    assert env.hpa("mesh-rt-mesh-runtime") is None
    writes = [(r.method, r.path.rsplit("/", 2)[-2]) for r in env.api.requests[since:] if r.method != "GET"]
    assert writes == [("DELETE", "horizontalpodautoscalers"), ("PATCH", "statefulsets")]  # the HPA first


async def test_api_errors_are_retried(env: Env) -> None:
    env.api.fail_next(2, code=500, method="POST", path_suffix="/statefulsets")
    env.api.fail_next(1, code=503, method="GET", path_suffix="/statefulsets")
    env.usage.set(("Predictor", "ml", "a"), "mesh-runtime")
    await wait_for(lambda: env.replicas("mesh-rt-mesh-runtime") == 2, timeout=10, what="created after the failures")
    assert sorted(r.injected for r in env.api.requests if r.injected) == [500, 500, 503]
    env.api.fail_next(1, code=500, method="PATCH")
    env.usage.set(("Predictor", "ml", "a"), None)
    await wait_for(lambda: env.replicas("mesh-rt-mesh-runtime") == 0, timeout=10, what="scaled to zero after a failure")
    assert env.api.count("PATCH", "/statefulsets/mesh-rt-mesh-runtime") == 2


async def test_the_controller_runs_the_runtime_its_predictors_use() -> None:
    """serve_controller with manage_runtimes: a Predictor's runtime comes up and goes to zero after it.
    The router is not there (nothing listens on port 1): a runtime runs for the models sent to it,
    whether or not the mesh has loaded them yet."""
    resources = (PREDICTORS, SERVING_RUNTIMES, CLUSTER_SERVING_RUNTIMES, STATEFULSETS, EVENTS, HPAS)
    with FakeKubeApiServer(resources=resources, bookmark_interval_s=0.5) as api:
        api.put(yaml.safe_load((ROOT / "deploy" / "runtimes" / "mesh-runtime.yaml").read_text()),
                CLUSTER_SERVING_RUNTIMES)
        api.put({"apiVersion": "serving.kserve.io/v1alpha1", "kind": "Predictor",
                 "metadata": {"name": "iris", "namespace": NS},
                 "spec": {"modelType": {"name": "sklearn"}, "path": "/models/iris.joblib"}})
        settings = load_settings(env={}, overrides={
            "controller": {"api_server": api.url, "router_endpoint": "127.0.0.1:1", "namespace": NS,
                           "inference_services": False, "resync_s": 0.5, "watch_timeout_s": 5,
                           "backoff_max_s": 0.5, "manage_runtimes": True, "workload_namespace": NS,
                           "scale_to_zero_grace_s": 1.0},
            "log": {"level": "warning"}})
        controller = await start(serve_controller, settings)
        try:
            await wait_for(lambda: (api.get(NS, "mesh-rt-mesh-runtime", STATEFULSETS) or {}).get(
                "spec", {}).get("replicas") == 2, what="the runtime of iris running")
            api.delete(NS, "iris")
            await wait_for(lambda: api.get(NS, "mesh-rt-mesh-runtime", STATEFULSETS)["spec"]["replicas"] == 0,
                           timeout=10, what="scaled to zero once iris is gone")
        finally:
            await controller.stop()
