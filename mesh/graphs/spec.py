"""Inference graph definitions: KServe's ``InferenceGraph`` spec -> a checked, immutable :class:`Graph`.

A graph is checked once, when it is defined (``setGraph``, the controller), never per request:
:func:`parse_graph` refuses anything the executor could not run, naming the place
(``graph 'g': node 'root', step 2 ('b'): ...``; steps count from 1), and compiles the Switch
conditions (:mod:`mesh.graphs.condition`), so a request pays nothing for checks.

The spec is KServe's ``InferenceGraphSpec`` (``serving.kserve.io/v1alpha1``) as JSON:
``{"nodes": {name: {"routerType": ..., "steps": [...]}}}``. Decisions where KServe is silent or
does not fit a mesh:

- **Ignored spec fields**: ``resources``, ``affinity``, ``timeout``, ``routerTimeouts``,
  ``minReplicas``, ``maxReplicas``, ``scaleTarget``, ``scaleMetric``, ``tolerations``,
  ``nodeSelector``, ``nodeName``, ``serviceAccountName`` size or place KServe's router pod, which
  does not exist here (the routers run every graph); they are accepted so KServe manifests apply
  unchanged, and have no effect. Any other field is refused (a typo must not pass silently).
- **Targets**: ``serviceName`` is a model ID or a vModel ID of the mesh, resolved per request
  like a request's model name. ``serviceUrl`` is refused: a router never calls an arbitrary URL
  a graph's author chose (that would let anyone who may define a graph make the routers reach any
  address). A step names exactly one of ``serviceName`` and ``nodeName`` (KServe's rule).
- **Step names** default to the ``serviceName`` or ``nodeName`` (KServe leaves them empty and
  numbers Ensemble results by index; a name reads better in errors and in Ensemble outputs).
  Explicit names are unique in a node (KServe's rule); in an Ensemble the defaulted names must be
  unique too, as they prefix the outputs.
- **data**: ``$request`` (the default) or ``$response``; KServe's V1 forms such as
  ``$response.predictions`` and ``mapPredictionsToInstances: true`` are refused (V2 maps outputs
  to inputs by name already). ``$response`` means the previous step's response in a Sequence and the
  node's input anywhere else (and on a Sequence's first step), as in KServe's router.
- **condition**: required on every Switch step (KServe's router never runs a Switch step without
  one: an empty GJSON path never exists; ``@this`` always matches, for a default route). Allowed on
  Sequence steps after the first, as KServe's router evaluates them: on the previous response, and
  the Sequence stops there (answering that response) when it does not match. Refused elsewhere (a
  Splitter or an Ensemble ignores conditions in KServe: refusing says so).
- **weight**: every Splitter step has one, an integer 0..100, and they sum to 100 (KServe's
  rules); a weight outside a Splitter is refused (it would do nothing).
- **dependency**: ``Soft`` (KServe's default) or ``Hard``, spelt as KServe's enum.
- **Shape**: a node ``root``; node types Sequence, Switch, Ensemble, Splitter; at least one step
  per node; every ``nodeName`` names a node; no cycle (the cycle is named, ``root -> a -> root``).
  Nodes that ``root`` does not reach are checked as well and never run.
- **Bounds** (all client input is bounded): 64 nodes, 64 steps per node, names of 253
  characters, conditions of 1024 characters, 64 KiB for the whole spec as canonical JSON (a parsed
  spec takes ~27x its JSON in every router), and 2048 path components in all the conditions of a
  graph (:data:`MAX_COMPONENTS`: a compiled component is what a parsed graph spends its memory on).
- **Calls per request** (:data:`MAX_CALLS`): the worst-case number of model calls one request can
  make is computed here (:attr:`Graph.calls`): a model step costs 1, a ``nodeName`` step its node's
  cost; a Sequence or an Ensemble costs the sum of its steps' costs (every step may run), a Switch
  or a Splitter the largest (one step runs). A graph above 256 is refused with its cost named: nested
  Ensembles would otherwise multiply (64 levels of 64 steps is 64^64 calls for one request). The
  router counts each of those calls against its in-flight limits as well (mesh.router.dataplane).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from mesh.errors import InvalidArgument, MeshError
from mesh.graphs.condition import Condition, compile_condition
from mesh.ids import check_model_id

__all__ = ["MAX_CALLS", "MAX_COMPONENTS", "MAX_CONDITION", "MAX_NAME", "MAX_NODES", "MAX_SPEC_BYTES",
           "MAX_STEPS", "REQUEST", "RESPONSE", "ROOT", "ROUTER_TYPES", "Graph", "Node", "Step", "graph_models",
           "parse_graph", "spec_json"]

ROOT = "root"
ROUTER_TYPES = ("Sequence", "Switch", "Ensemble", "Splitter")
REQUEST = "$request"
RESPONSE = "$response"
MAX_NODES = 64
MAX_STEPS = 64
MAX_NAME = 253  # a Kubernetes object name's limit: serviceNames and node names come from manifests
MAX_CONDITION = 1024
MAX_SPEC_BYTES = 64 * 1024
MAX_COMPONENTS = 2048  # path components of all a graph's conditions together (module docstring, "Bounds")
MAX_CALLS = 256  # model calls one request may make at worst (module docstring, "Calls per request")

# KServe's InferenceGraphSpec fields that configure its router pod: accepted, no effect here.
IGNORED_SPEC_FIELDS = frozenset({
    "resources", "affinity", "timeout", "routerTimeouts", "minReplicas", "maxReplicas", "scaleTarget",
    "scaleMetric", "tolerations", "nodeSelector", "nodeName", "serviceAccountName"})
_NODE_FIELDS = frozenset({"routerType", "steps"})
_STEP_FIELDS = frozenset({"name", "nodeName", "serviceName", "serviceUrl", "data", "weight", "condition",
                          "dependency", "mapPredictionsToInstances"})


@dataclass(frozen=True, slots=True)
class Step:
    name: str                 # KServe's step name; defaults to the serviceName or nodeName
    model: str = ""           # serviceName: a model ID or vModel ID, resolved at run time
    node: str = ""            # nodeName: another node of this graph
    data: str = REQUEST       # "$request" | "$response"
    condition: Condition | None = None   # Switch (and Sequence steps after the first)
    weight: int = 0           # Splitter only
    hard: bool = False        # dependency: Hard (KServe's default is Soft)

    @property
    def target(self) -> str:
        """The step's target for messages: ``model 'm'`` or ``node 'n'``."""
        return f"model {self.model!r}" if self.model else f"node {self.node!r}"


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    router_type: str          # "Sequence" | "Switch" | "Ensemble" | "Splitter"
    steps: tuple[Step, ...]


