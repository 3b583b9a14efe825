"""Running an inference graph: KServe's InferenceGraph router semantics over V2 protobuf bytes.

:class:`GraphRunner` runs a checked :class:`~mesh.graphs.spec.Graph` for one ``ModelInfer``
request; each model call goes through a :class:`StepCall` (the router's data plane: it resolves
vModels, routes, retries and enforces the per-call timeout). The runner never touches the network.

Semantics (KServe's ``cmd/router``, adapted to V2; the module docstring of
:mod:`mesh.graphs.spec` has the definition-time rules):

- **Sequence**: steps in order. ``$request`` is the node's input, ``$response`` the previous
  step's response as a request (:mod:`mesh.graphs.v2`: outputs become inputs of the same name).
  A step with a condition (after the first) runs only if the condition matches the previous
  response's JSON form; if not, the Sequence stops and answers that response (KServe's rule). The
  node answers its last step's response.
- **Switch**: the first step whose condition matches the node's input (JSON form) runs on it;
  none matching fails the node with NOT_FOUND ("no step's condition matched"), as KServe's router
  answers 404 (older KServe releases passed the input through, which hides a routing mistake).
- **Ensemble**: every step runs concurrently on the node's input; the answer has every step's
  outputs renamed ``<step>.<output>``, in step order (KServe answers ``{step: response}`` JSON;
  a V2 response cannot nest).
- **Splitter**: one step, drawn by weight (``rng.randrange(100)`` against the cumulative
  weights, as KServe draws).
- A ``nodeName`` step runs that node on the step's request; nodes nest to any depth the acyclic
  check allows (at most 64).

Failures. A step fails when its call raises a :class:`~mesh.errors.MeshError` (or its node
fails). The failure is a :class:`GraphError` of the model's code whose message names the place:
``graph 'g', node 'root', step 'b' (model 'm'): <the model's message>`` (a failure inside a
nested node keeps the innermost place, which names the model). Then:

- a **Hard** step fails its node at once (an Ensemble cancels its other steps);
- a **Soft** step (KServe's default) is skipped and logged with graph, node and step: a
  Sequence goes on (the next ``$response`` is the last successful response, or the node's input
  if none succeeded) and an Ensemble answers without it;
- but a node with no answer to give fails whatever the dependency: the last step of a Sequence,
  the step a Switch or Splitter chose, every step of an Ensemble. KServe's router, too, returns
  such a step's error to the caller (it never invents an answer), and a client never receives an
  echo of its own request as a model's answer.

Deadline: the request's ``timeout`` (seconds, None for none) is one deadline for the whole graph;
each call gets the time left, and a step that would start after the deadline fails the graph
with DEADLINE_EXCEEDED naming it (Soft or not: nothing after it could run either).

Requested outputs and the final ``model_name`` are handled by :func:`mesh.graphs.v2.finish`; the
answer is named after the graph (``model_name`` = graph ID, empty ``model_version``).
"""

from __future__ import annotations

import asyncio
import random
from typing import Protocol

import structlog

from mesh.errors import Code, MeshError, RemoteError
from mesh.graphs import v2
from mesh.graphs.spec import RESPONSE, ROOT, Graph, Node, Step

__all__ = ["GraphError", "GraphRunner", "Headers", "StepCall"]

log = structlog.get_logger(__name__)

# The data plane's header type (mesh.router.dataplane.Headers), repeated here so that this
# package does not import the router.
Headers = tuple[tuple[str, str | bytes], ...]


class StepCall(Protocol):
    async def __call__(self, model: str, body: bytes, headers: Headers, timeout: float | None) -> bytes:
        """Run ``body`` (a ModelInferRequest addressed to ``model``) on ``model`` (a model or vModel
        ID) within ``timeout`` seconds; the ModelInferResponse bytes, or a MeshError."""
        ...


class GraphError(RemoteError):
    """A graph's step or node failed; ``code`` is the failure's code, the message names the place."""

    def __init__(self, code: Code, message: str, *, graph: str, node: str, step: str,
                 stops: bool = False) -> None:
        super().__init__(code, message)
        self.graph = graph
        self.node = node
        self.step = step
        # True when no step may run after this one (the deadline passed): never skipped as Soft.
        self.stops = stops


class GraphRunner:
    def __init__(self, call: StepCall, rng: random.Random | None = None) -> None:
        self._call = call
        self._rng = rng if rng is not None else random.Random()

    async def run(self, graph: Graph, body: bytes, headers: Headers, timeout: float | None) -> bytes:
        """Run ``graph`` on the client's ModelInferRequest ``body``; its ModelInferResponse bytes
        (``model_name`` = the graph's ID), or a MeshError (GraphError naming the failed step)."""
        loop = asyncio.get_running_loop()
        request, requested = v2.Request.from_client(body)
        run = _Run(self, graph, headers, None if timeout is None else loop.time() + timeout, loop)
        response = await run.node(graph.nodes[ROOT], request)
        return v2.finish(response, graph.graph_id, requested)


