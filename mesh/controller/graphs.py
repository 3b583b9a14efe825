"""InferenceGraph resources (``serving.kserve.io/v1alpha1``) -> inference graphs of the mesh, and
the graph's state -> the InferenceGraph's status. No I/O.

KServe runs a router pod per InferenceGraph; the mesh runs none: its routers execute the graph
(``mesh.graphs``), so an InferenceGraph becomes a graph definition in the registry, made through
the router's management API (``mmesh.ModelMeshGraphs``), like a Predictor becomes a vModel.

- **Which**: InferenceGraphs annotated ``serving.kserve.io/deploymentMode: ModelMesh``, the rule
  for InferenceServices (:func:`mesh.controller.isvc.is_modelmesh`); the others are KServe's. One
  that loses the annotation has its graph removed, once.
- **IDs**: the graph is the InferenceGraph's name: clients send ``model_name: <name>`` (or POST to
  ``/v2/models/<name>/infer``), as they name an InferenceService by its name. A step's
  ``serviceName`` names an InferenceService or Predictor *of the graph's namespace*, as in KServe:
  the vModel of that name, which the controller checks is its own for that namespace (owner
  ``<owner>/<namespace>`` or ``<owner>/<namespace>/isvc``) before the graph is defined and at every
  resync. The mesh's vModel names are one namespace, so without the check an InferenceGraph could
  name, and expose under a new name, another namespace's InferenceService. A graph naming another
  namespace's service is refused, and removed from the mesh if it was defined; one naming a service
  that does not exist yet is retried. The graph's owner is ``<owner>/<namespace>/ig``: an
  InferenceGraph of the same name in another namespace is refused by the mesh and told so in its
  status (graph names, like vModel names, are one namespace in the mesh).
- **Spec**: only ``nodes`` is sent; the rest of a KServe spec (resources, affinity, replicas and
  scaling, ``timeout``) sizes KServe's router pods, which do not exist here, and is ignored. The
  mesh checks the graph (root node, targets, cycles, conditions, weights, the models named); a
  refusal is the status's ``Ready`` condition, reason ``InvalidGraphSpec``, with the router's
  message, and what was defined before keeps serving (as for a Predictor's bad edit).
- **Status**, in KServe's shape (``V1alpha1InferenceGraphStatus``): ``url`` (the router's REST
  address of the graph's V2 ``infer``), ``observedGeneration`` and the condition ``Ready``, which
  keeps its ``lastTransitionTime`` while its status stays the same. Ready means the mesh holds the
  graph as the spec says; the models it names load on demand, as for a Predictor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mesh.controller.isvc import is_modelmesh, merge_patch

SOURCE = "ig"
INVALID_GRAPH_SPEC = "InvalidGraphSpec"
GRAPH_NAME_TAKEN = "GraphNameTaken"
# Status fields this controller owns on an InferenceGraph (the rest is left alone).
MANAGED = ("url", "conditions", "observedGeneration")
MAX_MESSAGE = 1024


@dataclass(frozen=True)
class GraphFailure:
    reason: str
    message: str


def served(obj: Mapping[str, Any]) -> bool:
    """Whether the mesh serves this InferenceGraph."""
    return is_modelmesh(obj)


def graph_spec(obj: Mapping[str, Any]) -> dict[str, Any]:
    """What is sent to the mesh: the spec's nodes, as written (the mesh checks them)."""
    spec = obj.get("spec")
    nodes = spec.get("nodes") if isinstance(spec, Mapping) else None
    return {"nodes": nodes if nodes is not None else {}}


MAX_SERVICES = 256  # distinct serviceNames one InferenceGraph may name (each is looked up per reconcile)


def service_names(spec: Mapping[str, Any]) -> list[str]:
    """The distinct ``serviceName``s of a spec's steps, in order; malformed parts are skipped (the
    mesh refuses them with the place named)."""
    names: dict[str, None] = {}
    nodes = spec.get("nodes")
    for node in nodes.values() if isinstance(nodes, Mapping) else ():
        steps = node.get("steps") if isinstance(node, Mapping) else None
        for step in steps if isinstance(steps, list) else ():
            name = step.get("serviceName") if isinstance(step, Mapping) else None
            if isinstance(name, str) and name:
                names[name] = None
    return list(names)


def _condition(ready: bool, failure: GraphFailure | None, previous: Any, now: str) -> dict[str, Any]:
    status = "True" if ready else "False"
    old: Mapping[str, Any] = {}
    if isinstance(previous, list):
        old = next((c for c in previous if isinstance(c, Mapping) and c.get("type") == "Ready"), {})
    since = old.get("lastTransitionTime") if old.get("status") == status and old.get("lastTransitionTime") else now
    condition = {"type": "Ready", "status": status, "lastTransitionTime": since}
    if failure is not None:
        condition["reason"] = failure.reason
        condition["message"] = failure.message[:MAX_MESSAGE]
    return condition


def graph_status(obj: Mapping[str, Any], held: str, failure: GraphFailure | None, *,
                 rest_url: str, now: str) -> dict[str, Any]:
    """The InferenceGraph's status for what the mesh holds of it (``held``: the graph's status,
    NOT_FOUND, DEFINED (some model it names has no loaded copy yet) or READY) and this reconcile's
    ``failure``."""
    current = obj.get("status")
    previous: Mapping[str, Any] = current if isinstance(current, Mapping) else {}
    meta = obj.get("metadata") or {}
    name = str(meta.get("name") or "")
    ready = failure is None and held in ("DEFINED", "READY")
    if failure is None and held == "SHADOWED":
        failure = GraphFailure("GraphShadowed", "a vModel of the same name (an InferenceService or Predictor) "
                               "takes the requests sent to this name; rename one of them")
    elif failure is None and not ready:
        failure = GraphFailure("GraphNotDefined", "the mesh holds no graph of this name yet")
    status: dict[str, Any] = {"conditions": [_condition(ready, failure, previous.get("conditions"), now)]}
    if isinstance(meta.get("generation"), int):
        status["observedGeneration"] = meta["generation"]
    if held in ("DEFINED", "READY") and rest_url:
        status["url"] = f"{rest_url}/v2/models/{name}/infer"
    return status


def status_patch(obj: Mapping[str, Any], wanted: Mapping[str, Any]) -> dict[str, Any] | None:
    current = obj.get("status")
    return merge_patch(current if isinstance(current, Mapping) else None, wanted, MANAGED)
