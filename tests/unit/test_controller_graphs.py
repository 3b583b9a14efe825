"""InferenceGraph -> mesh graph and graph state -> InferenceGraph status (mesh.controller.graphs), the
shipped InferenceGraph CRD and example. Pure functions, plus the FAKE API server (no kube-apiserver
can run here) for what the CRD accepts."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh.controller import graphs
from mesh.controller.graph_reconciler import refusal
from mesh.errors import AlreadyExists, FailedPrecondition, InvalidArgument, ModelNotFound, Unavailable
from tests.support import kserve_types
from tests.support.fake_kube import INFERENCE_GRAPHS, ApiError, FakeKubeApiServer

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "deploy" / "examples" / "inference-graph.yaml"
MODE = {"serving.kserve.io/deploymentMode": "ModelMesh"}
NOW = "2026-12-06T10:00:00Z"
LATER = "2026-12-06T11:00:00Z"


def _graph(nodes: dict[str, Any], annotations: dict[str, str] | None = MODE, generation: int = 3) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "chain", "namespace": "ns", "generation": generation}
    if annotations is not None:
        meta["annotations"] = annotations
    return {"apiVersion": "serving.kserve.io/v1alpha1", "kind": "InferenceGraph", "metadata": meta,
            "spec": {"nodes": nodes, "minReplicas": 2, "timeout": 30}}


SEQUENCE = {"root": {"routerType": "Sequence",
                     "steps": [{"serviceName": "a"}, {"serviceName": "b", "data": "$response"}]}}


def test_only_annotated_graphs_are_the_meshs() -> None:
    assert graphs.served(_graph(SEQUENCE))
    assert not graphs.served(_graph(SEQUENCE, annotations=None))
    assert not graphs.served(_graph(SEQUENCE, annotations={"serving.kserve.io/deploymentMode": "Serverless"}))


def test_only_the_nodes_are_sent() -> None:
    """Replicas, resources and the router timeout size KServe's router pods: the mesh has none."""
    assert graphs.graph_spec(_graph(SEQUENCE)) == {"nodes": SEQUENCE}
    assert graphs.graph_spec({"metadata": {"name": "x"}}) == {"nodes": {}}


def test_a_defined_graph_is_ready_with_its_url() -> None:
    status = graphs.graph_status(_graph(SEQUENCE), "DEFINED", None, rest_url="http://r:8008",
                                 now=NOW)
    assert status == {"url": "http://r:8008/v2/models/chain/infer", "observedGeneration": 3,
                      "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": NOW}]}


def test_a_refusal_is_ready_false_with_the_routers_message_and_no_url() -> None:
    failure = graphs.GraphFailure(graphs.INVALID_GRAPH_SPEC, "graph 'chain': node 'root' step 1: cycle")
    status = graphs.graph_status(_graph(SEQUENCE), "NOT_FOUND", failure, rest_url="http://r:8008",
                                 now=NOW)
    assert status == {"observedGeneration": 3, "conditions": [
        {"type": "Ready", "status": "False", "lastTransitionTime": NOW, "reason": "InvalidGraphSpec",
         "message": "graph 'chain': node 'root' step 1: cycle"}]}


def test_a_refused_edit_keeps_the_url_of_what_the_mesh_still_serves() -> None:
    failure = graphs.GraphFailure(graphs.INVALID_GRAPH_SPEC, "bad")
    status = graphs.graph_status(_graph(SEQUENCE), "READY", failure, rest_url="http://r:8008",
                                 now=NOW)
    assert status["url"] == "http://r:8008/v2/models/chain/infer"
    assert status["conditions"][0]["status"] == "False"


def test_the_transition_time_moves_only_when_readiness_changes() -> None:
    obj = _graph(SEQUENCE)
    first = graphs.graph_status(obj, "DEFINED", None, rest_url="http://r", now=NOW)
    obj["status"] = first
    again = graphs.graph_status(obj, "READY", None, rest_url="http://r", now=LATER)
    assert again == first
    assert graphs.status_patch(obj, again) is None
    lost = graphs.graph_status(obj, "NOT_FOUND", None, rest_url="http://r", now=LATER)
    assert lost["conditions"][0]["status"] == "False" and lost["conditions"][0]["lastTransitionTime"] == LATER
    patch = graphs.status_patch(obj, lost)
    assert patch is not None and patch["status"]["url"] is None  # removed by the merge patch


@pytest.mark.parametrize(("error", "reason"), [
    (InvalidArgument("graph 'g': cycle"), graphs.INVALID_GRAPH_SPEC),
    (ModelNotFound("m"), graphs.INVALID_GRAPH_SPEC),
    (AlreadyExists("graph 'g' is owned by 'x'"), graphs.GRAPH_NAME_TAKEN),
    (FailedPrecondition("graph 'g' is owned by 'x'"), graphs.GRAPH_NAME_TAKEN),
    (Unavailable("router down"), None),
])
def test_refusals_go_to_the_status_and_outages_are_retried(error: Any, reason: str | None) -> None:
    failure = refusal(error)
    assert (failure.reason if failure else None) == reason


def test_the_example_is_a_graph_of_the_example_predictors() -> None:
    (doc,) = [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d]
    assert graphs.served(doc)
    assert kserve_types.validate(doc) == []
    predictors = {d["metadata"]["name"] for p in (ROOT / "deploy" / "examples").glob("*.yaml")
                  for d in yaml.safe_load_all(p.read_text()) if d and d.get("kind") == "Predictor"}
    named = {s["serviceName"] for node in doc["spec"]["nodes"].values() for s in node["steps"]}
    assert named <= predictors
    with FakeKubeApiServer(resources=(INFERENCE_GRAPHS,)) as kube:
        kube.put(copy.deepcopy(doc))
        assert kube.get(doc["metadata"]["namespace"], doc["metadata"]["name"]) is not None


@pytest.mark.parametrize("change", ["step-typo", "router-type", "dependency"])
def test_the_crd_refuses_a_malformed_graph(change: str) -> None:
    doc = _graph(copy.deepcopy(SEQUENCE))
    step = doc["spec"]["nodes"]["root"]["steps"][0]
    if change == "step-typo":
        step["servicename"] = step.pop("serviceName")
    elif change == "router-type":
        doc["spec"]["nodes"]["root"]["routerType"] = "Chain"
    else:
        step["dependency"] = "Optional"
    with FakeKubeApiServer(resources=(INFERENCE_GRAPHS,)) as kube, pytest.raises(ApiError):
        kube.put(doc)


def test_the_crd_keeps_kserves_pod_fields() -> None:
    doc = _graph(SEQUENCE)
    doc["spec"]["resources"] = {"limits": {"cpu": "1"}}
    with FakeKubeApiServer(resources=(INFERENCE_GRAPHS,)) as kube:
        kube.put(doc)
        stored = kube.get("ns", "chain")
    assert stored is not None and stored["spec"]["resources"] == {"limits": {"cpu": "1"}}


def test_a_shadowed_graph_is_not_ready_and_says_why() -> None:
    status = graphs.graph_status(_graph(SEQUENCE), "SHADOWED", None, rest_url="http://r", now=NOW)
    (condition,) = status["conditions"]
    assert (condition["status"], condition["reason"]) == ("False", "GraphShadowed") and "url" not in status
