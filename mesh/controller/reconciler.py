"""Reconciles Predictors with the mesh: the controller's core, transport-neutral.

InferenceServices go through the same reconcile as the Predictor they stand for (a :class:`Kind`
converts the object, its owner, its model ID and its status; :class:`InferenceServices`). An object
the mesh does not serve (an InferenceService without the ModelMesh annotation) is treated as
absent: its vModel, if it had one, is removed once.

Inputs are watch events (:meth:`PredictorController.on_event`) and a periodic resync; each only
queues the Predictor's key, and a worker reconciles it against the latest object:

- **Predictor present, spec valid**: ``setVModel`` to its concrete model when the controller has
  not yet set that model (new Predictor, spec change, controller restart, an earlier failure);
  otherwise ``getVModelStatus``, and ``setVModel`` again if the mesh lost the registration (a
  wiped registry: the resync restores every Predictor within ``resync_s``). Then the status is
  computed and written if it differs (a merge patch of ``.status``; nothing else is ever written).
- **Spec invalid** (unsupported model type, no path...): the registration is left as it is, so a
  bad edit does not take down the model that serves now (modelmesh-serving does the same); the
  status says ``transitionStatus: InvalidSpec`` with reason ``InvalidPredictorSpec``, and the
  states of whatever is registered.
- **Predictor gone** (DELETED event, or missing from a relist): ``deleteVModel``; the mesh deletes
  the models it auto-created.

No write loops: the controller's own status writes come back as MODIFIED events with an unchanged
``metadata.generation``, and those only refresh the cached object; only a new object, a new
generation or a resync queue a reconcile, and a reconcile writes only a status that differs (the
status of an unchanged mesh is the same, failure times included). The mesh sends no events, so
loads and transitions in progress are polled every ``poll_s`` until they settle.

Errors: refusals the user must act on (no runtime for the type, a name owned by another
namespace, a spec the router rejects) go into the status; anything else (router unreachable, the
API server failing) is retried per Predictor with an exponential back-off up to ``backoff_max_s``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import structlog

from mesh.controller import isvc
from mesh.controller.predictor import (
    INVALID_PREDICTOR_SPEC,
    MODEL_LOAD_FAILED,
    NO_SUPPORTING_RUNTIME,
    PENDING,
    RUNTIME_NOT_RECOGNIZED,
    RUNTIME_UNHEALTHY,
    STANDBY,
    Failure,
    InvalidPredictor,
    Key,
    NoRuntime,
    Registration,
    RuntimeSelector,
    VModelState,
    concrete_model_id,
    load_now,
    needs_registration,
    predictor_status,
    registration,
    requeue_after,
    status_patch,
    timestamp,
)
from mesh.controller.watched import EventRecorder, ObjectController
from mesh.errors import Code, MeshError, RegistryFull
from mesh.settings import ControllerSettings

log = structlog.get_logger(__name__)

RUNTIME_WAIT_S = 3.0  # retry a Predictor waiting for its first runtime this often (modelmesh-serving: 3 s)
# After asking for a load, keep polling a model still Pending/Standby this long: the load may not
# have started yet when setVModel answers. Past it, the periodic resync takes over.
SETTLE_S = 60.0


class MeshApi(Protocol):
    async def set_vmodel(self, reg: Registration, *, owner: str, load_now: bool) -> VModelState: ...

    async def set_vmodel_split(self, vmodel_id: str, targets: list[tuple[str, int]], *, owner: str,
                               stable: str, register: Registration | None = None) -> VModelState: ...

    async def ensure_loaded(self, model_id: str) -> None: ...

    async def vmodel_status(self, vmodel_id: str, *, owner: str) -> VModelState: ...

    async def delete_vmodel(self, vmodel_id: str, *, owner: str) -> None: ...


class StatusWriter(Protocol):
    async def patch_status(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any] | None: ...


class Usage(Protocol):
    """Which runtime each object's model was sent to (``mesh.controller.workloads.RuntimeUsage``):
    the runtimes in use are those that run."""

    def set(self, key: tuple[str, str, str], ref: str | None) -> None: ...


class Kind:
    """Predictors: the resource this controller reconciles, and how it maps to the Predictor
    reconcile (the identity here). :class:`InferenceServices` converts."""

    name = "Predictor"

    def owner(self, owner: str) -> str:
        return owner

    def registration(self, obj: Mapping[str, Any], default_storage_key: str,
                     select: RuntimeSelector | None = None) -> Registration | None:
        """What ``obj`` asks of the mesh; None if the mesh does not serve it; InvalidPredictor
        (NoRuntime: ``select`` found no runtime for it)."""
        return registration(obj, default_storage_key=default_storage_key, select=select)

    def model_id(self, namespace: str, name: str, obj: Mapping[str, Any]) -> str:
        """The concrete model ID to name in the status of a spec that cannot be served."""
        spec = obj.get("spec")
        return concrete_model_id(namespace, name, spec if isinstance(spec, Mapping) else {})

    def previous(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """The object's status, as the Predictor status it was written from."""
        return dict(obj.get("status") or {})

    def canary(self, obj: Mapping[str, Any]) -> int | None:
        """The canary traffic percent the object asks for (None: no canary; Predictors have none)."""
        return None

    def patch(self, obj: Mapping[str, Any], status: dict[str, Any], now_ms: int,
              state: VModelState | None = None, latest: str = "") -> dict[str, Any] | None:
        """The status patch for the Predictor status ``status`` (None: nothing to write);
        ``state`` and ``latest`` (the spec's model ID) for kinds that report revisions."""
        return status_patch(obj.get("status"), status)