@dataclass(frozen=True, slots=True)
class Graph:
    graph_id: str
    nodes: Mapping[str, Node]  # contains ROOT
    calls: int = 1             # the most model calls one request makes (module docstring)


def spec_json(spec: Any) -> bytes:
    """The spec as canonical JSON (sorted keys, no spaces): what the registry record holds, and
    what the size bound counts. InvalidArgument if it is not JSON (non-string keys, NaN, ...)."""
    try:
        return orjson.dumps(spec, option=orjson.OPT_SORT_KEYS)
    except (TypeError, orjson.JSONEncodeError) as e:
        raise InvalidArgument(f"the graph spec is not JSON: {e}") from None


def graph_models(graph: Graph) -> frozenset[str]:
    """Every serviceName the graph names (models or vModels), reachable from root or not."""
    return frozenset(step.model for node in graph.nodes.values() for step in node.steps if step.model)


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"{what} must be a non-empty string, got {_show(value)}")
    if len(value) > MAX_NAME:
        raise InvalidArgument(f"{what} is {len(value)} characters long; the limit is {MAX_NAME}")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise InvalidArgument(f"{what} {value[:60]!r} contains a control character")
    return value


def _optional_text(raw: Mapping[str, Any], key: str) -> str:
    """A string field that may be absent, null or empty (""), else InvalidArgument."""
    value = raw.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidArgument(f"{key} must be a string, got {_show(value)}")
    return value


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_graph(graph_id: str, spec: Mapping[str, Any]) -> Graph:
    """The checked graph of ``spec`` (KServe's InferenceGraph ``.spec``), or InvalidArgument naming
    the place and what is wrong (see the module docstring for the rules)."""
    check_model_id(graph_id, "graph")
    where = f"graph {graph_id!r}"
    try:
        return _parse(graph_id, where, spec)
    except MeshError as e:
        if e.message.startswith(where):
            raise
        raise InvalidArgument(f"{where}: {e.message}") from None


