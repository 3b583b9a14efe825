"""The router's V2 data plane: forwards ModelInfer as bytes, answers the rest itself.

``ModelInfer`` is registered through a generic handler with no (de)serializers: the request
arrives as the client's bytes and leaves as the same bytes, and the response comes back the same
way. The router reads the model ID from ``mm-model-id`` / ``mm-vmodel-id`` (or ``-bin``), else from
field 1 of the request (``read_model_name``, which touches nothing else); without a header, a
``model_name`` that names a vModel is resolved as one (as modelmesh-serving's clients expect: they
address a Predictor by name).

Per attempt: choose a target (``routing``), forward with the concrete ID in ``mm-model-id`` and,
when the copy is believed loaded, ``mesh-load: deny``. A "not here" answer or a broken connection
excludes that instance and the next attempt chooses again; so does a failed load, until the
model has failed on ``MAX_LOAD_FAILURES`` instances (``_try_load_elsewhere``); any other answer
(success or the runtime's own error) goes back to the client as it is. A runtime that dies while
loading the model is the exception: the crash witness quarantines the model (FAILED_PRECONDITION,
no other runtime tried: ``mesh.registry.crashes``).

The hot path avoids work per request: one cached multicallable per endpoint, metadata built from
a short tuple, no logging on success. The client's metadata, ``traceparent``, ``tracestate`` and
``x-request-id`` included, goes on to the runtime as it is; the request's log context is one object
in a context variable (``mesh.logging``). The access log and spans (``log.access_log``,
``log.tracing``) take a second relay function, chosen once at start, so that with both off the
hot path does not even test for them.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

import grpc
import structlog

from mesh import __version__
from mesh.errors import MeshError, ModelNotFound, ResourceExhausted, Unavailable
from mesh.gen.inference import grpc_service_pb2 as pb
from mesh.ids import check_model_id
from mesh.logging import REQUEST_ID, bind_request, current_request, header, new_request_id
from mesh.observability.metrics import RouterMetrics
from mesh.registry.crashes import CrashWitness
from mesh.registry.records import ModelSpec
from mesh.registry.specs import SpecCache
from mesh.router.replicas import CopyScaler
from mesh.router.routing import MAX_LOAD_FAILURES, Target, pick_copy, pick_home
from mesh.router.view import ClusterView
from mesh.tracing import Tracer
from mesh.transport.handlers import generic_handler
from mesh.transport.inflight import InflightLimit
from mesh.transport.metadata import LOAD_MODE, MODEL_ID, VMODEL_ID, model_selection
from mesh.transport.multiplex import MAX_FRAME_BODY, MultiplexPool, StreamError, StreamGone
from mesh.transport.server import ChannelPool
from mesh.transport.status import NOT_HERE_KEY, ORIGIN_KEY, lost_peer, status_of
from mesh.transport.wire import read_model_name

log = structlog.get_logger(__name__)
access = structlog.get_logger("mesh.access")

SERVICE = "inference.GRPCInferenceService"
# Headers not passed on: the model selection (replaced by the concrete ID), the load mode (ours to
# set), the transport's own headers, which grpc sets anew on the outgoing call, and the client's
# bearer token (checked here; a runtime has no use for it, and it must not reach a runtime's logs).
_STRIP = frozenset({MODEL_ID, MODEL_ID + "-bin", VMODEL_ID, VMODEL_ID + "-bin", LOAD_MODE, "user-agent",
                    "grpc-accept-encoding", "grpc-encoding", "grpc-timeout", "grpc-trace-bin",
                    "grpc-tags-bin",
                    # Credentials of the client, which runtimes never need (and must not see).
                    "authorization", "proxy-authorization", "cookie", "x-api-key", "x-auth-token"})
_DENY = ((LOAD_MODE, "deny"),)


NOT_HERE, GONE, FINAL = "not-here", "gone", "final"
INFER = f"/{SERVICE}/ModelInfer"


class RemoteError(Exception):
    """A status to return to the client as it is (the runtime's own answer, or the last failure)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Retry(Exception):
    """This instance cannot serve the request (gone, or its copy is not there): try another."""

    def __init__(self, kind: str, error: RemoteError) -> None:
        super().__init__(kind)
        self.kind = kind
        self.error = error


def _classify(err: grpc.aio.AioRpcError) -> str:
    """NOT_HERE: the runtime answered that the copy is not there (evicted meanwhile); GONE: no
    answer from the runtime at all (connection refused or reset); FINAL: the runtime's own answer,
    passed back to the client."""
    if any(key == NOT_HERE_KEY for key, _ in err.trailing_metadata() or ()):
        return NOT_HERE
    return GONE if lost_peer(err) else FINAL


class Forwarder:
    def __init__(self, *, view: ClusterView, specs: SpecCache, channels: ChannelPool,
                 max_attempts: int, load_factor: float,
                 ready: Callable[[], bool], streams_per_runtime: int = 2,
                 scaler: CopyScaler | None = None, access_log: bool = False,
                 tracer: Tracer | None = None, metrics: RouterMetrics | None = None,
                 inflight: InflightLimit | None = None) -> None:
        self.view = view
        self.metrics = metrics or RouterMetrics()
        self.specs = specs
        self.channels = channels
        self.max_attempts = max_attempts
        self.load_factor = load_factor
        self.ready = ready
        self._calls: dict[str, grpc.aio.UnaryUnaryMultiCallable] = {}
        self.multiplex = (MultiplexPool(streams_per_runtime, channels.max_message_bytes)
                          if streams_per_runtime > 0 else None)
        self.scaler = scaler
        self._rng = random.Random()
        self.access_log = access_log
        self.tracer = tracer
        if access_log or tracer is not None:
            self._relay = self._relay_observed  # type: ignore[method-assign]
        # Told of each instance found gone, so that later requests route around it too.
        self.on_gone: Callable[[str], None] | None = None
        self.on_missed_deadline: Callable[[str], None] | None = None
        # Told when a runtime dies under a request that made it load (mesh.registry.crashes).
        self.witness: CrashWitness | None = None
        self.inflight = inflight or InflightLimit(max_bytes=1 << 30, max_requests=20_000)

    # --- target selection ---------------------------------------------------------------------
    def _resolve(self, requested: str, is_vmodel: bool, from_header: bool) -> str:
        if is_vmodel:
            active = self.view.resolve_vmodel(requested)
            if active is None:
                raise ModelNotFound(requested, what="vModel")
            return active
        if not from_header:
            active = self.view.resolve_vmodel(requested)
            if active is not None:
                return active
        return requested

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

    def _call(self, endpoint: str, method: str) -> grpc.aio.UnaryUnaryMultiCallable:
        key = endpoint + method
        call = self._calls.get(key)
        if call is None:
            call = self.channels.get(endpoint).unary_unary(method)
            self._calls[key] = call
        return call

    def forget(self, endpoint: str) -> None:
        for key in [k for k in self._calls if k.startswith(endpoint + "/")]:
            del self._calls[key]
        if self.multiplex is not None:
            self.multiplex.discard(endpoint)

    async def _attempt(self, target: Target, method: str, model_id: str, body: bytes,
                       metadata: tuple[tuple[str, str | bytes], ...], timeout: float | None,
                       spec: ModelSpec | None = None) -> bytes:
        """One try on one instance. Raises ``Retry`` (gone / not here) or ``RemoteError``."""
        inflight = self.view.inflight
        inflight[target.instance_id] += 1
        ctx = current_request()
        if ctx is not None:
            ctx.instance_id = target.instance_id  # for log lines about this attempt
        try:
            if self.multiplex is not None and method == INFER and len(body) <= MAX_FRAME_BODY:
                # A request that may load carries the registration, saving the runtime a read.
                spec_json = spec.to_json() if spec is not None and target.allow_load else b""
                return await self.multiplex.call(target.endpoint, self.channels.get(target.endpoint),
                                                 model_id, target.allow_load, metadata, body, timeout,
                                                 spec_json)
            outgoing = ((MODEL_ID, model_id), *metadata)
            if not target.allow_load:
                outgoing += _DENY
            return await self._call(target.endpoint, method)(body, metadata=outgoing, timeout=timeout)
        except StreamError as err:
            if err.not_here:
                raise Retry(NOT_HERE, RemoteError(err.code, err.message)) from None
            raise RemoteError(err.code, err.message) from None
        except StreamGone as err:
            raise Retry(GONE, RemoteError(grpc.StatusCode.UNAVAILABLE,
                                          f"runtime {target.instance_id}: {err}")) from None
        except TimeoutError:
            # No answer at all before the client's deadline (a runtime's own DEADLINE_EXCEEDED
            # arrives as a StreamError): is the runtime still there?
            if self.on_missed_deadline is not None:
                self.on_missed_deadline(target.instance_id)
            raise RemoteError(grpc.StatusCode.DEADLINE_EXCEEDED,
                              f"model {model_id!r}: deadline exceeded") from None
        except grpc.aio.AioRpcError as err:
            kind = _classify(err)
            remote = RemoteError(err.code(), err.details() or "")
            if kind == FINAL:
                if (err.code() is grpc.StatusCode.DEADLINE_EXCEEDED and self.on_missed_deadline is not None
                        and not any(key == ORIGIN_KEY for key, _ in err.trailing_metadata() or ())):
                    self.on_missed_deadline(target.instance_id)  # the unary path's missed deadline
                raise remote from None
            raise Retry(kind, remote) from None
        finally:
            inflight[target.instance_id] -= 1

    async def forward(self, method: str, model_id: str, body: bytes,
                      metadata: tuple[tuple[str, str | bytes], ...],
                      timeout: float | None) -> bytes:
        """Send ``body`` to a copy of ``model_id``, retrying elsewhere on "gone" or "not here".

        Raises ``RemoteError`` (the runtime's answer, or the last failure once retries run out)
        or MeshError (nowhere to send it). ``timeout`` None: the client set no deadline, so none
        is imposed downstream either."""
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

    async def _forward(self, method: str, model_id: str, body: bytes,
                       metadata: tuple[tuple[str, str | bytes], ...], timeout: float | None) -> bytes:
        # Fast path: a loaded copy in the view, and it answers.
        target = pick_copy(self.view, model_id, (), self._rng)
        failed: Target | None = None
        retry: Retry | None = None
        if target is not None and not target.allow_load:
            try:
                return await self._attempt(target, method, model_id, body, metadata, timeout)
            except Retry as exc:
                failed, retry = target, exc
        return await self._forward_slow(method, model_id, body, metadata, timeout, failed, retry)

    async def _forward_slow(self, method: str, model_id: str, body: bytes,
                            metadata: tuple[tuple[str, str | bytes], ...], timeout: float | None,
                            failed: Target | None, retry: Retry | None) -> bytes:
        deadline = None if timeout is None else time.monotonic() + timeout
        gone: set[str] = set()
        stale: set[str] = set()
        load_failed: set[str] = set()
        attempts = self.max_attempts
        if failed is not None and retry is not None:
            self._exclude(model_id, failed, retry.kind, gone, stale)
            attempts -= 1
        for _ in range(attempts):
            try:
                target, spec = await self.choose(model_id, gone, stale)
            except MeshError:
                if retry is not None:
                    raise retry.error from None
                raise
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            try:
                return await self._attempt(target, method, model_id, body, metadata, remaining, spec)
            except Retry as exc:
                if exc.kind == GONE and target.allow_load and self.witness is not None:
                    # Did it die loading this model? Then no other runtime is tried with it.
                    crash = await self.witness.lost(model_id, target.instance_id, target.endpoint)
                    if crash is not None:
                        raise RemoteError(grpc.StatusCode.FAILED_PRECONDITION,
                                          f"model {model_id!r} is quarantined: {crash.reason}") from None
                retry = exc
                self._exclude(model_id, target, exc.kind, gone, stale)
            except RemoteError as exc:
                if not self._try_load_elsewhere(model_id, target, exc, load_failed):
                    raise
                retry = Retry(FINAL, exc)
                gone.add(target.instance_id)  # not gone, but no place for this model now
        if retry is not None:
            raise retry.error
        raise Unavailable(f"model {model_id!r}: no instance answered within the deadline")

    def _try_load_elsewhere(self, model_id: str, target: Target, err: RemoteError, failed: set[str]) -> bool:
        """Whether a failed load is tried on the next instance within the same request: the answer
        was a failed load (a runtime's only FAILED_PRECONDITION is ModelLoadError) and fewer than
        ``MAX_LOAD_FAILURES`` instances have failed it, this request's and the view's failure
        records together. So a bad model costs a client one quick error, after at most that many
        loads, and the runtimes' own memory of failures (``mesh.runtime.failures``) keeps
        concurrent requests from loading it again before the records reach this router."""
        if not target.allow_load or err.code is not grpc.StatusCode.FAILED_PRECONDITION:
            return False
        failed.add(target.instance_id)
        return len(failed | self.view.failures.get(model_id, {}).keys()) < MAX_LOAD_FAILURES

    def _exclude(self, model_id: str, target: Target, kind: str, gone: set[str], stale: set[str]) -> None:
        if kind == GONE:
            gone.add(target.instance_id)
            if self.on_gone is not None:
                self.on_gone(target.instance_id)
        else:
            stale.add(target.instance_id)
            # Do not send the next requests to the same stale copy while the registry's deletion
            # of it is on its way to this router.
            self.view.forget_copy(model_id, target.instance_id)

    # --- handlers -----------------------------------------------------------------------------
    def _selection(self, context: grpc.aio.ServicerContext, body_name: Callable[[], str]
                   ) -> tuple[str, tuple[tuple[str, str | bytes], ...]]:
        md = context.invocation_metadata() or ()
        requested, is_vmodel, _ = model_selection(md)
        from_header = requested is not None
        if requested is None:
            requested = body_name()
        model_id = self._resolve(check_model_id(requested), is_vmodel, from_header)
        passthrough = tuple((k, v) for k, v in md if k not in _STRIP)
        return model_id, passthrough

    @staticmethod
    def _timeout(context: grpc.aio.ServicerContext) -> float | None:
        return context.time_remaining()

    async def _relay(self, method: str, body: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """Forward a byte body (ModelInfer, ModelMetadata: both name the model in field 1) and map
        every failure to a status for the client."""
        try:
            model_id, metadata = self._selection(context, lambda: read_model_name(body))
            bind_request(model_id, metadata)
            return await self.forward(method, model_id, body, metadata, self._timeout(context))
        except RemoteError as err:
            await context.abort(err.code, err.message)
        except Exception as exc:
            code, message = status_of(exc)
            await context.abort(code, message)
        raise AssertionError("unreachable: abort raises")

    async def _relay_observed(self, method: str, body: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """``_relay`` with the access log line and/or the router's span around it."""
        started = time.perf_counter()
        ctx = bind_request("", context.invocation_metadata() or ())  # the client's ids, if it fails early
        code, message, response, span = grpc.StatusCode.OK, "", b"", None
        try:
            try:
                model_id, metadata = self._selection(context, lambda: read_model_name(body))
                ctx.model_id, ctx.metadata = model_id, metadata
                if self.access_log and header(metadata, REQUEST_ID) is None:
                    # Made here rather than on first use so that the runtime logs the same id.
                    ctx.request_id = request_id = new_request_id()
                    metadata += ((REQUEST_ID, request_id),)
                if self.tracer is not None:
                    span = self.tracer.start(method, metadata, model_id)
                    ctx.trace_id = self.tracer.trace_id(span)
                    metadata = self.tracer.onward(metadata, span)
                response = await self.forward(method, model_id, body, metadata, self._timeout(context))
                return response
            except RemoteError as err:
                code, message = err.code, err.message
            except asyncio.CancelledError:
                code, message = grpc.StatusCode.CANCELLED, "cancelled by the client"
                raise
            except Exception as exc:
                code, message = status_of(exc)
            await context.abort(code, message)
            raise AssertionError("unreachable: abort raises")
        finally:
            if span is not None and self.tracer is not None:
                self.tracer.end(span, code.value[0], code.name, message, ctx.instance_id)
            if self.access_log:
                access.info("request", method=method.rpartition("/")[2], code=code.name,
                            duration_ms=round((time.perf_counter() - started) * 1000, 3),
                            bytes_in=len(body), bytes_out=len(response))

    async def model_infer(self, body: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return await self._bounded(INFER, body, context)

    async def model_metadata_raw(self, body: bytes, context: grpc.aio.ServicerContext) -> bytes:
        # Counted like an inference: its body may be as large, and it may wait for a load.
        return await self._bounded(f"/{SERVICE}/ModelMetadata", body, context)

    async def _bounded(self, method: str, body: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """``_relay`` within the in-flight bounds (mesh.transport.inflight)."""
        size = len(body)
        try:
            connection = self.inflight.enter(size, context.peer())
            refused = ""
        except ResourceExhausted as exc:
            refused = exc.message
        if refused:  # aborted outside the except block: no cycle keeps the body (mesh.malloc.trim)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refused)
        try:
            return await self._relay(method, body, context)
        finally:
            self.inflight.leave(size, connection)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        try:
            model_id, _ = self._selection(context, lambda: request.name)
            if await self.specs.get(model_id) is None:
                raise ModelNotFound(model_id)
            ready = any(p.state == "loaded" and self.view.live_instance(i) is not None
                        for i, p in self.view.copies(model_id).items())
            return pb.ModelReadyResponse(ready=ready)
        except Exception as exc:
            code, message = status_of(exc)
            await context.abort(code, message)
        raise AssertionError("unreachable: abort raises")

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
                          ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
                           ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.ready())

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
                              ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="mesh-serving", version=__version__, extensions=[])

    def _model_labels(self, body: bytes, context: grpc.aio.ServicerContext) -> tuple[str, str]:
        """(model ID, vModel ID) of a relayed request, for per-model metrics only (it resolves the
        selection a second time)."""
        requested = ""
        try:
            selected, is_vmodel, _ = model_selection(context.invocation_metadata() or ())
            requested = selected if selected is not None else read_model_name(body)
            model_id = self._resolve(requested, is_vmodel, selected is not None)
        except Exception:
            return requested, ""
        return model_id, (requested if requested != model_id else "")

    def handler(self) -> grpc.GenericRpcHandler:
        # Every method records modelmesh_api_request_milliseconds (and ModelInfer its sizes).
        timed = self.metrics.timed
        return generic_handler(pb.DESCRIPTOR.services_by_name["GRPCInferenceService"],
                               self.metrics.metered(self), raw={
            # bytes in, bytes out: no protobuf work on the router for inference
            "ModelInfer": grpc.unary_unary_rpc_method_handler(
                timed("ModelInfer", self.model_infer, self._model_labels)),
            "ModelMetadata": grpc.unary_unary_rpc_method_handler(
                timed("ModelMetadata", self.model_metadata_raw, self._model_labels)),
        })