class InferenceServices(Kind):
    """ModelMesh-mode InferenceServices, through the Predictor they stand for (mesh.controller.isvc)."""

    name = "InferenceService"

    def __init__(self, grpc_url: str, rest_url: str) -> None:
        self.grpc_url = grpc_url
        self.rest_url = rest_url

    def owner(self, owner: str) -> str:
        return f"{owner}/{isvc.SOURCE}"

    def registration(self, obj: Mapping[str, Any], default_storage_key: str,
                     select: RuntimeSelector | None = None) -> Registration | None:
        if not isvc.is_modelmesh(obj):
            return None
        isvc.canary_percent(obj)  # a bad canaryTrafficPercent is an invalid spec
        return isvc.isvc_registration(obj, default_storage_key=default_storage_key, select=select)

    def canary(self, obj: Mapping[str, Any]) -> int | None:
        return isvc.canary_percent(obj)

    def model_id(self, namespace: str, name: str, obj: Mapping[str, Any]) -> str:
        try:
            spec = isvc.as_predictor(obj)["spec"]
        except InvalidPredictor:
            spec = {}
        return isvc.isvc_model_id(concrete_model_id(namespace, name, spec), name)

    def previous(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        return isvc.predictor_view(obj.get("status"))

    def patch(self, obj: Mapping[str, Any], status: dict[str, Any], now_ms: int,
              state: VModelState | None = None, latest: str = "") -> dict[str, Any] | None:
        current = obj.get("status") or {}
        wanted = isvc.isvc_status(status, previous=current, grpc_url=self.grpc_url, rest_url=self.rest_url,
                                  now=timestamp(now_ms), state=state, latest=latest)
        return isvc.isvc_status_patch(current, wanted)


def refusal(exc: MeshError, reg: Registration) -> Failure | None:
    """A router refusal to show in the status, or None for an error worth retrying as is."""
    message = exc.message
    if exc.code is Code.UNAVAILABLE and message.startswith("no runtime instances"):
        return Failure(RUNTIME_UNHEALTHY, f"Waiting for a runtime instance to become available: {message}",
                       reg.model_id)
    if exc.code is Code.FAILED_PRECONDITION and message.startswith("no instance can serve"):
        runtime = next((label[3:] for label in reg.labels if label.startswith("rt:")), "")
        if runtime:
            return Failure(RUNTIME_NOT_RECOGNIZED, f"No runtime instance is labelled rt:{runtime}: {message}",
                           reg.model_id)
        return Failure(NO_SUPPORTING_RUNTIME, f"No runtime instance supports the model: {message}", reg.model_id)
    if exc.code is Code.RESOURCE_EXHAUSTED and message.startswith(RegistryFull.CAUSE):
        return None  # etcd at its quota: an operator's fix, then the same call succeeds (retried with back-off)
    if exc.code in (Code.FAILED_PRECONDITION, Code.RESOURCE_EXHAUSTED):
        # failed on every instance it may go to (until the failure records expire), or fits on none
        return Failure(MODEL_LOAD_FAILED, message, reg.model_id)
    if exc.code is Code.ALREADY_EXISTS:
        return Failure(INVALID_PREDICTOR_SPEC, f"The name is taken in the mesh: {message}", reg.model_id)
    if exc.code is Code.INVALID_ARGUMENT:
        return Failure(INVALID_PREDICTOR_SPEC, message, reg.model_id)
    return None


class PredictorController(ObjectController):
    def __init__(self, settings: ControllerSettings, *, mesh: MeshApi, kube: StatusWriter,
                 workers: int = 4, poll_s: float = 1.0, clock: Callable[[], float] = time.time,
                 kind: Kind | None = None, select: RuntimeSelector | None = None,
                 usage: Usage | None = None, ready: Sequence[asyncio.Event] = (),
                 served: Callable[[str], bool] | None = None, events: EventRecorder | None = None) -> None:
        super().__init__(settings, workers=workers, ready=ready, events=events)
        self.kind = kind or Kind()
        self.kind_name = self.kind.name
        self.select = select
        self.usage = usage
        self.served = served  # whether a namespace is served (controller.namespace_label); None: all
        self.mesh = mesh
        self.kube = kube
        self.poll_s = poll_s
        self.clock = clock
        self.registered: dict[Key, str] = {}  # model ID the controller last set for each Predictor
        self._settling: dict[Key, float] = {}  # key -> until when a requested load is polled
        # Objects the mesh does not serve (InferenceServices of KServe's own) whose vModel, if any,
        # was removed once: not asked again at every resync.
        self._cleared: set[Key] = set()
        self.grpc_endpoint = f"grpc://{settings.router_endpoint}"

    def owner(self, namespace: str) -> str:
        return self.kind.owner(f"{self.settings.owner}/{namespace}")

    def _use(self, key: Key, ref: str | None) -> None:
        if self.usage is not None:
            self.usage.set((self.kind.name, *key), ref)

    async def reconcile(self, key: Key) -> float | None:
        """Bring the mesh and the status in line with the Predictor; when to look again (or None)."""
        namespace, name = key
        owner = self.owner(namespace)
        obj = self.cache.get(key)
        reg: Registration | None = None
        # In a namespace the controller does not serve, an object is as one the mesh does not
        # serve: its vModel goes, once.
        if obj is not None and (self.served is None or self.served(namespace)):
            try:
                reg = self.kind.registration(obj, self.settings.default_storage_key, self.select)
            except InvalidPredictor as exc:
                state = await self.mesh.vmodel_status(name, owner=owner)
                invalid = Failure(exc.reason if isinstance(exc, NoRuntime) else INVALID_PREDICTOR_SPEC, exc.message,
                                  self.kind.model_id(namespace, name, obj))
                if isinstance(exc, NoRuntime):
                    # Nothing registered (what serves now, if anything, keeps serving); tried again
                    # when the runtimes change (requeue_all).
                    self._use(key, None)
                    log.warning(f"no runtime for the {self.kind.name}", namespace=namespace, name=name,
                                reason=exc.reason, error=exc.message)
                await self._write(key, obj, predictor_status(
                    state, previous=self.kind.previous(obj), failure=invalid, now_ms=self._now_ms(),
                    grpc_endpoint=self.grpc_endpoint))
                await self.warn(key, obj, invalid.reason, invalid.message)
                return None
        if reg is None and obj is not None and key in self._cleared:
            return None
        self._use(key, (reg.runtime or None) if reg is not None else None)
        if reg is None:  # gone, or not served by the mesh (an InferenceService of KServe's)
            try:
                await self.mesh.delete_vmodel(name, owner=owner)
            except MeshError as exc:
                if exc.code is not Code.FAILED_PRECONDITION:
                    raise
                log.warning("vModel not deleted: another owner has it", predictor=name, error=exc.message)
            self._settling.pop(key, None)
            if obj is not None:
                self._cleared.add(key)
            else:
                self._cleared.discard(key)
                self.forget_warnings(key)
            if self.registered.pop(key, None) is not None:
                log.info(f"{self.kind.name} deleted or no longer served; vModel removed", namespace=namespace,
                         name=name)
            return None
        assert obj is not None
        self._cleared.discard(key)
        status = self.kind.previous(obj)

        failure: Failure | None = None
        percent = self.kind.canary(obj)
        try:
            if self.registered.get(key) != reg.model_id:
                loading = load_now(status)
                stable = ""
                current = (await self.mesh.vmodel_status(name, owner=owner)
                           if percent is not None and percent < 100 else None)
                if current is not None and reg.model_id in {t.model_id for t in current.split}:
                    state = await self._keep_split(name, owner, current, reg, percent)  # a controller restart
                else:
                    if current is not None:
                        stable, _ = isvc.canary_split(current, reg.model_id, percent)
                    if stable:
                        # One call registers the new model and splits (never a setVModel first: a
                        # router seeing the new model loaded between two calls would switch to it
                        # at 100 % and auto-delete the stable model). The stable model is loaded
                        # first: it takes most of the traffic.
                        await self._load_stable(stable)
                        state = await self._split(name, owner, stable, reg, percent)
                    else:
                        state = await self.mesh.set_vmodel(reg, owner=owner, load_now=loading)
                if loading:
                    self._settling[key] = self.clock() + SETTLE_S
                if self.registered.get(key) is None:
                    log.info("Predictor registered", namespace=namespace, predictor=name, model_id=reg.model_id)
                else:
                    log.info("Predictor changed; moving to a new model", namespace=namespace, predictor=name,
                             model_id=reg.model_id, previous=self.registered[key])
                self.registered[key] = reg.model_id
            else:
                state = await self.mesh.vmodel_status(name, owner=owner)
                if state.split and reg.model_id in {t.model_id for t in state.split}:
                    state = await self._keep_split(name, owner, state, reg, percent)
                elif needs_registration(state, reg):
                    log.warning("registration missing in the mesh; restoring it", namespace=namespace,
                                predictor=name, model_id=reg.model_id, vmodel_status=state.status)
                    state = await self.mesh.set_vmodel(reg, owner=owner, load_now=True)
                    self._settling[key] = self.clock() + SETTLE_S
        except MeshError as exc:
            failure = refusal(exc, reg)
            if failure is None:
                raise
            self.registered.pop(key, None)  # try setVModel again next time
            log.warning("the mesh refused the Predictor", namespace=namespace, predictor=name,
                        reason=failure.reason, error=exc.message)
            await self.warn(key, obj, failure.reason, failure.message)
            state = await self.mesh.vmodel_status(name, owner=owner)
        new = predictor_status(state, previous=status, failure=failure, now_ms=self._now_ms(),
                               grpc_endpoint=self.grpc_endpoint)
        await self._write(key, obj, new, state, reg.model_id)
        delay = requeue_after(new, poll_s=self.poll_s, runtime_wait_s=RUNTIME_WAIT_S)
        if delay is None and self.clock() < self._settling.get(key, 0.0) and (
                new["activeModelState"] in (PENDING, STANDBY) or new["targetModelState"] in (PENDING, STANDBY)):
            delay = self.poll_s
        if delay is None:
            self._settling.pop(key, None)
        return delay


    # --- canaries (InferenceService canaryTrafficPercent; mesh.controller.isvc) ----------------------
    async def _load_stable(self, model_id: str) -> None:
        try:
            await self.mesh.ensure_loaded(model_id)
        except MeshError as exc:  # the split sends a failed target's share to it regardless
            log.warning("cannot load the stable model of a canary", model_id=model_id, error=exc.message)

    async def _split(self, name: str, owner: str, stable: str, reg: Registration, percent: int | None) -> VModelState:
        """Split ``stable`` / the spec's model at ``percent``, registering the latter (as the vModel's
        own, auto-deleted with the canary) in the same call. The mesh's refusal, NOT_FOUND included
        (the stable model or the vModel went meanwhile), is raised: reported and retried, never
        taken for a roll-out."""
        _, targets = isvc.canary_split(VModelState(status="DEFINED", active_model_id=stable), reg.model_id, percent)
        state = await self.mesh.set_vmodel_split(name, targets, owner=owner, stable=stable, register=reg)
        log.info("canary: traffic split", vmodel_id=name, split=dict(targets))
        return state

    async def _keep_split(self, name: str, owner: str, state: VModelState, reg: Registration,
                          percent: int | None) -> VModelState:
        """A canary under way: move the split to a new percent, promote the spec's model (no
        percent, or 100: a plain setVModel clears the split, with the safe switch), or roll back
        (the spec names the stable model again: a plain setVModel of it clears the split, and the
        canary, the vModel's own, is auto-deleted)."""
        if percent is None or percent >= 100:
            log.info("canary promoted", vmodel_id=name, model_id=reg.model_id)
            return await self.mesh.set_vmodel(reg, owner=owner, load_now=True)
        if reg.model_id == state.active_model_id:
            log.info("canary rolled back", vmodel_id=name, model_id=reg.model_id)
            return await self.mesh.set_vmodel(reg, owner=owner, load_now=True)
        stable, targets = isvc.canary_split(state, reg.model_id, percent)
        if stable and sorted(targets) != sorted((t.model_id, t.weight) for t in state.split):
            return await self._split(name, owner, stable, reg, percent)
        return state
    # --- end canaries -----------------------------------------------------------------------------

    async def _write(self, key: Key, obj: dict[str, Any], status: dict[str, Any],
                     state: VModelState | None = None, latest: str = "") -> None:
        patch = self.kind.patch(obj, status, self._now_ms(), state, latest)
        if patch is None:
            return
        updated = await self.kube.patch_status(key[0], key[1], patch)
        cached = self.cache.get(key)
        if updated is not None and cached is not None:
            # Only the status: the spec in the cache must stay what the watch last delivered, or a
            # spec change racing with this write could be taken as already seen.
            self.cache[key] = {**cached, "status": updated.get("status") or {}}
        log.info(f"{self.kind.name} status updated", namespace=key[0], name=key[1],
                 available=status["available"], active=status["activeModelState"],
                 target=status["targetModelState"], transition=status["transitionStatus"])

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

