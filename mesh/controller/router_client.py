"""The controller's client of the router's management API (``mmesh.ModelMesh``): the gRPC edge.

Three calls, as modelmesh-serving's controller makes them: ``setVModel`` (with the model's info,
``autoDeleteTargetModel`` and ``loadNow``), ``getVModelStatus`` and ``deleteVModel``, each with the
controller's owner string (``set_vmodel`` goes through the bulk ``registerModels`` when the router
has it: :class:`Coalescer`); for InferenceService canaries, ``setVModelSplit`` (registering the new
model in the same call: ``SplitTarget.modelInfo``) and ``ensureLoaded``;
and three of ``mmesh.ModelMeshGraphs`` for InferenceGraph objects: ``set_graph`` (the object's
``spec``), ``graph_status`` and ``delete_graph``. Answers become the transport-neutral states of
:mod:`mesh.controller.predictor` (graphs: ``GraphState`` here); errors become :class:`RouterError`
carrying the router's own code and message (its answers are marked with the ``mesh-origin``
trailer), or :class:`RouterUnreachable` when no router answered at all (retried by the reconciler,
never fatal: the controller may start before the routers do).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from mesh.controller.predictor import CopyInfo, ModelState, Registration, SplitState, VModelState
from mesh.errors import Code, InvalidArgument, MeshError, Unavailable
from mesh.gen.mmesh import graphs_pb2 as gp
from mesh.gen.mmesh import graphs_pb2_grpc as gp_grpc
from mesh.gen.mmesh import model_mesh_pb2 as mm
from mesh.gen.mmesh import model_mesh_pb2_grpc as mm_grpc
from mesh.settings import ControllerSettings
from mesh.transport.status import MESH_CODES, ORIGIN_KEY
from mesh.transport.tls import ChannelSecurity, channel_security

_MODEL = mm.ModelStatusInfo.ModelStatus
_VMODEL = mm.VModelStatusInfo.VModelStatus


class RouterError(MeshError):
    """The router refused a call; ``code`` is its status."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code


class RouterUnreachable(Unavailable):
    """No router answered (not started yet, restarting, or a network problem)."""


def _model_state(msg: mm.ModelStatusInfo) -> ModelState:
    return ModelState(status=_MODEL.Name(msg.status), errors=tuple(msg.errors),
                      copies=tuple(CopyInfo(c.location, _MODEL.Name(c.copyStatus), c.time)
                                   for c in msg.modelCopyInfos))


def vmodel_state(msg: mm.VModelStatusInfo) -> VModelState:
    return VModelState(
        status=_VMODEL.Name(msg.status), active_model_id=msg.activeModelId, target_model_id=msg.targetModelId,
        active=_model_state(msg.activeModelStatus) if msg.HasField("activeModelStatus") else None,
        target=_model_state(msg.targetModelStatus) if msg.HasField("targetModelStatus") else None,
        owner=msg.owner, split=tuple(SplitState(t.modelId, t.weight, _model_state(t.modelStatus), t.receivingTraffic)
                                     for t in msg.splitTargets))


@dataclass(frozen=True)
class GraphModelState:
    model_id: str  # the serviceName as the graph names it
    status: str  # ModelStatusInfo.ModelStatus name (of the vModel's active model for a vModel)
    is_vmodel: bool = False
    active_model_id: str = ""


@dataclass(frozen=True)
class GraphState:
    """A graph as the router reports it: ``status`` NOT_FOUND, DEFINED (defined; not every model
    has a loaded copy) or READY (every model it names has one)."""

    status: str
    models: tuple[GraphModelState, ...] = ()
    spec_json: str = ""
    owner: str = ""
    updated_ms: int = 0


def graph_state(msg: gp.GraphStatusInfo) -> GraphState:
    return GraphState(status=gp.GraphStatusInfo.GraphStatus.Name(msg.status), spec_json=msg.specJson,
                      owner=msg.owner, updated_ms=msg.updatedMs,
                      models=tuple(GraphModelState(m.modelId, _MODEL.Name(m.status), m.isVModel, m.activeModelId)
                                   for m in msg.models))


def _model_info(reg: Registration) -> mm.ModelInfo:
    return mm.ModelInfo(type=reg.type, path=reg.path, key=reg.key, labels=list(reg.labels), gpu=reg.gpu)


LINGER_S = 0.005  # how long a registration waits for others to share its registerModels call
MAX_BATCH = 1_000  # the router's bound on one call (mesh.router.bulk.MAX_ITEMS)