class _Run:
    """One request's walk through a graph."""

    __slots__ = ("_call", "_rng", "deadline", "graph", "headers", "loop")

    def __init__(self, runner: GraphRunner, graph: Graph, headers: Headers, deadline: float | None,
                 loop: asyncio.AbstractEventLoop) -> None:
        self._call = runner._call
        self._rng = runner._rng
        self.graph = graph
        self.headers = headers
        self.deadline = deadline
        self.loop = loop

    def place(self, node: Node, step: Step | None) -> str:
        where = f"graph {self.graph.graph_id!r}, node {node.name!r}"
        return where if step is None else f"{where}, step {step.name!r} ({step.target})"

    def error(self, node: Node, step: Step | None, code: Code, message: str, *, stops: bool = False) -> GraphError:
        return GraphError(code, f"{self.place(node, step)}: {message}", graph=self.graph.graph_id,
                          node=node.name, step="" if step is None else step.name, stops=stops)

    def skipped(self, node: Node, step: Step, err: GraphError) -> None:
        log.warning("graph step failed, skipped (Soft)", graph=self.graph.graph_id, node=node.name,
                    step=step.name, code=err.code.value, error=err.message)

    async def node(self, node: Node, request: v2.Request) -> bytes:
        kind = node.router_type
        if kind == "Sequence":
            return await self.sequence(node, request)
        if kind == "Ensemble":
            return await self.ensemble(node, request)
        if kind == "Switch":
            doc = v2.request_view(request.body)
            for step in node.steps:
                assert step.condition is not None  # parse_graph requires one on every Switch step
                if step.condition.matches(doc):
                    return await self.step(node, step, request)
            raise self.error(node, None, Code.NOT_FOUND, "no step's condition matched the request")
        # Splitter: parse_graph makes the weights sum to 100, so a step is always chosen.
        point = self._rng.randrange(100)
        end = 0
        for step in node.steps:
            end += step.weight
            if point < end:
                return await self.step(node, step, request)
        raise AssertionError(f"the weights of {self.place(node, None)} do not sum to 100")

    async def step(self, node: Node, step: Step, request: v2.Request) -> bytes:
        remaining = None
        if self.deadline is not None:
            remaining = self.deadline - self.loop.time()
            if remaining <= 0:
                raise self.error(node, step, Code.DEADLINE_EXCEEDED,
                                 "the request's deadline passed before this step started", stops=True)
        if step.node:
            return await self.node(self.graph.nodes[step.node], request)
        try:
            return await self._call(step.model, request.to(step.model), self.headers, remaining)
        except GraphError:
            raise
        except MeshError as e:
            raise self.error(node, step, e.code, e.message) from e

    async def sequence(self, node: Node, request: v2.Request) -> bytes:
        last: bytes | None = None        # the last successful response
        last_step: Step | None = None
        previous: v2.Request | None = request   # `last` as a request, made when first needed
        failure: GraphError | None = None
        final = len(node.steps) - 1
        for i, step in enumerate(node.steps):
            if step.condition is not None:
                doc = v2.request_view(request.body) if last is None else self.view(node, last_step, last)
                if not step.condition.matches(doc):
                    break
            if step.data == RESPONSE:
                if previous is None:
                    assert last is not None and last_step is not None
                    previous = self.as_request(node, last_step, last, request)
                step_request = previous
            else:
                step_request = request
            try:
                last = await self.step(node, step, step_request)
            except GraphError as e:
                if step.hard or i == final or e.stops:
                    raise
                self.skipped(node, step, e)
                failure = e
                continue
            last_step = step
            previous = None
        if last is None:
            assert failure is not None
            raise failure
        return last

    def view(self, node: Node, step: Step | None, response: bytes) -> dict[str, object]:
        try:
            return v2.response_view(response)
        except MeshError as e:
            raise self.error(node, step, Code.INTERNAL, f"the answer does not parse: {e.message}") from e

    def as_request(self, node: Node, step: Step, response: bytes, request: v2.Request) -> v2.Request:
        try:
            return v2.Request.from_response(response, request)
        except MeshError as e:
            raise self.error(node, step, Code.INTERNAL, f"the answer does not parse: {e.message}") from e

    async def ensemble(self, node: Node, request: v2.Request) -> bytes:
        steps = node.steps
        results: list[bytes | None] = [None] * len(steps)
        failures: list[GraphError | None] = [None] * len(steps)

        async def one(i: int, step: Step) -> None:
            try:
                results[i] = await self.step(node, step, request)
            except GraphError as e:
                if step.hard or e.stops:
                    raise
                self.skipped(node, step, e)
                failures[i] = e

        if len(steps) == 1:
            await one(0, steps[0])
        else:
            try:
                # A TaskGroup cancels the other steps when one raises (a Hard failure), and all of
                # them when this request is cancelled.
                async with asyncio.TaskGroup() as group:
                    for i, step in enumerate(steps):
                        group.create_task(one(i, step))
            except BaseExceptionGroup as group_error:
                raise _first(group_error) from None
        parts = [(step.name, body) for step, body in zip(steps, results, strict=True) if body is not None]
        if not parts:
            raise next(f for f in failures if f is not None)
        try:
            return v2.merge(parts, request.id)
        except MeshError as e:
            raise self.error(node, None, Code.INTERNAL, e.message) from e


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The exception to raise for a failed TaskGroup: a graph failure if there is one (the first
    Hard step that failed), else the first error (a bug: it stays what it is)."""
    leaves: list[BaseException] = []

    def walk(g: BaseExceptionGroup[BaseException]) -> None:
        for e in g.exceptions:
            if isinstance(e, BaseExceptionGroup):
                walk(e)
            else:
                leaves.append(e)

    walk(group)
    return next((e for e in leaves if isinstance(e, GraphError)), leaves[0])
