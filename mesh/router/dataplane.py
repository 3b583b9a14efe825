"""The router's data plane, shared by its front ends: it imports no grpc and no HTTP framework.

A front end (the gRPC servicer ``mesh.router.grpc_inference``, the REST server ``mesh.rest.server``)
turns its request into the same few things: the V2 request as protobuf bytes (gRPC's as they
arrived, REST's converted from JSON), the headers as lower-case ``(key, value)`` pairs, how to read
the model name when no header names one, and the time left. It calls :meth:`DataPlane.relay`, and
maps the ``MeshError`` it may raise to its own status in its one place (``mesh.transport.status``,
``mesh.rest.status``). So model and vModel resolution, routing, retries, copy scaling, the access
log, spans and the request's log context are written once.

Resolution: ``mm-model-id`` / ``mm-vmodel-id`` (or ``-bin``) name the model, else the request's own
name (V2 ``model_name``, the REST path); without a header, a name that is a vModel is resolved as
one (as modelmesh-serving's clients expect: they address a Predictor by name), else a name that is
an inference graph runs the graph, else it is a model ID. A header always names a model or vModel,
never a graph, so ``mm-model-id: g`` still reaches a model that shares a graph's name.

Inference graphs (``mesh.graphs``): the view holds them parsed, so finding one costs a dict lookup,
done only while some graph is defined (no graph: one truthiness test per request). ModelInfer runs
the graph (``GraphRunner``); each step's serviceName is resolved like a request's name without a
header (vModel, else model: a step never names a graph, ``parse_graph`` leaves that to
``nodeName``) and forwarded through ``forward`` with the client's headers and the request's one
deadline (``router.graph_default_timeout_s`` when the client set none), so steps get the same
routing, retries and loads as a request. Each step call is counted against the in-flight limits
(``InflightLimit``: its request's bytes, and one call) as a client's call is, so one request can
never take the router past them: a step over them fails the graph with RESOURCE_EXHAUSTED
(``StepRefused``). The calls one request may make are bounded at definition (``spec.MAX_CALLS``)
and the bytes its steps make by ``router.max_graph_request_bytes`` (``mesh.graphs.executor``). The access log, span and
payload record of a graph request are one, under the graph's name. ModelReady of a graph: every
model it names has a loaded copy (the same rule as ``getGraphStatus``'s READY). ModelMetadata of a
graph: the name and platform ``inference-graph`` with no inputs or outputs, since a graph's
signature depends on its route (a Switch, a Splitter) and is declared nowhere.

Per attempt: choose a target (``routing``), forward with the concrete ID and, when the copy is
believed loaded, "no load" (``mesh.transport.runtime_link`` carries it). A "not here" answer or a
broken connection excludes that instance and the next attempt chooses again; so does a failed load,
until the model has failed on ``MAX_LOAD_FAILURES`` instances (``_try_load_elsewhere``); any other
answer (success or the runtime's own error) goes back to the client as it is. A runtime that dies
while loading the model is the exception: the crash witness quarantines the model
(FAILED_PRECONDITION, no other runtime tried: ``mesh.registry.crashes``).

The hot path avoids work per request: metadata passed on as a tuple, no logging on success. The
client's headers, ``traceparent``, ``tracestate`` and ``x-request-id`` included, go on to the
runtime as they are; the request's log context is one object in a context variable
(``mesh.logging``). The access log, spans and payload records (``mesh.router.payloads``: queued
after the answer, never awaited) take a second relay function, chosen once at start, so that with
all of them off the hot path does not even test for them.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Protocol

import structlog

from mesh import __version__
from mesh.errors import Code, MeshError, ModelNotFound, RemoteError, ResourceExhausted, RetryElsewhere, Unavailable
from mesh.gen.inference import grpc_service_pb2 as pb
from mesh.graphs.executor import GraphRunner, StepRefused
from mesh.graphs.spec import Graph, graph_models
from mesh.ids import check_model_id
from mesh.logging import REQUEST_ID, bind_request, current_request, header, new_request_id
from mesh.registry.crashes import CrashWitness
from mesh.registry.records import LOADED, ModelSpec
from mesh.registry.specs import SpecCache
from mesh.router.payloads import PayloadLog
from mesh.router.replicas import CopyScaler
from mesh.router.routing import MAX_LOAD_FAILURES, Target, pick_copy, pick_home
from mesh.router.split import choose as choose_split
from mesh.router.view import ClusterView
from mesh.tracing import Tracer
from mesh.transport.inflight import InflightLimit
from mesh.transport.metadata import LOAD_MODE, MODEL_ID, VMODEL_ID, model_selection

log = structlog.get_logger(__name__)
access = structlog.get_logger("mesh.access")

Headers = tuple[tuple[str, str | bytes], ...]

SERVICE = "inference.GRPCInferenceService"
INFER = f"/{SERVICE}/ModelInfer"
METADATA = f"/{SERVICE}/ModelMetadata"
SERVER_NAME = "mesh-serving"
GRAPH_PLATFORM = "inference-graph"  # ModelMetadata's platform for a graph (module docstring)
# Headers not passed on: the model selection (replaced by the concrete ID), the load mode (ours to
# set), the transports' own headers (set anew on the outgoing call), and the client's credentials
# (checked here; a runtime has no use for them, and they must not reach a runtime's logs).
STRIP = frozenset({MODEL_ID, MODEL_ID + "-bin", VMODEL_ID, VMODEL_ID + "-bin", LOAD_MODE, "user-agent",
                   "grpc-accept-encoding", "grpc-encoding", "grpc-timeout", "grpc-trace-bin",
                   "grpc-tags-bin",
                   "authorization", "proxy-authorization", "cookie", "x-api-key", "x-auth-token"})


class Link(Protocol):
    """How a request reaches one runtime instance (``mesh.transport.runtime_link.RuntimeLink``).

    Returns the response bytes; raises ``RemoteError`` (the runtime's answer) or
    ``RetryElsewhere`` (gone, or the copy is not there)."""

    async def call(self, instance_id: str, endpoint: str, allow_load: bool, method: str, model_id: str,
                   body: bytes, metadata: Headers, timeout: float | None, spec: ModelSpec | None) -> bytes: ...


def passthrough(metadata: Headers) -> Headers:
    """The client's headers that go on to the runtime."""
    return tuple((k, v) for k, v in metadata if k not in STRIP)


class DataPlane:
    def __init__(self, *, view: ClusterView, specs: SpecCache, link: Link, max_attempts: int,
                 load_factor: float, ready: Callable[[], bool], scaler: CopyScaler | None = None,
                 access_log: bool = False, tracer: Tracer | None = None,
                 inflight: InflightLimit | None = None, payloads: PayloadLog | None = None,
                 graph_timeout_s: float = 60.0, graph_max_bytes: int = 256 << 20) -> None:
        self.view = view
        self._passthrough = passthrough
        self.specs = specs
        self.link = link
        self.max_attempts = max_attempts
        self.load_factor = load_factor
        self.ready = ready
        self.scaler = scaler
        self._rng = random.Random()
        self.access_log = access_log
        self.tracer = tracer
        # Records of answered inferences (mesh.router.payloads), queued after the answer.
        self.payloads = payloads
        if access_log or tracer is not None or payloads is not None:
            self.relay = self._relay_observed  # type: ignore[method-assign]
        # Told of each instance found gone, so that later requests route around it too.
        self.on_gone: Callable[[str], None] | None = None
        # Told when a runtime dies under a request that made it load (mesh.registry.crashes).
        self.witness: CrashWitness | None = None
        self.inflight = inflight or InflightLimit(max_bytes=1 << 30, max_requests=20_000)
        # router.graph_default_timeout_s (0: none) and router.max_graph_request_bytes (module docstring).
        self.graph_runner = GraphRunner(self._step_call, max_bytes=graph_max_bytes,
                                        default_timeout=graph_timeout_s or None)

    # --- model selection ----------------------------------------------------------------------
    def resolve(self, requested: str, is_vmodel: bool, from_header: bool, metadata: Headers = (), *,
                count: bool = True) -> str:
        """The concrete model ID for a name (vModels resolved to their active model, or for a
        vModel with a traffic split, to the target ``mesh.router.split`` picks for this request,
        by its sticky header in ``metadata`` if it has one; ``count``: an inference, counted per
        split target)."""
        if is_vmodel or not from_header:
            record = self.view.vmodels.get(requested)
            if record is not None:
                return choose_split(record, self.view, metadata, self._rng, count) if record.split \
                    else record.active_model_id
            if is_vmodel:
                raise ModelNotFound(requested, what="vModel")
        return requested

    def select(self, metadata: Headers, own_name: Callable[[], str], *, count: bool = True) -> tuple[str, Headers]:
        """(model ID, headers to pass on) for a request; ``own_name()`` reads the name the request
        itself gives (the body's ``model_name``, the REST path), asked only without a header."""
        _, model_id = self.named(metadata, own_name, count=count)
        return model_id, self._passthrough(metadata)

    def named(self, metadata: Headers, own_name: Callable[[], str], *, count: bool = True) -> tuple[str, str]:
        """(the name the request gave, the concrete model ID it resolves to)."""
        requested, is_vmodel, _ = model_selection(metadata)
        from_header = requested is not None
        if requested is None:
            requested = own_name()
        return requested, self.resolve(check_model_id(requested), is_vmodel, from_header, metadata, count=count)

    def sticky_headers(self, metadata: Headers, own_name: Callable[[], str]) -> tuple[str, ...]:
        """The sticky headers of the split vModels a request names: the vModel itself, or the steps
        of the graph it names (each resolved with the request's headers); the only headers beyond
        the forwarded ones a front end that does not pass every header on (REST) must read."""
        requested, is_vmodel, _ = model_selection(metadata)
        if requested is None:
            requested = own_name()
        elif not is_vmodel:
            return ()  # mm-model-id names a model, never a vModel
        vmodels = self.view.vmodels
        record = vmodels.get(requested)
        if record is not None:
            return (record.sticky_header,) if record.split and record.sticky_header else ()
        graph = self.view.graphs.get(requested) if self.view.graphs and not is_vmodel else None
        if graph is None:
            return ()
        found = (vmodels.get(m) for m in graph_models(graph))
        return tuple(dict.fromkeys(r.sticky_header for r in found if r is not None and r.split and r.sticky_header))

    def labels(self, metadata: Headers, own_name: Callable[[], str]) -> tuple[str, str]:
        """(model ID, vModel ID) of a request, for per-model metrics only (it resolves again)."""
        requested = ""
        try:
            selected, is_vmodel, _ = model_selection(metadata)
            requested = selected if selected is not None else own_name()
            record = self.view.vmodels.get(requested) if is_vmodel or selected is None else None
            if record is not None and record.split:
                # The target this request went to: a second draw could differ, and would be counted.
                ctx = current_request()
                model_id = ctx.model_id if ctx is not None and ctx.model_id else requested
            else:
                model_id = self.resolve(requested, is_vmodel, selected is not None, count=False)
        except Exception:
            return requested, ""
        return model_id, (requested if requested != model_id else "")

    def graph_named(self, metadata: Headers, own_name: Callable[[], str]) -> Graph | None:
        """The graph a request names (module docstring: no header, not a vModel), else None."""
        graphs = self.view.graphs
        if not graphs or model_selection(metadata)[0] is not None:
            return None
        name = own_name()
        if name in self.view.vmodels:
            return None
        return graphs.get(name)

    # --- relaying -----------------------------------------------------------------------------
    async def relay(self, method: str, body: bytes, metadata: Headers, own_name: Callable[[], str],
                    timeout: float | None, resolved: tuple[str, str] | None = None) -> bytes:
        """Forward a V2 request naming a model (ModelInfer, ModelMetadata) and return the
        runtime's response bytes. Raises MeshError; ``timeout`` None: the client set no deadline,
        so none is imposed downstream either. ``resolved``: (requested, model ID) ``named`` gave
        this request already (one request, one split choice: REST V1 predict's two calls)."""
        if resolved is not None:
            model_id, onward = resolved[1], self._passthrough(metadata)
        else:
            model_id, onward = self.select(metadata, own_name, count=method == INFER)
        bind_request(model_id, onward)
        if self.view.graphs:
            graph = self.graph_named(metadata, own_name)
            if graph is not None:
                return await self.run_graph(method, graph, body, onward, timeout)
        return await self.forward(method, model_id, body, onward, timeout)

    async def run_graph(self, method: str, graph: Graph, body: bytes, onward: Headers,
                        timeout: float | None) -> bytes:
        """A request naming a graph: ModelInfer runs it, ModelMetadata answers the graph's own."""
        if method == METADATA:
            answer: bytes = pb.ModelMetadataResponse(name=graph.graph_id, platform=GRAPH_PLATFORM).SerializeToString()
            return answer
        return await self.graph_runner.run(graph, body, onward, timeout)

    async def _step_call(self, model: str, body: bytes, headers: Headers, timeout: float | None) -> bytes:
        """One model step of a graph: resolved like a request's name without a header, and counted
        in flight as a client's call is (module docstring)."""
        size = len(body)
        try:
            connection = self.inflight.enter(size)
        except ResourceExhausted as exc:
            raise StepRefused(exc.message) from None
        try:
            return await self.forward(INFER, self.resolve(model, False, False, headers), body, headers, timeout)
        finally:
            self.inflight.leave(size, connection)

    async def _relay_observed(self, method: str, body: bytes, metadata: Headers,
                              own_name: Callable[[], str], timeout: float | None,
                              resolved: tuple[str, str] | None = None) -> bytes:
        """``relay`` with the access log line, the router's span and/or the payload records."""
        started = time.perf_counter()
        ctx = bind_request("", metadata)  # the client's ids, if it fails early
        code, message, response, span = "OK", "", b"", None
        requested = model_id = ""
        try:
            requested, model_id = resolved or self.named(metadata, own_name, count=method == INFER)
            onward = self._passthrough(metadata)
            ctx.model_id, ctx.metadata = model_id, onward
            if self.access_log and header(onward, REQUEST_ID) is None:
                # Made here rather than on first use so that the runtime logs the same id.
                ctx.request_id = request_id = new_request_id()
                onward += ((REQUEST_ID, request_id),)
            if self.tracer is not None:
                span = self.tracer.start(method, onward, model_id)
                ctx.trace_id = self.tracer.trace_id(span)
                onward = self.tracer.onward(onward, span)
            graph = self.graph_named(metadata, own_name) if self.view.graphs else None
            if graph is not None:
                response = await self.run_graph(method, graph, body, onward, timeout)
            else:
                response = await self.forward(method, model_id, body, onward, timeout)
            return response
        except MeshError as exc:
            code, message = exc.code.name, exc.message
            raise
        except asyncio.CancelledError:
            code, message = "CANCELLED", "cancelled by the client"
            raise
        except Exception:
            code, message = "INTERNAL", "internal error"
            raise
        finally:
            if span is not None and self.tracer is not None:
                self.tracer.end(span, code, message, ctx.instance_id)
            if self.access_log:
                access.info("request", method=method.rpartition("/")[2], code=code,
                            duration_ms=round((time.perf_counter() - started) * 1000, 3),
                            bytes_in=len(body), bytes_out=len(response))
            if self.payloads is not None and model_id and method == INFER:
                self.payloads.log(metadata, model_id, requested if requested != model_id else "", body,
                                  response if code == "OK" else None)

    async def forward(self, method: str, model_id: str, body: bytes, metadata: Headers,
                      timeout: float | None) -> bytes:
        """Send ``body`` to a copy of ``model_id``, retrying elsewhere on "gone" or "not here"."""
        scaler = self.scaler
        # Rates are kept only for models with a copy in the view: copy scaling has nothing to do
        # for the others, and a client naming endless unknown IDs must not grow this state.
        if scaler is None or method != INFER or model_id not in self.view.placements:
            return await self._forward(method, model_id, body, metadata, timeout)
        scaler.begin(model_id)
        try:
            return await self._forward(method, model_id, body, metadata, timeout)
        finally:
            scaler.end(model_id)

    async def _forward(self, method: str, model_id: str, body: bytes, metadata: Headers,
                       timeout: float | None) -> bytes:
        # Fast path: a loaded copy in the view, and it answers.
        target = pick_copy(self.view, model_id, (), self._rng)
        if target is not None and not target.allow_load:
            try:
                return await self._attempt(target, method, model_id, body, metadata, timeout)
            except RetryElsewhere as exc:
                return await self._forward_slow(method, model_id, body, metadata, timeout, target, exc)
        return await self._forward_slow(method, model_id, body, metadata, timeout, None, None)

    async def _attempt(self, target: Target, method: str, model_id: str, body: bytes, metadata: Headers,
                       timeout: float | None, spec: ModelSpec | None = None) -> bytes:
        """One try on one instance. Raises ``RetryElsewhere`` or ``RemoteError``."""
        view = self.view
        view.begin_request(target.instance_id)
        ctx = current_request()
        if ctx is not None:
            ctx.instance_id = target.instance_id  # for log lines about this attempt
        try:
            return await self.link.call(target.instance_id, target.endpoint, target.allow_load, method,
                                        model_id, body, metadata, timeout, spec)
        finally:
            view.end_request(target.instance_id)

    async def _forward_slow(self, method: str, model_id: str, body: bytes, metadata: Headers,
                            timeout: float | None, failed: Target | None, retry: RetryElsewhere | None) -> bytes:
        deadline = None if timeout is None else time.monotonic() + timeout
        gone: set[str] = set()
        stale: set[str] = set()
        load_failed: set[str] = set()
        last: RemoteError | None = None
        attempts = self.max_attempts
        if failed is not None and retry is not None:
            self._exclude(model_id, failed, retry.gone, gone, stale)
            last = retry.error
            attempts -= 1
        for _ in range(attempts):
            try:
                target, spec = await self.choose(model_id, gone, stale)
            except MeshError:
                if last is not None:
                    raise last from None
                raise
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            try:
                return await self._attempt(target, method, model_id, body, metadata, remaining, spec)
            except RetryElsewhere as exc:
                if exc.gone and target.allow_load and self.witness is not None:
                    # Did it die loading this model? Then no other runtime is tried with it.
                    crash = await self.witness.lost(model_id, target.instance_id, target.endpoint)
                    if crash is not None:
                        raise RemoteError(Code.FAILED_PRECONDITION,
                                          f"model {model_id!r} is quarantined: {crash.reason}") from None
                last = exc.error
                self._exclude(model_id, target, exc.gone, gone, stale)
            except RemoteError as exc:
                if not self._try_load_elsewhere(model_id, target, exc, load_failed):
                    raise
                last = exc
                gone.add(target.instance_id)  # not gone, but no place for this model now
        if last is not None:
            raise last
        raise Unavailable(f"model {model_id!r}: no instance answered within the deadline")

    async def choose(self, model_id: str, gone: set[str], stale: set[str]) -> tuple[Target, ModelSpec | None]:
        """A copy not known to be stale on an instance not known to be gone, else the home among
        the instances not gone (a stale copy's instance may well load the model again)."""
        skip = gone | stale if stale else gone
        target = pick_copy(self.view, model_id, skip, self._rng)
        if target is not None and not target.allow_load:
            return target, None
        spec = await self.specs.get(model_id)
        if spec is None:
            raise ModelNotFound(model_id)
        # Copies may have appeared while the registration was read.
        return pick_copy(self.view, model_id, skip, self._rng) or pick_home(
            self.view, spec, gone, load_factor=self.load_factor), spec

    def _try_load_elsewhere(self, model_id: str, target: Target, err: RemoteError, failed: set[str]) -> bool:
        """Whether a failed load is tried on the next instance within the same request: the answer
        was a failed load (a runtime's only FAILED_PRECONDITION is ModelLoadError) and fewer than
        ``MAX_LOAD_FAILURES`` instances have failed it, this request's and the view's failure
        records together. So a bad model costs a client one quick error, after at most that many
        loads, and the runtimes' own memory of failures (``mesh.runtime.failures``) keeps
        concurrent requests from loading it again before the records reach this router."""
        if not target.allow_load or err.code is not Code.FAILED_PRECONDITION:
            return False
        failed.add(target.instance_id)
        return len(failed | self.view.failures.get(model_id, {}).keys()) < MAX_LOAD_FAILURES

    def _exclude(self, model_id: str, target: Target, gone_: bool, gone: set[str], stale: set[str]) -> None:
        if gone_:
            gone.add(target.instance_id)
            if self.on_gone is not None:
                self.on_gone(target.instance_id)
        else:
            stale.add(target.instance_id)
            # Do not send the next requests to the same stale copy while the registry's deletion
            # of it is on its way to this router.
            self.view.forget_copy(model_id, target.instance_id)

    # --- answered by the router itself --------------------------------------------------------
    async def model_ready(self, metadata: Headers, own_name: Callable[[], str]) -> bool:
        """Whether the model has a loaded copy on a live instance; ModelNotFound if unregistered.
        A graph: whether every model it names (vModels resolved) has one."""
        graph = self.graph_named(metadata, own_name)
        if graph is not None:
            return all(self._loaded(self.resolve(m, False, False, count=False)) for m in graph_models(graph))
        model_id, _ = self.select(metadata, own_name, count=False)
        if await self.specs.get(model_id) is None:
            raise ModelNotFound(model_id)
        return self._loaded(model_id)

    def _loaded(self, model_id: str) -> bool:
        return any(p.state == LOADED and self.view.live_instance(i) is not None
                   for i, p in self.view.copies(model_id).items())

    @staticmethod
    def server_metadata() -> tuple[str, str, tuple[str, ...]]:
        """(name, version, extensions) of the V2 server."""
        return SERVER_NAME, __version__, ()
