"""Running an inference graph: KServe's InferenceGraph router semantics over V2 protobuf bytes.

:class:`GraphRunner` runs a checked :class:`~mesh.graphs.spec.Graph` for one ``ModelInfer``
request; each model call goes through a :class:`StepCall` (the router's data plane: it resolves
vModels, routes, retries and enforces the per-call timeout). The runner never touches the network.

Semantics (KServe's ``cmd/router``, adapted to V2; the module docstring of
:mod:`mesh.graphs.spec` has the definition-time rules):

- **Sequence**: steps in order. ``$request`` is the node's input, ``$response`` the previous
  step's response as a request (:mod:`mesh.graphs.v2`: outputs become inputs of the same name).
  A step with a condition (after the first) runs only if the condition matches the previous
  response's JSON form (the last successful one; the node's input if no step has answered yet);
  if not, the Sequence stops and answers that response (KServe's rule). The node answers its last
  step's response.
- **Switch**: the first step whose condition matches the node's input (JSON form) runs on it
  (a Switch reached through a ``$response`` step sees that response as a request: its outputs are
  under ``inputs``, as the step that follows will see them);
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

Deadline: the request's ``timeout`` (seconds; None takes the runner's ``default_timeout``, the
router's ``router.graph_default_timeout_s``, so that no graph request runs unbounded) is one
deadline for the whole graph; each call gets the time left, and a step that would start after the
deadline fails the graph with DEADLINE_EXCEEDED naming it (Soft or not: nothing after it could run
either). The deadline is checked as well before each condition is evaluated and before an Ensemble
merges its answers, the two pieces of work a graph does itself.

Bounds per request (all client-triggered work is bounded):

- **calls**: at most :attr:`Graph.calls` (at most ``spec.MAX_CALLS``), checked at definition; the
  step call (the router) counts each call against its in-flight limits too, and may refuse one
  with :class:`StepRefused`: the graph then fails with RESOURCE_EXHAUSTED, whatever the step's
  dependency (a Soft step skipped there would answer a partial result for an overloaded router);
- **bytes**: every step's request, every answer and every merged answer is charged to one budget
  of ``max_bytes`` (``router.max_graph_request_bytes``); past it the graph fails with
  RESOURCE_EXHAUSTED naming the step. It counts what is made, not what is still held: an upper
  bound on the memory one request holds (a 16 MiB request through 64 Ensemble steps would
  otherwise hold 64 copies, 1 GiB);
- **condition work**: one :class:`~mesh.graphs.condition.Budget` of ``condition.MAX_WORK`` units
  for every condition the request evaluates (paths, elements, decoded data, glob checks).

Requested outputs and the final ``model_name`` are handled by :func:`mesh.graphs.v2.finish`; the
answer is named after the graph (``model_name`` = graph ID, empty ``model_version``).

Headers: every step gets the client's headers as the data plane passes them (tracing, tenant
headers); which model a step calls is the step's ``serviceName``, never a header.

Cost: no per-request checks (the graph was checked at definition), requests spliced as bytes
(:mod:`mesh.graphs.v2`), protobuf decoded only for a condition's JSON view (without the raw
tensors unless the condition reads them) and for an Ensemble mixing raw and typed answers.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any, Protocol

import structlog

from mesh.errors import Code, MeshError, RemoteError, ResourceExhausted
from mesh.graphs import v2
from mesh.graphs.condition import MAX_WORK, Budget
from mesh.graphs.spec import RESPONSE, ROOT, Graph, Node, Step

__all__ = ["GraphError", "GraphRunner", "Headers", "StepCall", "StepRefused"]

_MIB = 1 << 20

log = structlog.get_logger(__name__)

# The data plane's header type (mesh.router.dataplane.Headers), repeated here so that this
# package does not import the router.
Headers = tuple[tuple[str, str | bytes], ...]


class StepCall(Protocol):
    async def __call__(self, model: str, body: bytes, headers: Headers, timeout: float | None) -> bytes:
        """Run ``body`` (a ModelInferRequest addressed to ``model``) on ``model`` (a model or vModel
        ID) within ``timeout`` seconds; the ModelInferResponse bytes, or a MeshError."""
        ...


class StepRefused(ResourceExhausted):
    """Raised by a StepCall that will not start the call at all (the router's own in-flight
    limits): the graph stops with RESOURCE_EXHAUSTED, Soft step or not (module docstring)."""


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
    def __init__(self, call: StepCall, rng: random.Random | None = None, *, max_bytes: int = 256 * _MIB,
                 default_timeout: float | None = None, clock: Callable[[], float] | None = None) -> None:
        self._call = call
        self._rng = rng if rng is not None else random.Random()
        self.max_bytes = max_bytes              # bytes made per request (module docstring); 0: no bound
        self.default_timeout = default_timeout  # seconds, for requests without a deadline; None: none
        self._clock = clock                     # the deadline's clock (tests); the loop's time by default

    async def run(self, graph: Graph, body: bytes, headers: Headers, timeout: float | None) -> bytes:
        """Run ``graph`` on the client's ModelInferRequest ``body``; its ModelInferResponse bytes
        (``model_name`` = the graph's ID), or a MeshError (GraphError naming the failed step)."""
        clock = self._clock or asyncio.get_running_loop().time
        request, requested = v2.Request.from_client(body)
        if timeout is None:
            timeout = self.default_timeout
        run = _Run(self, graph, headers, None if timeout is None else clock() + timeout, clock)
        response = await run.node(graph.nodes[ROOT], request)
        return v2.finish(response, graph.graph_id, requested)


class _Run:
    """One request's walk through a graph."""

    __slots__ = ("_call", "_rng", "bytes_left", "clock", "deadline", "graph", "headers", "max_bytes", "work")

    def __init__(self, runner: GraphRunner, graph: Graph, headers: Headers, deadline: float | None,
                 clock: Callable[[], float]) -> None:
        self._call = runner._call
        self._rng = runner._rng
        self.graph = graph
        self.headers = headers
        self.deadline = deadline
        self.clock = clock
        self.max_bytes = runner.max_bytes
        self.bytes_left = runner.max_bytes
        self.work = Budget(MAX_WORK, "this request's conditions")

    def charge(self, node: Node, step: Step | None, size: int) -> None:
        """Count ``size`` bytes made for this request (module docstring, "bytes")."""
        if not self.max_bytes:
            return
        self.bytes_left -= size
        if self.bytes_left < 0:
            raise self.error(node, step, Code.RESOURCE_EXHAUSTED,
                             f"the graph's steps made more than {self.max_bytes // _MIB} MiB of requests and answers "
                             f"for this request (router.max_graph_request_bytes); send a smaller request",
                             stops=True)

    def time_left(self, node: Node, step: Step | None, what: str) -> float | None:
        """Seconds to the deadline (None: none), or DEADLINE_EXCEEDED naming the place."""
        if self.deadline is None:
            return None
        remaining = self.deadline - self.clock()
        if remaining <= 0:
            raise self.error(node, step, Code.DEADLINE_EXCEEDED,
                             f"the request's deadline passed before {what}", stops=True)
        return remaining

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
            doc = self.request_doc(node, request)
            for step in node.steps:
                if self.matches(node, step, doc):
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
        remaining = self.time_left(node, step, "this step started")
        if step.node:
            return await self.node(self.graph.nodes[step.node], request)
        # Charged before the request is made (one copy of the tensors), so a request over its
        # budget never makes it; the request is no local of this frame, so a failure's traceback
        # (kept while the node runs: a Soft failure until the Ensemble ends) does not keep it.
        self.charge(node, step, request.size)
        try:
            answer = await self._call(step.model, request.to(step.model), self.headers, remaining)
        except GraphError:
            raise
        except StepRefused as e:
            raise self.error(node, step, e.code, e.message, stops=True) from _bare(e)
        except MeshError as e:
            raise self.error(node, step, e.code, e.message) from _bare(e)
        self.charge(node, step, len(answer))
        return answer

    async def sequence(self, node: Node, request: v2.Request) -> bytes:
        last: bytes | None = None        # the last successful response
        last_step: Step | None = None
        previous: v2.Request | None = request   # `last` as a request, made when first needed
        failure: GraphError | None = None
        final = len(node.steps) - 1
        for i, step in enumerate(node.steps):
            if step.condition is not None:
                doc = self.request_doc(node, request) if last is None else self.view(node, last_step, last)
                if not self.matches(node, step, doc):
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

    def matches(self, node: Node, step: Step, doc: dict[str, Any]) -> bool:
        """Whether the step's condition matches ``doc``; an error while evaluating it (a tensor
        that does not decode, a pattern over its work bound) names the step and its condition."""
        condition = step.condition
        assert condition is not None  # parse_graph requires one on every Switch step
        self.time_left(node, step, "its condition was evaluated")
        try:
            return condition.matches(doc, self.work)
        except MeshError as e:
            raise self.error(node, step, e.code, f"condition {condition.text!r}: {e.message}") from e

    def request_doc(self, node: Node, request: v2.Request) -> dict[str, Any]:
        """The JSON view of a node's input for its conditions (its fields are copied: charged)."""
        self.charge(node, None, sum(len(p) for p in request.parts))
        return v2.request_view(request)

    def view(self, node: Node, step: Step | None, response: bytes) -> dict[str, Any]:
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
        self.time_left(node, None, "the Ensemble's answers were merged")
        self.charge(node, None, sum(len(body) for _, body in parts))
        try:
            return v2.merge(parts, request.id)
        except MeshError as e:
            raise self.error(node, None, Code.INTERNAL, e.message) from e


def _bare(error: BaseException) -> BaseException:
    """``error`` and the exceptions it chains without their tracebacks: their frames hold the
    step's request (megabytes), and a graph keeps failures until its node answers."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        e.__traceback__ = None
        e = e.__cause__ or e.__context__
    return error


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