@dataclass
class _Pending:
    item: mm.RegisterModelsItem
    done: asyncio.Future[mm.RegisterModelsResult] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())


class Coalescer:
    """The ``setVModel`` calls (with a model info) that the reconcile workers make within
    ``LINGER_S`` of each other go to the router as one ``registerModels`` call of vModel items (up
    to ``MAX_BATCH``): when many objects arrive at once (a re-apply, a controller restart) the
    router serves a few calls instead of one per object, and its registry writes are grouped.
    Each caller gets its own item's result, so each object's status is written from its own
    answer, as before. A router without the RPC (UNIMPLEMENTED) is sent one setVModel per object
    from then on."""

    def __init__(self, send: Any, linger_s: float = LINGER_S, max_batch: int = MAX_BATCH) -> None:
        self._send = send  # async (RegisterModelsRequest) -> RegisterModelsResponse
        self.linger_s = linger_s
        self.max_batch = max_batch
        self._pending: list[_Pending] = []
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, item: mm.RegisterModelsItem) -> mm.RegisterModelsResult:
        pending = _Pending(item)
        self._pending.append(pending)
        if len(self._pending) >= self.max_batch:
            self._flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.linger_s, self._flush)
        return await pending.done

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending = self._pending, []
        if not batch:
            return
        # An ID named twice in one call is refused by the router: a second registration of the same
        # vModel or model waits for the next call.
        seen: set[str] = set()
        now: list[_Pending] = []
        for p in batch:
            ids = {p.item.modelId, "v:" + p.item.vModelId}
            if ids & seen:
                self._pending.append(p)
            else:
                seen |= ids
                now.append(p)
        if self._pending:
            self._timer = asyncio.get_running_loop().call_later(self.linger_s, self._flush)
        task = asyncio.get_running_loop().create_task(self._call(now), name="controller-register-models")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _call(self, batch: list[_Pending]) -> None:
        try:
            response = await self._send(mm.RegisterModelsRequest(items=[p.item for p in batch]))
        except BaseException as exc:  # each caller gets the call's error (RouterError, RouterUnreachable...)
            for p in batch:
                if not p.done.done():
                    p.done.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        for p, result in zip(batch, response.results, strict=False):
            if not p.done.done():
                p.done.set_result(result)
        for p in batch[len(response.results):]:  # a router that answered fewer results than items
            if not p.done.done():
                p.done.set_exception(RouterError(Code.INTERNAL, "registerModels answered no result for the item"))

    async def close(self) -> None:
        self._flush()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