def _parse(graph_id: str, where: str, spec: Any) -> Graph:
    if not isinstance(spec, Mapping):
        raise InvalidArgument(f"the spec must be a JSON object, got {type(spec).__name__}")
    size = len(spec_json(spec))
    if size > MAX_SPEC_BYTES:
        raise InvalidArgument(f"the spec is {size} bytes of JSON; the limit is {MAX_SPEC_BYTES}")
    unknown = sorted(str(k) for k in spec if k != "nodes" and k not in IGNORED_SPEC_FIELDS)
    if unknown:
        raise InvalidArgument(f"unknown spec field(s) {', '.join(map(repr, unknown))}; an InferenceGraph "
                              f"spec has 'nodes' (and KServe's router-pod fields, ignored here)")
    raw_nodes = spec.get("nodes")
    if not isinstance(raw_nodes, Mapping) or not raw_nodes:
        raise InvalidArgument("'nodes' must be a non-empty object of nodes by name")
    if len(raw_nodes) > MAX_NODES:
        raise InvalidArgument(f"{len(raw_nodes)} nodes; the limit is {MAX_NODES}")
    if ROOT not in raw_nodes:
        raise InvalidArgument(f"no node named {ROOT!r}: a graph starts at its node 'root'")
    nodes: dict[str, Node] = {}
    for name, raw in raw_nodes.items():
        _name(name, "a node name")
        nodes[name] = _node(name, raw)
    for node in nodes.values():
        for i, step in enumerate(node.steps, 1):
            if step.node and step.node not in nodes:
                raise InvalidArgument(f"node {node.name!r}, step {i} ({step.name!r}): nodeName {step.node!r} "
                                      f"names no node of this graph (nodes: {', '.join(map(repr, nodes))})")
    _check_acyclic(nodes)
    components = sum(s.condition.size for n in nodes.values() for s in n.steps if s.condition is not None)
    if components > MAX_COMPONENTS:
        raise InvalidArgument(f"the conditions have {components} path components in all; the limit is "
                              f"{MAX_COMPONENTS} per graph")
    calls = _calls(nodes)
    if calls > MAX_CALLS:
        raise InvalidArgument(f"one request may make up to {_count(calls)} model calls (a Sequence or an Ensemble "
                              f"costs the sum of its steps, a Switch or a Splitter its costliest step, a nodeName "
                              f"step its node's cost); the limit is {MAX_CALLS} calls per request")
    return Graph(graph_id=graph_id, nodes=nodes, calls=calls)


def _calls(nodes: Mapping[str, Node]) -> int:
    """The worst-case model calls of one request: root's cost (module docstring). The graph is
    acyclic, so costs are computed children first, each node once (no recursion, no blow-up:
    the numbers may be huge, the work is linear in the steps)."""
    cost: dict[str, int] = {}
    for start in nodes:
        stack = [start]
        while stack:
            name = stack[-1]
            if name in cost:
                stack.pop()
                continue
            pending = [s.node for s in nodes[name].steps if s.node and s.node not in cost]
            if pending:
                stack.extend(pending)
                continue
            stack.pop()
            node = nodes[name]
            each = [cost[s.node] if s.node else 1 for s in node.steps]
            cost[name] = sum(each) if node.router_type in ("Sequence", "Ensemble") else max(each)
    return cost[ROOT]


