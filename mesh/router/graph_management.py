"""The management of inference graphs (mmesh.ModelMeshGraphs), transport-neutral.

A graph is KServe's ``InferenceGraph`` spec stored under ``graphs/<id>`` (``GraphRecord``) and run
by every router (``mesh.router.dataplane``), which holds the parsed graphs in its view. Defining
one checks, in this order, and refuses with the place named:

1. the graph ID (the model-ID rules, ``mesh.ids``), the owner's length and the spec's size
   (64 KiB of JSON, counted on the text as sent, before it is parsed);
2. the spec itself (``mesh.graphs.spec.parse_graph``: cycles, unknown nodes, conditions, weights,
   at most 256 model calls per request);
3. with auth on, every model the graph names is inside the caller's model-ID prefixes (the graph
   ID itself is checked by the auth interceptor): a token may not build a graph over models it
   could not call itself;
4. every serviceName is a registered model or a vModel (NOT_FOUND naming node and step): a typo
   is caught when the graph is defined, not by its first request;
5. the ID is not a registered model's or a vModel's (ALREADY_EXISTS): a request naming it could
   not tell which was meant (the data plane resolves vModel, then graph, then model);
6. a new graph fits ``router.max_graphs`` (RESOURCE_EXHAUSTED): every router holds every graph
   parsed, so their number is bounded like any client input (a replaced graph always fits).

The reverse clash is refused too: ``registerModel``, ``setVModel`` and ``setVModelSplit`` refuse an
ID that is a graph's (``mesh.router.management``). Two routers racing (a graph defined on one while
a vModel of the same ID is created on the other) can still both succeed; then the vModel wins
every request, and the graph's status says SHADOWED instead of hiding it.

What is not checked: a model unregistered after the graph was defined (graphs take no references,
see ``mesh.registry.keys``); its step then fails at run time and the graph's status shows it
NOT_FOUND. A graph's status is READY when every model it names has a loaded copy, else DEFINED;
requests load what is missing, as for a model. SHADOWED: a vModel has the graph's ID (see above),
so requests naming it reach the vModel.

Owners work as for vModels: a graph defined with an owner is changed or deleted only by calls
naming it; with auth on, a graph defined by a token with prefixes is changed or deleted only by
that token or by an unscoped (operator's) token.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson
import structlog

from mesh.auth import Principal, current_caller
from mesh.errors import (
    AlreadyExists,
    Code,
    FailedPrecondition,
    InvalidArgument,
    MeshError,
    PermissionDenied,
    ResourceExhausted,
)
from mesh.graphs.spec import MAX_SPEC_BYTES, Graph, graph_models, parse_graph, spec_json
from mesh.ids import check_model_id
from mesh.registry.records import GraphRecord
from mesh.registry.registry import Registry
from mesh.router.management import DEFAULT_PAGE, MAX_OWNER_CHARS, MAX_PAGE, Management, ModelStatus
from mesh.router.view import ClusterView

log = structlog.get_logger(__name__)


class GraphModelNotFound(MeshError):
    """A graph step names a model that is neither registered nor a vModel (NOT_FOUND, with the place)."""

    code = Code.NOT_FOUND


@dataclass(frozen=True)
class GraphModel:
    model_id: str  # the serviceName as the graph names it
    status: ModelStatus
    is_vmodel: bool = False
    active_model_id: str = ""


@dataclass(frozen=True)
class GraphStatus:
    status: str  # NOT_FOUND, DEFINED, READY, SHADOWED
    spec_json: str = ""
    models: list[GraphModel] = field(default_factory=list)
    owner: str = ""
    updated_ms: int = 0


@dataclass(frozen=True)
class GraphListEntry:
    graph_id: str
    nodes: int
    models: tuple[str, ...]
    updated_ms: int


def step_place(graph: Graph, model_id: str) -> str:
    """``node 'root', step 2 ('b')`` of the first step naming ``model_id`` (steps count from 1)."""
    for node in graph.nodes.values():
        for i, step in enumerate(node.steps, 1):
            if step.model == model_id:
                return f"node {node.name!r}, step {i} ({step.name!r})"
    return "a step"


def _check_owner(record: GraphRecord, owner: str, caller: Principal | None, what: str) -> None:
    if record.owner != owner:
        if record.owner:
            raise FailedPrecondition(f"graph {record.graph_id!r} is owned by {record.owner!r}: name that owner "
                                     f"to {what} it")
        raise FailedPrecondition(f"graph {record.graph_id!r} exists without an owner; a call for owner "
                                 f"{owner[:100]!r} may not {what} it")
    if record.owner_token and caller is not None and caller.prefixes and caller.name != record.owner_token:
        raise PermissionDenied(f"graph {record.graph_id!r} was defined with token {record.owner_token!r}; "
                               f"token {caller.name!r} may not {what} it")


def parse_spec_text(graph_id: str, text: str) -> Graph:
    """The checked graph of a spec given as JSON text (steps 1-2 of the module docstring)."""
    check_model_id(graph_id, "graph")
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_SPEC_BYTES:
        raise InvalidArgument(f"graph {graph_id!r}: the spec is {size} bytes of JSON; the limit is {MAX_SPEC_BYTES}")
    if not text.strip():
        raise InvalidArgument(f"graph {graph_id!r}: no spec given (the InferenceGraph's spec as JSON)")
    try:
        spec = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise InvalidArgument(f"graph {graph_id!r}: the spec is not valid JSON: {exc}") from None
    return parse_graph(graph_id, spec)


class GraphManagement:
    def __init__(self, *, registry: Registry, view: ClusterView, models: Management,
                 clock: Callable[[], float] = time.time, max_graphs: int = 1000) -> None:
        self.registry = registry
        self.view = view
        self.models = models  # model status, as getModelStatus answers it
        self.clock = clock
        self.max_graphs = max_graphs  # router.max_graphs (0: no bound)

    async def set_graph(self, graph_id: str, spec_text: str, *, owner: str = "") -> GraphStatus:
        if len(owner) > MAX_OWNER_CHARS:
            raise InvalidArgument(f"graph owner is {len(owner)} characters; the limit is {MAX_OWNER_CHARS}")
        graph = parse_spec_text(graph_id, spec_text)
        spec = orjson.loads(spec_text)
        names = sorted(graph_models(graph))
        caller = current_caller()
        if caller is not None:
            caller.check_model(graph_id, "graph")
            for name in names:
                if not caller.allows(name):
                    raise PermissionDenied(
                        f"graph {graph_id!r}: {step_place(graph, name)}: token {caller.name!r} may not use model "
                        f"{name!r}: outside its model-ID prefixes ({', '.join(caller.prefixes)})")
        for name in names:
            if name not in self.view.vmodels and await self.registry.get_model(name) is None:
                raise GraphModelNotFound(f"graph {graph_id!r}: {step_place(graph, name)}: model {name!r} is "
                                         "neither a registered model nor a vModel")
        if graph_id in self.view.vmodels or await self.registry.get_model(graph_id) is not None:
            raise AlreadyExists(f"graph ID {graph_id!r} is already a model or vModel ID; a request naming it could "
                                "not tell which is meant: choose another ID")
        while True:  # compare-and-swap: a concurrent definition of the same graph wins or loses whole
            current = await self.registry.get_graph(graph_id)
            if current is not None:
                _check_owner(current[0], owner, caller, "change")
            elif self.max_graphs:
                count = await self.registry.store.count_prefix(self.registry.keys.graphs)
                if count >= self.max_graphs:
                    raise ResourceExhausted(f"graph {graph_id!r}: the mesh holds {count} graphs, its limit "
                                            f"(router.max_graphs) is {self.max_graphs}; delete some first")
            # The token that first defined it stays its owner token across changes.
            owner_token = current[0].owner_token if current is not None else (caller.name if caller else "")
            record = GraphRecord(graph_id=graph_id, spec=spec, owner=owner, owner_token=owner_token,
                                 updated_ms=int(self.clock() * 1000))
            if await self.registry.put_graph(record, expected_revision=current[1] if current else None):
                break
        self.view.set_graph(graph)  # this router's next request runs it; the watch brings it to the others
        log.info("inference graph defined", graph_id=graph_id, nodes=len(graph.nodes), models=len(names),
                 replaced=current is not None)
        return await self._status(record)

    async def graph_status(self, graph_id: str) -> GraphStatus:
        check_model_id(graph_id, "graph")
        current = await self.registry.get_graph(graph_id)
        if current is None:
            return GraphStatus(status="NOT_FOUND")
        return await self._status(current[0])

    async def _status(self, record: GraphRecord) -> GraphStatus:
        try:
            names = sorted(graph_models(parse_graph(record.graph_id, record.spec)))
        except MeshError as exc:  # stored by hand or by another version: say so, do not fail the call
            raise FailedPrecondition(f"stored graph {record.graph_id!r} does not parse: {exc.message}") from None
        models = []
        for name in names:
            active = self.view.resolve_vmodel(name)
            status = await self.models.model_status(active if active is not None else name)
            models.append(GraphModel(name, status, is_vmodel=active is not None, active_model_id=active or ""))
        ready = bool(models) and all(m.status.status == "LOADED" for m in models)
        shadowed = record.graph_id in self.view.vmodels or await self.registry.get_vmodel(record.graph_id) is not None
        state = "SHADOWED" if shadowed else "READY" if ready else "DEFINED"
        return GraphStatus(status=state, spec_json=spec_json(record.spec).decode(),
                           models=models, owner=record.owner, updated_ms=record.updated_ms)

    async def delete_graph(self, graph_id: str, *, owner: str = "") -> None:
        check_model_id(graph_id, "graph")
        current = await self.registry.get_graph(graph_id)
        if current is None:
            return  # already gone: deleting is idempotent
        record, revision = current
        _check_owner(record, owner, current_caller(), "delete")
        if await self.registry.delete_graph(graph_id, expected_revision=revision):
            self.view.forget_graph(graph_id)
            log.info("inference graph deleted", graph_id=graph_id)
        else:
            raise FailedPrecondition(f"graph {graph_id!r} changed while it was being deleted; try again")

    async def list_graphs(self, *, prefix: str = "", page_size: int = 0,
                          page_token: str = "") -> tuple[list[GraphListEntry], str]:
        size = min(page_size or DEFAULT_PAGE, MAX_PAGE)
        records = await self.registry.list_graphs(prefix=prefix, limit=size + 1, start_after=page_token)
        more = len(records) > size
        records = records[:size]
        entries = []
        for r in records:
            graph = self.view.graphs.get(r.graph_id)
            if graph is None:  # not yet in this router's view, or does not parse
                try:
                    graph = parse_graph(r.graph_id, r.spec)
                except MeshError:
                    entries.append(GraphListEntry(r.graph_id, 0, (), r.updated_ms))
                    continue
            entries.append(GraphListEntry(r.graph_id, len(graph.nodes), tuple(sorted(graph_models(graph))),
                                          r.updated_ms))
        return entries, (records[-1].graph_id if more and records else "")