class RouterClient:
    """``security``: TLS to the router (default plaintext); ``token``: the bearer token sent on every
    call to a router with ``auth.tokens_file`` set (never logged, not even in errors)."""

    def __init__(self, endpoint: str, timeout_s: float = 10.0, *,
                 security: ChannelSecurity | None = None, token: str = "") -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        security = security or ChannelSecurity()
        if security.credentials is None:
            self._channel = grpc.aio.insecure_channel(endpoint)
        else:
            options = ([("grpc.ssl_target_name_override", security.server_name)]
                       if security.server_name else [])
            self._channel = grpc.aio.secure_channel(endpoint, security.credentials, options=options)
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        # protoc's gRPC stubs are unannotated (mesh/gen is generated): the call is untyped.
        self._stub = mm_grpc.ModelMeshStub(self._channel)  # type: ignore[no-untyped-call]
        self._graphs = gp_grpc.ModelMeshGraphsStub(self._channel)  # type: ignore[no-untyped-call]
        self._bulk: Coalescer | None = Coalescer(lambda request: self._call(self._stub.registerModels, request))

    @classmethod
    def from_settings(cls, cs: ControllerSettings) -> RouterClient:
        """The client ``controller.router_*`` describe; InvalidArgument (a one-line start-up error)
        for a bad certificate or an unreadable token file."""
        security = channel_security("controller.router_", cs.router_ca_file, cs.router_cert_file,
                                    cs.router_key_file, cs.router_server_name)
        token = ""
        if cs.router_token_file:
            try:
                token = Path(cs.router_token_file).read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as err:
                raise InvalidArgument(f"setting controller.router_token_file: cannot read "
                                      f"{cs.router_token_file}: {type(err).__name__}") from None
            if not token:
                raise InvalidArgument(f"setting controller.router_token_file: {cs.router_token_file} is empty")
        return cls(cs.router_endpoint, security=security, token=token)

    async def _call(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, timeout=self.timeout_s, metadata=self._metadata)
        except grpc.aio.AioRpcError as err:
            details = err.details() or err.code().name
            # grpc.aio.Metadata iterates as (key, value) pairs
            if not any(key == ORIGIN_KEY for key, _ in (err.trailing_metadata() or ())):
                raise RouterUnreachable(f"router {self.endpoint}: {err.code().name}: {details}") from None
            raise RouterError(MESH_CODES.get(err.code(), Code.INTERNAL), details) from None

    async def set_vmodel(self, reg: Registration, *, owner: str, load_now: bool) -> VModelState:
        if self._bulk is not None:
            item = mm.RegisterModelsItem(modelId=reg.model_id, modelInfo=_model_info(reg), loadNow=load_now,
                                         vModelId=reg.vmodel_id, owner=owner, autoDeleteTargetModel=True)
            try:
                result = await self._bulk.submit(item)
            except RouterUnreachable as exc:
                if "UNIMPLEMENTED" not in str(exc):
                    raise
                self._bulk = None  # a router without registerModels: one setVModel per object
            else:
                if result.code != "OK":
                    code = Code.__members__.get(result.code, Code.INTERNAL)
                    raise RouterError(code, result.message)
                return vmodel_state(result.vModelStatus)
        request = mm.SetVModelRequest(
            vModelId=reg.vmodel_id, targetModelId=reg.model_id, owner=owner, autoDeleteTargetModel=True,
            loadNow=load_now, modelInfo=_model_info(reg))
        return vmodel_state(await self._call(self._stub.setVModel, request))

    async def vmodel_status(self, vmodel_id: str, *, owner: str) -> VModelState:
        request = mm.GetVModelStatusRequest(vModelId=vmodel_id, owner=owner)
        return vmodel_state(await self._call(self._stub.getVModelStatus, request))

    # --- canaries (InferenceService canaryTrafficPercent) ---
    async def set_vmodel_split(self, vmodel_id: str, targets: list[tuple[str, int]], *, owner: str,
                               stable: str, register: Registration | None = None) -> VModelState:
        """``register``: the target to register in the same call if it is not (a canary: the
        vModel's own, auto-deleted with it), never through a setVModel first."""
        request = mm.SetVModelSplitRequest(vModelId=vmodel_id, owner=owner, stableModelId=stable,
                                           targets=[mm.SplitTarget(modelId=m, weight=w) for m, w in targets])
        for target in request.targets:
            if register is not None and target.modelId == register.model_id:
                target.modelInfo.CopyFrom(_model_info(register))
        return vmodel_state(await self._call(self._stub.setVModelSplit, request))

    async def ensure_loaded(self, model_id: str) -> None:
        """Load now and wait (the stable model of a canary is about to take most of the traffic)."""
        await self._call(self._stub.ensureLoaded, mm.EnsureLoadedRequest(modelId=model_id, sync=True))
    # --- end canaries ---

    async def delete_vmodel(self, vmodel_id: str, *, owner: str) -> None:
        await self._call(self._stub.deleteVModel, mm.DeleteVModelRequest(vModelId=vmodel_id, owner=owner))

    # --- inference graphs (mmesh.ModelMeshGraphs) ----------------------------------------------
    async def set_graph(self, graph_id: str, spec: Any, *, owner: str = "") -> GraphState:
        """Define or replace graph ``graph_id``; ``spec`` is the InferenceGraph's ``spec`` (a JSON
        object). The router's refusal (INVALID_ARGUMENT naming node and step, NOT_FOUND for a
        model that is not registered yet) comes back as ``RouterError`` with that code."""
        request = gp.SetGraphRequest(graphId=graph_id, owner=owner,
                                     specJson=json.dumps(spec, separators=(",", ":"), sort_keys=True))
        return graph_state(await self._call(self._graphs.setGraph, request))

    async def graph_status(self, graph_id: str) -> GraphState:
        return graph_state(await self._call(self._graphs.getGraphStatus, gp.GetGraphStatusRequest(graphId=graph_id)))

    async def delete_graph(self, graph_id: str, *, owner: str = "") -> None:
        """Idempotent: deleting an undefined graph succeeds."""
        await self._call(self._graphs.deleteGraph, gp.DeleteGraphRequest(graphId=graph_id, owner=owner))

    async def close(self) -> None:
        if self._bulk is not None:
            await self._bulk.close()
        await self._channel.close()