def _count(n: int) -> str:
    """A call count for a message: exact up to 10^12, else its order of magnitude."""
    return f"{n:,}" if n < 10**12 else f"about 10^{len(str(n)) - 1}"


def _node(name: str, raw: Any) -> Node:
    at = f"node {name!r}"
    if not isinstance(raw, Mapping):
        raise InvalidArgument(f"{at}: must be an object with routerType and steps, got {_show(raw)}")
    unknown = sorted(str(k) for k in raw if k not in _NODE_FIELDS)
    if unknown:
        raise InvalidArgument(f"{at}: unknown field(s) {', '.join(map(repr, unknown))}; a node has "
                              f"routerType and steps")
    router_type = raw.get("routerType")
    if router_type not in ROUTER_TYPES:
        raise InvalidArgument(f"{at}: routerType {_show(router_type)} is not one of {', '.join(ROUTER_TYPES)}")
    raw_steps = raw.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise InvalidArgument(f"{at}: 'steps' must be a non-empty list")
    if len(raw_steps) > MAX_STEPS:
        raise InvalidArgument(f"{at}: {len(raw_steps)} steps; the limit is {MAX_STEPS}")
    steps = tuple(_step(at, router_type, i, s) for i, s in enumerate(raw_steps, 1))
    explicit: set[str] = set()
    for i, (step, s) in enumerate(zip(steps, raw_steps, strict=True), 1):
        if "name" in s:
            if step.name in explicit:
                raise InvalidArgument(f"{at}, step {i} ({step.name!r}): the name {step.name!r} is used by an "
                                      f"earlier step; step names are unique in a node")
            explicit.add(step.name)
    if router_type == "Ensemble":
        seen: set[str] = set()
        for i, step in enumerate(steps, 1):
            if step.name in seen:
                raise InvalidArgument(f"{at}, step {i} ({step.name!r}): another step of this Ensemble is named "
                                      f"{step.name!r} (a step's name defaults to its target); give the steps "
                                      f"distinct names, which prefix their outputs")
            seen.add(step.name)
    if router_type == "Splitter":
        total = sum(step.weight for step in steps)
        if total != 100:
            raise InvalidArgument(f"{at}: the Splitter's weights sum to {total}; they must sum to 100")
    return Node(name=name, router_type=router_type, steps=steps)


def _step(node_at: str, router_type: str, i: int, raw: Any) -> Step:
    label = (raw.get("name") or raw.get("serviceName") or raw.get("nodeName")) if isinstance(raw, Mapping) else None
    at = f"{node_at}, step {i}" + (f" ({label[:60]!r})" if isinstance(label, str) and label else "")
    if not isinstance(raw, Mapping):
        raise InvalidArgument(f"{at}: must be an object, got {_show(raw)}")
    try:
        return _step_fields(router_type, i, raw)
    except MeshError as e:
        raise InvalidArgument(f"{at}: {e.message}") from None


def _step_fields(router_type: str, i: int, raw: Mapping[str, Any]) -> Step:
    unknown = sorted(str(k) for k in raw if k not in _STEP_FIELDS)
    if unknown:
        raise InvalidArgument(f"unknown field(s) {', '.join(map(repr, unknown))}; a step has "
                              f"{', '.join(sorted(_STEP_FIELDS))}")
    if raw.get("mapPredictionsToInstances") not in (None, False):
        raise InvalidArgument("mapPredictionsToInstances is KServe V1 (predictions -> instances); graphs "
                              "here speak V2, where data: $response passes outputs on as inputs")
    if raw.get("serviceUrl"):
        raise InvalidArgument("serviceUrl is not supported: the mesh calls only the models it serves, "
                              "never an arbitrary URL; name the model or vModel in serviceName")
    model = _optional_text(raw, "serviceName")
    node = _optional_text(raw, "nodeName")
    if model and node:
        raise InvalidArgument("names both serviceName and nodeName; a step has exactly one target")
    if not model and not node:
        raise InvalidArgument("names no target: set serviceName (a model or vModel) or nodeName")
    if model:
        _name(model, "serviceName")
        check_model_id(model, "serviceName")
    else:
        _name(node, "nodeName")
    name = _name(raw["name"], "the step name") if "name" in raw else (model or node)
    data = _optional_text(raw, "data") or REQUEST
    if data not in (REQUEST, RESPONSE):
        raise InvalidArgument(f"data {_show(data)} is not supported: use '$request' or '$response' (V2 "
                              f"passes a response's outputs on as the next request's inputs)")
    dependency = _optional_text(raw, "dependency") or "Soft"
    if dependency not in ("Soft", "Hard"):
        raise InvalidArgument(f"dependency {_show(dependency)} is not 'Soft' or 'Hard'")
    weight = raw.get("weight")
    if router_type == "Splitter":
        if weight is None:
            raise InvalidArgument("a Splitter step needs a weight (an integer; the node's weights sum to 100)")
        if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 100:
            raise InvalidArgument(f"weight {_show(weight)} is not an integer from 0 to 100")
    elif weight is not None:
        raise InvalidArgument(f"weight is only for Splitter steps; this node is a {router_type}")
    return Step(name=name, model=model, node=node, data=data,
                condition=_condition(router_type, i, raw.get("condition")),
                weight=weight if isinstance(weight, int) else 0, hard=dependency == "Hard")


def _condition(router_type: str, i: int, text: Any) -> Condition | None:
    if text is None or text == "":
        if router_type == "Switch":
            raise InvalidArgument("a Switch step needs a condition (a GJSON path on the request; '@this' "
                                  "always matches, for a default route)")
        return None
    if router_type not in ("Switch", "Sequence"):
        raise InvalidArgument(f"a condition is only for Switch and Sequence steps; a {router_type} ignores it")
    if router_type == "Sequence" and i == 1:
        raise InvalidArgument("a condition on a Sequence's first step has no previous response to test "
                              "(KServe fails such a request at run time)")
    if not isinstance(text, str):
        raise InvalidArgument(f"condition {_show(text)} is not a string")
    if len(text) > MAX_CONDITION:
        raise InvalidArgument(f"the condition is {len(text)} characters long; the limit is {MAX_CONDITION}")
    try:
        return compile_condition(text)
    except MeshError as e:
        raise InvalidArgument(f"condition {_show(text)}: {e.message}") from None


def _check_acyclic(nodes: Mapping[str, Node]) -> None:
    """Depth-first search from every node; a back edge is a cycle, named by its path."""
    done: set[str] = set()
    for start in nodes:
        if start in done:
            continue
        path: list[str] = [start]
        on_path = {start}
        # An explicit stack (node, next step index) keeps the depth bounded by MAX_NODES without
        # Python recursion.
        stack: list[tuple[str, int]] = [(start, 0)]
        while stack:
            name, k = stack[-1]
            steps = nodes[name].steps
            while k < len(steps) and not steps[k].node:
                k += 1
            if k == len(steps):
                stack.pop()
                path.pop()
                on_path.discard(name)
                done.add(name)
                continue
            stack[-1] = (name, k + 1)
            nxt = steps[k].node
            if nxt in on_path:
                cycle = [*path[path.index(nxt):], nxt]
                raise InvalidArgument(f"node {name!r}, step {k + 1} ({steps[k].name!r}): the graph has a "
                                      f"cycle: {' -> '.join(cycle)}")
            if nxt in done:
                continue
            path.append(nxt)
            on_path.add(nxt)
            stack.append((nxt, 0))
