"""The management API's logic (mmesh.ModelMesh), with ModelMesh's semantics, transport-neutral.

Registrations are cheap writes to ``models/<id>``; loading is the runtimes' business and happens
on demand (or at once with ``loadNow``). Like ModelMesh, a new registration enters caches "in the
past" (1 h ago with loadNow, 6 h without) so that registering many models cannot evict the ones in
use.

vModels are aliases: requests go to the active model; setting a new target keeps serving the
active one until the target has a loaded copy, then switches (compare-and-swap on the record).
Transitions are driven by every router (``drive_transitions``), idempotently, so there is no
leader to lose: whichever router sees the target loaded first makes the switch.

Traffic splits (canaries, ``mesh.router.split``): ``set_vmodel_split`` shares a vModel's requests
among weighted targets, the active model staying the stable one; ``promote_vmodel`` makes one
target the vModel's sole target with the safe switch above and clears the split. A plain
``set_vmodel`` on a split vModel clears the split too (ModelMesh's clients know no splits: what
they set is what is served). Setting a split cancels a pending transition (the split says where
traffic goes now); a split target is a referrer, like the active and the target model. A split
call may register a target itself (``infos``: the controller's canary, registered and split in one
call, so that no router sees a pending transition to it that it could complete at 100 %).

Auto-delete: ``created_models`` lists only models the vModel created and still refers to; a model
it stops referring to is deleted (if nothing else refers to it) and leaves the list, so the same
ID registered again later, by anyone, is never the vModel's to delete.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import structlog

from mesh.auth import Principal, current_caller
from mesh.errors import (
    AlreadyExists,
    Code,
    FailedPrecondition,
    InvalidArgument,
    MeshError,
    ModelNotFound,
    PermissionDenied,
    ResourceExhausted,
)
from mesh.ids import check_model_id
from mesh.model_libraries import install_hint
from mesh.paths import confine
from mesh.registry.records import (
    CRASH,
    FAILED,
    GPU_LABEL,
    GPU_MODES,
    GPU_PREFERRED,
    GPU_REQUIRED,
    LOADED,
    LOADING,
    ModelSpec,
    VModelRecord,
    quarantine,
)
from mesh.registry.registry import Registry
from mesh.registry.specs import SpecCache
from mesh.router.routing import Target, pick_copy, pick_home
from mesh.router.split import check_split, check_sticky_header, load_failed, receiving
from mesh.router.view import ClusterView
from mesh.storage.location import locate
from mesh.tasks import Background

log = structlog.get_logger(__name__)
CHECK_SOURCE_TIMEOUT_S = 5.0  # a registration's source check (mesh model register) waits at most this
_rng = random.Random()

HOUR_MS = 3_600_000
SPLIT_FIRST = "set it (setVModel, mesh vmodel set) before splitting it"
DEFAULT_PAGE = 500
MAX_PAGE = 5_000


def _owned(record: VModelRecord) -> VModelRecord:
    """``record`` with ``created_models`` cut to the models it still refers to: one it no longer
    refers to is auto-deleted now (``_drop_orphans``) or kept for another vModel's sake, and in
    either case is not this vModel's any more; if the ID is registered again later, by anyone, it
    is a new model the vModel did not create and must never auto-delete."""
    keep = record.models()
    return replace(record, created_models=tuple(m for m in dict.fromkeys(record.created_models) if m in keep))


class RuntimeLoader(Protocol):
    async def load(self, target: Target, spec: ModelSpec, last_used_ms: int, timeout_s: float, *,
                   retry_failed: bool = False) -> None: ...

    async def check_source(self, target: Target, spec: ModelSpec, timeout_s: float) -> None: ...


@dataclass(frozen=True)
class ModelInfoData:
    type: str
    path: str = ""
    key: str = ""
    size_hint_bytes: int = 0
    min_copies: int = 0
    max_copies: int = 0
    labels: tuple[str, ...] = ()
    gpu: str = ""  # "", "required", "preferred"


@dataclass(frozen=True)
class CopyStatus:
    instance_id: str
    state: str  # LOADING, LOADED, FAILED
    time_ms: int
    size_bytes: int
    device: str = ""


@dataclass(frozen=True)
class ModelStatus:
    status: str  # NOT_FOUND, NOT_LOADED, LOADING, LOADED, LOADING_FAILED
    errors: list[str] = field(default_factory=list)
    copies: list[CopyStatus] = field(default_factory=list)


@dataclass(frozen=True)
class SplitTargetStatus:
    model_id: str
    weight: int
    status: ModelStatus
    receiving: bool  # False: its load failed, its share goes to the active model


@dataclass(frozen=True)
class VModelStatus:
    status: str  # NOT_FOUND, DEFINED, TRANSITIONING, TRANSITION_FAILED
    active_model_id: str = ""
    target_model_id: str = ""
    active: ModelStatus | None = None
    target: ModelStatus | None = None
    owner: str = ""
    split: list[SplitTargetStatus] = field(default_factory=list)  # empty: no traffic split
    sticky_header: str = ""


@dataclass(frozen=True)
class ListEntry:
    spec: ModelSpec
    status: str
    loaded_copies: int


# Bounds on what one registration may hold: every router and runtime keeps registrations in memory
# and etcd refuses requests over 1.5 MiB, so a field over its bound is refused here, by name, with
# INVALID_ARGUMENT (a permanent error), instead of failing in etcd as "unavailable".
MAX_TYPE_CHARS = 64
MAX_PATH_BYTES = 4096  # PATH_MAX
MAX_KEY_BYTES = 16 * 1024  # modelmesh-serving's storage JSON is a few hundred bytes
MAX_LABELS = 32
MAX_LABEL_CHARS = 253  # a Kubernetes label's prefix + name
MAX_COPIES = 64  # minCopies and maxCopies: copies of one model in one fleet
MAX_OWNER_CHARS = 256
MAX_SPLIT_CHECKED = 64  # targets whose IDs are checked before the count is (check_split bounds it at 8)


def check_model_info(model_id: str, info: ModelInfoData) -> None:
    def over(what: str, size: int, limit: int, unit: str) -> InvalidArgument:
        return InvalidArgument(f"model {model_id[:100]!r}: modelInfo.{what} is {size} {unit}; the limit is {limit}")

    if len(info.type) > MAX_TYPE_CHARS:
        raise over("type", len(info.type), MAX_TYPE_CHARS, "characters")
    for what, value, limit in (("path", info.path, MAX_PATH_BYTES), ("key", info.key, MAX_KEY_BYTES)):
        size = len(value.encode("utf-8", "surrogatepass"))
        if size > limit:
            raise over(what, size, limit, "bytes")
    if len(info.labels) > MAX_LABELS:
        raise over("labels", len(info.labels), MAX_LABELS, "labels")
    for label in info.labels:
        if not label or len(label) > MAX_LABEL_CHARS:
            raise InvalidArgument(f"model {model_id[:100]!r}: a label must have 1 to {MAX_LABEL_CHARS} "
                                  f"characters, not {len(label)}")
    for what, copies in (("minCopies", info.min_copies), ("maxCopies", info.max_copies)):
        if copies > MAX_COPIES:
            raise over(what, copies, MAX_COPIES, "copies")


def _check_owner(record: VModelRecord, owner: str, caller: Principal | None, *, deleting: bool = False) -> None:
    """Who may change or delete a vModel. An owned vModel only by a call naming its owner (an
    empty owner is not a wildcard) and, with auth on, made with the token that created it or with a
    token that has no prefixes (an operator's). An unowned one is never adopted by an owner."""
    what = "delete" if deleting else "change"
    if record.owner != owner:
        # ModelMesh's codes: ALREADY_EXISTS for a setVModel, FAILED_PRECONDITION for a delete.
        error = FailedPrecondition if deleting else AlreadyExists
        if record.owner:
            raise error(f"vModel {record.vmodel_id!r} is owned by {record.owner!r}: name that owner to {what} it")
        raise error(f"vModel {record.vmodel_id!r} exists without an owner; a call for owner {owner[:100]!r} "
                    f"may not {what} it")
    if record.owner_token and caller is not None and caller.prefixes and caller.name != record.owner_token:
        raise PermissionDenied(f"vModel {record.vmodel_id!r} was created with token {record.owner_token!r}; "
                               f"token {caller.name!r} may not {what} it")


class Management:
    def __init__(self, *, registry: Registry, view: ClusterView, runtimes: RuntimeLoader,
                 load_factor: float, load_timeout_s: float = 120.0,
                 clock: Callable[[], float] = time.time, specs: SpecCache | None = None,
                 model_roots: tuple[str, ...] = ()) -> None:
        self.registry = registry
        self.specs = specs
        self.view = view
        self.runtimes = runtimes
        self.load_factor = load_factor
        self.load_timeout_s = load_timeout_s
        self.clock = clock
        self.model_roots = model_roots  # runtime.model_roots: registrations must name files under them
        self._background = Background("management")
        self._quota_locks: dict[str, asyncio.Lock] = {}  # by token name: the tokens file bounds it
        self._last_ensure: dict[str, float] = {}

    # --- graph IDs (mesh.router.graph_management): a model or vModel never takes a graph's ID -----
    async def _refuse_graph_id(self, id_: str, what: str) -> None:
        """ALREADY_EXISTS if ``id_`` is an inference graph's: a vModel would take over every request
        naming the graph, and a model would be reachable only by header. The view answers for the
        graphs this router knows; the registry read covers one just defined on another router."""
        if id_ in self.view.graphs or await self.registry.get_graph(id_) is not None:
            raise AlreadyExists(f"{what} ID {id_!r} is already an inference graph's ID; a request naming it could "
                                "not tell which is meant: choose another ID (or delete the graph)")

    # --- models -------------------------------------------------------------------------------
    async def register_model(self, model_id: str, info: ModelInfoData, *, load_now: bool = False,
                             sync: bool = False, last_used_ms: int = 0, check_source: bool = False) -> ModelStatus:
        """``check_source`` (`mesh model register` asks it): the runtime the model would be loaded
        on checks its file or storage key exists, without loading it; what it finds is in the
        returned status's errors (the model is registered either way, ModelMesh's contract)."""
        spec = self._spec(model_id, info, load_now=load_now, last_used_ms=last_used_ms)
        if model_id in self.view.graphs:  # a graph defined elsewhere: the registration's transaction checks
            await self._refuse_graph_id(model_id, "model")
        spec, created = await self._register(spec, graph_free=True)
        if created:  # debug: a bulk load of a million registrations is not a million log lines
            log.debug("model registered", model_id=model_id, type=spec.type)
        if self.specs is not None:
            self.specs.prime(spec)  # its first request needs no registry read on this router
        if load_now:
            await self._ensure(spec, sync=sync, last_used_ms=spec.last_used_ms)
        # The registration exists (we just wrote it or found the same one), so the status comes
        # from the view alone: ``model_status`` would read ``models/<id>`` back from the registry,
        # a second etcd round trip per registration for an answer we already have.
        status = self._status_from_view(model_id)
        unservable = self._unservable(spec)
        if unservable:  # registered all the same (ModelMesh's contract; a runtime may come later)
            status.errors.append(unservable)
        elif check_source and created and status.status != "LOADED":  # a repeated registration: checked already
            problem = await self._source_problem(spec)
            if problem:
                status.errors.append(problem)
        return status

    async def _source_problem(self, spec: ModelSpec) -> str:
        """What the model's home runtime says of its file or storage key ('' when it can read them,
        or when no runtime can be asked now: nothing is known then, and nothing is claimed)."""
        if self.runtimes is None:
            return ""
        try:
            target = pick_copy(self.view, spec.model_id, (), _rng) or pick_home(
                self.view, spec, (), load_factor=self.load_factor)
        except MeshError:
            return ""  # no runtime can take it now: said by _unservable, or a capacity matter
        try:
            await self.runtimes.check_source(target, spec, CHECK_SOURCE_TIMEOUT_S)
        except MeshError as exc:
            if exc.code in (Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED, Code.UNIMPLEMENTED):
                return ""  # the runtime could not answer (an SPI server without the check)
            return exc.message
        return ""

    def _unservable(self, spec: ModelSpec) -> str:
        """Why no runtime registered now could ever load ``spec`` ('' when one could, or when none is
        registered: runtimes may be starting). Read from the view alone: it costs a registration
        nothing. A model that cannot load is still registered, with this in its status's errors."""
        live = [r for r in self.view.instances.values() if not r.shutting_down]
        if not live or any(r.can_serve(spec) for r in live):
            return ""
        types = sorted({t for r in live for t in r.supported_types})
        labels = f" with labels {sorted(spec.labels)}" if spec.labels else ""
        if any(spec.type.lower() in r.supported_types for r in live):
            return (f"no runtime serves type {spec.type!r}{labels} (the runtimes that load the type lack the "
                    "labels or the GPU the model requires)")
        hint = install_hint(spec.type)
        return (f"no runtime loads type {spec.type!r} (they load: {', '.join(types) or 'nothing'})"
                + (f"; {hint}" if hint else "; is it a type of a model server (runtime.model_server) or "
                   "a loader plug-in not running here?"))

    async def _register(self, spec: ModelSpec, *, graph_free: bool = False) -> tuple[ModelSpec, bool]:
        """Register ``spec`` within the caller's quotas (mesh.auth: max_models, max_pinned_copies);
        ``graph_free``: refuse it in the same transaction if a graph has its ID."""
        caller = current_caller()
        if caller is None or not (caller.max_models or caller.max_pinned_copies):
            return await self.registry.register_model(spec, graph_free=graph_free)
        # One check-and-write at a time per token on this router: a burst of concurrent calls
        # cannot all read the same count and all pass (across routers, one each may: docs/security.md).
        async with self._quota_locks.setdefault(caller.name, asyncio.Lock()):
            if await self.registry.get_model(spec.model_id) is None:  # an ID taken is free, or ALREADY_EXISTS
                await self._check_quota(caller, spec)
            return await self.registry.register_model(spec, graph_free=graph_free)

    async def _count_under(self, prefix: str) -> int:
        """Models whose ID is ``prefix`` or starts with it at a boundary (mesh.paths.under_prefix)."""
        keys, store = self.registry.keys, self.registry.store
        if not prefix or prefix.endswith("/"):
            return await store.count_prefix(keys.model(prefix))
        exact = await store.get(keys.model(prefix))
        return (exact is not None) + await store.count_prefix(keys.model(prefix + "/"))

    async def _check_quota(self, caller: Principal, spec: ModelSpec) -> None:
        if caller.max_models:
            registered = 0
            for prefix in caller.prefixes or ("",):
                registered += await self._count_under(prefix)
            if registered >= caller.max_models:
                where = f"under its prefixes ({', '.join(caller.prefixes)})" if caller.prefixes else "in the mesh"
                raise ResourceExhausted(f"token {caller.name!r} may have at most {caller.max_models} models "
                                        f"registered {where}; {registered} are (unregister some first)")
        if caller.max_pinned_copies and spec.min_copies:
            pinned = sum(copies for model_id, copies in (await self.registry.pinned_models()).items()
                         if caller.allows(model_id) and model_id != spec.model_id)
            if pinned + spec.min_copies > caller.max_pinned_copies:
                raise ResourceExhausted(
                    f"token {caller.name!r} may pin at most {caller.max_pinned_copies} copies (minCopies summed "
                    f"over its models); {pinned} are pinned, and this registration asks for {spec.min_copies}")

    def _spec(self, model_id: str, info: ModelInfoData, *, load_now: bool, last_used_ms: int) -> ModelSpec:
        check_model_id(model_id)
        if not info.type:
            raise InvalidArgument(f"model {model_id!r}: modelInfo.type is required")
        check_model_info(model_id, info)
        if info.max_copies and info.min_copies > info.max_copies:
            raise InvalidArgument(f"model {model_id!r}: minCopies {info.min_copies} is above "
                                  f"maxCopies {info.max_copies}")
        gpu = info.gpu.strip().lower()
        if gpu not in GPU_MODES:
            raise InvalidArgument(f"model {model_id!r}: modelInfo.gpu must be 'required', 'preferred' or "
                                  f"empty, not {info.gpu[:40]!r}")
        labels = tuple(info.labels)
        # One way to say "required" in the registry: the field and the label the GPU instances carry.
        if GPU_LABEL in labels and gpu != GPU_PREFERRED:
            gpu = GPU_REQUIRED
        elif gpu == GPU_REQUIRED:
            labels += (GPU_LABEL,)
        # The path the runtimes will read, checked against the model roots (mesh.paths), or the
        # object-storage location (mesh.storage.location): refused here, permanently, rather than
        # at every load.
        if locate(info.path, info.key) is not None:
            path = info.path
        else:
            path = confine(info.path, self.model_roots) if info.path and self.model_roots else info.path
        now_ms = int(self.clock() * 1000)
        offset = HOUR_MS if load_now else 6 * HOUR_MS
        return ModelSpec(model_id=model_id, type=info.type, path=path, key=info.key,
                         size_hint_bytes=info.size_hint_bytes, min_copies=info.min_copies,
                         max_copies=info.max_copies, labels=labels, registered_ms=now_ms,
                         last_used_ms=last_used_ms or now_ms - offset, gpu=gpu)

    async def unregister_model(self, model_id: str) -> None:
        # The registry refuses in the same transaction as the delete when a vModel refers to the
        # model (this router's view could be behind another router's setVModel).
        if await self.registry.delete_model(model_id):
            log.info("model unregistered", model_id=model_id)
            await self.registry.clear_failures(model_id)
        # Runtimes holding copies see the deletion through their watch and unload them.

    def _status_from_view(self, model_id: str) -> ModelStatus:
        copies = [CopyStatus(p.instance_id, p.state, p.loaded_ms, p.size_bytes, p.device)
                  for p in self.view.copies(model_id).values()]
        failures = list(self.view.failures.get(model_id, {}).values())
        copies += [CopyStatus(f.instance_id, FAILED, f.time_ms, 0) for f in failures]
        copies.sort(key=lambda c: c.time_ms, reverse=True)  # newest first, as ModelMesh does
        states = {c.state for c in copies}
        if LOADED in states:
            status = "LOADED"
        elif quarantine(self.view.failures.get(model_id, {})) is not None:
            status = "LOADING_FAILED"  # the dead runtime's "loading" placement outlives it a while
        elif LOADING in states:
            status = "LOADING"
        elif failures:
            status = "LOADING_FAILED"
        else:
            status = "NOT_LOADED"
        return ModelStatus(status=status, errors=[f"{f.instance_id}: {f.reason}" for f in failures],
                           copies=copies)

    async def model_status(self, model_id: str) -> ModelStatus:
        if await self.registry.get_model(model_id) is None:
            return ModelStatus(status="NOT_FOUND")
        return self._status_from_view(model_id)

    async def ensure_loaded(self, model_id: str, *, sync: bool = False, last_used_ms: int = 0,
                            retry_failed: bool = False) -> ModelStatus:
        """``retry_failed`` (`mesh model load --retry`): the model's load failures are forgotten first,
        by the routers (its ``failures/`` records) and by the runtime that loads it, so a model whose
        file was fixed loads now instead of after the failures' TTL. A crash quarantine (a runtime
        died loading it: every model on that runtime failed meanwhile) is lifted only by a caller
        with no prefixes, the mesh's operator: a tenant could otherwise kill a shared runtime again
        and again with one call each (registering the model anew still lifts it, as before)."""
        spec = await self.registry.get_model(check_model_id(model_id))
        if spec is None:
            raise ModelNotFound(model_id)
        if retry_failed:
            caller = current_caller()
            keep_crashes = caller is not None and bool(caller.prefixes)
            await self.registry.clear_failures(model_id, keep_crashes=keep_crashes)
            await self._failures_gone(model_id, keep_crashes=keep_crashes)
        await self._ensure(spec, sync=sync, last_used_ms=last_used_ms or int(self.clock() * 1000),
                           retry_failed=retry_failed)
        return self._status_from_view(model_id)

    async def _failures_gone(self, model_id: str, *, keep_crashes: bool = False, timeout_s: float = 5.0) -> None:
        """Wait (briefly) until this router's view has seen the failure records deleted."""
        deadline = self.clock() + timeout_s
        while self.clock() < deadline:
            left = self.view.failures.get(model_id, {}).values()
            if not any(f.kind != CRASH or not keep_crashes for f in left):
                return
            await asyncio.sleep(0.01)

    async def _ensure(self, spec: ModelSpec, *, sync: bool, last_used_ms: int, retry_failed: bool = False) -> None:
        if any(p.state == LOADED for p in self.view.copies(spec.model_id).values()):
            return
        target = pick_copy(self.view, spec.model_id, (), _rng) or pick_home(
            self.view, spec, (), load_factor=self.load_factor)
        load = self.runtimes.load(target, spec, last_used_ms, self.load_timeout_s, retry_failed=retry_failed)
        if sync:
            await load
            await self._settle(spec.model_id, target.instance_id)
        else:
            self._spawn(load, f"ensure-loaded:{spec.model_id}")

    async def _settle(self, model_id: str, instance_id: str, timeout_s: float = 5.0) -> None:
        """After a sync load, wait (briefly) for the placement to reach this router's view, so
        that the status returned right after says LOADED."""
        deadline = self.clock() + timeout_s
        while self.clock() < deadline:
            placement = self.view.copies(model_id).get(instance_id)
            if placement is not None and placement.state == LOADED:
                return
            await asyncio.sleep(0.01)

    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        async def guarded() -> None:
            try:
                await coro
            except Exception as exc:
                log.warning("background load failed", task=name, error=str(exc))

        self._background.spawn(guarded(), name)

    async def list_models(self, *, prefix: str = "", page_size: int = 0,
                          page_token: str = "") -> tuple[list[ListEntry], str]:
        size = min(page_size or DEFAULT_PAGE, MAX_PAGE)
        specs = await self.registry.list_models(prefix=prefix, limit=size + 1, start_after=page_token)
        more = len(specs) > size
        specs = specs[:size]
        entries = []
        for spec in specs:
            st = self._status_from_view(spec.model_id)
            entries.append(ListEntry(spec, st.status, sum(c.state == LOADED for c in st.copies)))
        return entries, (specs[-1].model_id if more and specs else "")

    # --- vModels ------------------------------------------------------------------------------
    async def set_vmodel(self, vmodel_id: str, target_model_id: str, *, owner: str = "",
                         update_only: bool = False, info: ModelInfoData | None = None,
                         auto_delete: bool = False, load_now: bool = False, force: bool = False,
                         sync: bool = False, expected_target: str = "",
                         registered: tuple[ModelSpec, bool] | None = None) -> VModelStatus:
        """``registered``: the target was registered already by the caller with ``info`` (the bulk
        registration, mesh.router.bulk: the spec and whether that call created it)."""
        check_model_id(vmodel_id)
        check_model_id(target_model_id)
        if len(owner) > MAX_OWNER_CHARS:
            raise InvalidArgument(f"vModel owner is {len(owner)} characters; the limit is {MAX_OWNER_CHARS}")
        await self._refuse_graph_id(vmodel_id, "vModel")
        caller = current_caller()
        created = False
        if registered is not None:
            spec, created = registered
        elif info is not None:
            await self._refuse_graph_id(target_model_id, "model")
            spec, created = await self._register(
                self._spec(target_model_id, info, load_now=load_now, last_used_ms=0))
        else:
            found = await self.registry.get_model(target_model_id)
            if found is None:
                raise ModelNotFound(target_model_id, what="target model")
            spec = found
        while True:  # compare-and-swap loop on the vModel record
            current = await self.registry.get_vmodel(vmodel_id)
            if current is None:
                if update_only:
                    raise ModelNotFound(vmodel_id, what="vModel")
                if expected_target and expected_target != target_model_id:
                    raise FailedPrecondition(f"vModel {vmodel_id!r} does not exist, so its target is not "
                                             f"{expected_target!r}")
                record = VModelRecord(vmodel_id=vmodel_id, active_model_id=target_model_id,
                                      target_model_id=target_model_id, owner=owner,
                                      auto_delete=auto_delete and info is not None,
                                      created_models=(target_model_id,) if auto_delete and created else (),
                                      owner_token=caller.name if caller is not None else "",
                                      updated_ms=int(self.clock() * 1000))
                if await self.registry.put_vmodel(record, expected_revision=None):
                    log.info("vModel created", vmodel_id=vmodel_id, model_id=target_model_id)
                    break
                await self._target_still_registered(target_model_id)
                continue
            existing, revision = current
            _check_owner(existing, owner, caller)
            if expected_target and expected_target != existing.target_model_id:
                raise FailedPrecondition(f"vModel {vmodel_id!r} targets {existing.target_model_id!r}, "
                                         f"not the expected {expected_target!r}")
            if existing.target_model_id == target_model_id and not force and not existing.split:
                record = existing
                break
            switch_now = force or existing.active_model_id == target_model_id or self._loaded(
                target_model_id) or not self.view.copies(existing.active_model_id)
            ours = (target_model_id,) if auto_delete and created else ()
            record = _owned(replace(existing, target_model_id=target_model_id,
                                    active_model_id=target_model_id if switch_now else existing.active_model_id,
                                    failed=False,
                                    auto_delete=existing.auto_delete or (auto_delete and info is not None),
                                    created_models=(*existing.created_models, *ours),
                                    split=(), sticky_header="",  # a plain setVModel clears a traffic split
                                    updated_ms=int(self.clock() * 1000)))
            if await self.registry.put_vmodel(record, expected_revision=revision, previous=existing):
                log.info("vModel retargeted", vmodel_id=vmodel_id, target=target_model_id,
                         switched=switch_now)
                await self._drop_orphans(existing, record)
                break
            await self._target_still_registered(target_model_id)
        if record.active_model_id != record.target_model_id or load_now:
            await self._ensure(spec, sync=sync, last_used_ms=int(self.clock() * 1000))
            if sync:
                await self._wait_transition(vmodel_id)
        return await self.vmodel_status(vmodel_id)

    def _loaded(self, model_id: str) -> bool:
        return any(p.state == LOADED for p in self.view.copies(model_id).values())

    async def _wait_transition(self, vmodel_id: str) -> None:
        deadline = self.clock() + self.load_timeout_s
        while self.clock() < deadline:
            await self.drive_transitions()
            current = await self.registry.get_vmodel(vmodel_id)
            if current is None or current[0].failed or (
                    current[0].active_model_id == current[0].target_model_id):
                return
            await asyncio.sleep(0.05)

    async def _target_still_registered(self, model_id: str) -> None:
        """After a vModel write lost its transaction: go round again, unless it lost because its
        target was unregistered meanwhile."""
        if await self.registry.get_model(model_id) is None:
            raise ModelNotFound(model_id, what="target model")

    async def _drop_orphans(self, before: VModelRecord, after: VModelRecord | None) -> None:
        """Auto-delete the models this vModel's own calls created and the change left behind.
        Never a model the call found registered (another tenant's base model), and never one any
        other vModel still refers to: the registry deletes only if its refs are gone, in the same
        transaction (another router may be pointing a vModel at it this very moment)."""
        keep = after.models() if after else set()
        for model_id in before.models() & (set(before.created_models) - keep):
            try:
                deleted = await self.registry.delete_model(model_id)
            except FailedPrecondition:
                continue  # another vModel refers to it: it stays
            if deleted:
                log.info("auto-deleted unreferenced model", model_id=model_id, vmodel_id=before.vmodel_id)
                await self.registry.clear_failures(model_id)

    async def vmodel_status(self, vmodel_id: str, owner: str = "") -> VModelStatus:
        current = await self.registry.get_vmodel(vmodel_id)
        if current is None or (owner and current[0].owner != owner):
            return VModelStatus(status="NOT_FOUND", active=ModelStatus("NOT_FOUND"))
        record = current[0]
        if record.active_model_id == record.target_model_id:
            status = "DEFINED"
        else:
            status = "TRANSITION_FAILED" if record.failed else "TRANSITIONING"
        active = await self.model_status(record.active_model_id)
        target = (await self.model_status(record.target_model_id)
                  if record.target_model_id != record.active_model_id else None)
        split: list[SplitTargetStatus] = []
        if record.split:
            gets = receiving(record, self.view)
            for t in record.split:
                split.append(SplitTargetStatus(t.model_id, t.weight, await self.model_status(t.model_id),
                                               gets[t.model_id]))
        return VModelStatus(status=status, active_model_id=record.active_model_id,
                            target_model_id=record.target_model_id, active=active, target=target,
                            owner=record.owner, split=split, sticky_header=record.sticky_header)

    async def set_vmodel_split(self, vmodel_id: str, targets: Sequence[tuple[str, int]], *, owner: str = "",
                               sticky_header: str = "", sync: bool = False, stable: str = "",
                               infos: Mapping[str, ModelInfoData] | None = None) -> VModelStatus:
        """Share the requests of an existing vModel among ``targets`` (model ID, weight), each a
        registered model, weights summing to 100 (``mesh.router.split``). Same owner and token
        rules as ``set_vmodel``. The vModel's active model stays the stable one, unless ``stable``
        (one of the targets) names another: it becomes the active model at once (it takes its
        share of the traffic from now on anyway). Loads of the targets start at once; ``sync``
        waits for them.

        ``infos``: targets to register first if they are not (a canary and its split in one call,
        so that no router can see a half-made change: a controller's canary never passes through
        a transition away from the stable model). A target the call registers is the vModel's own,
        as with setVModel's ``autoDeleteTargetModel``: auto-deleted once the vModel no longer
        refers to it (the canary abandoned, or another target promoted)."""
        check_model_id(vmodel_id)
        for i, (model_id, _) in enumerate(targets[:MAX_SPLIT_CHECKED]):
            try:
                check_model_id(model_id)
            except InvalidArgument as exc:
                raise InvalidArgument(f"vModel {vmodel_id!r}: targets[{i}]: {exc.message}") from None
        split = check_split(vmodel_id, targets)
        header = check_sticky_header(vmodel_id, sticky_header)
        if stable and stable not in {t.model_id for t in split}:
            raise InvalidArgument(f"vModel {vmodel_id!r}: stableModelId {stable[:100]!r} is not one of the targets")
        if len(owner) > MAX_OWNER_CHARS:
            raise InvalidArgument(f"vModel owner is {len(owner)} characters; the limit is {MAX_OWNER_CHARS}")
        await self._refuse_graph_id(vmodel_id, "vModel")
        caller = current_caller()
        if caller is not None:
            for t in split:  # every target inside the caller's prefixes (with auth on)
                caller.check_model(t.model_id, f"vModel {vmodel_id!r} split target model")
        infos = infos or {}
        unknown = set(infos) - {t.model_id for t in split}
        if unknown:
            raise InvalidArgument(f"vModel {vmodel_id!r}: model info for {sorted(unknown)[0][:100]!r}, "
                                  "which is not one of the targets")
        before = await self.registry.get_vmodel(vmodel_id)  # refused before registering anything
        if before is None:
            raise ModelNotFound(vmodel_id, what="vModel", hint=SPLIT_FIRST)
        _check_owner(before[0], owner, caller)
        specs: list[ModelSpec] = []
        created: list[str] = []
        try:
            for i, t in enumerate(split):
                info = infos.get(t.model_id)
                if info is not None:
                    spec, made = await self._register(
                        self._spec(t.model_id, info, load_now=True, last_used_ms=0))
                    if made:
                        created.append(t.model_id)
                else:
                    found = await self.registry.get_model(t.model_id)
                    if found is None:
                        raise ModelNotFound(t.model_id, what=f"vModel {vmodel_id!r} targets[{i}]: model")
                    spec = found
                specs.append(spec)
            while True:  # compare-and-swap loop on the vModel record
                current = await self.registry.get_vmodel(vmodel_id)
                if current is None:
                    raise ModelNotFound(vmodel_id, what="vModel", hint=SPLIT_FIRST)
                existing, revision = current
                _check_owner(existing, owner, caller)
                active = stable or existing.active_model_id
                record = _owned(replace(existing, split=split, sticky_header=header, failed=False,
                                        active_model_id=active,
                                        target_model_id=active,  # a pending transition is cancelled
                                        auto_delete=existing.auto_delete or bool(created),
                                        created_models=(*existing.created_models, *created),
                                        updated_ms=int(self.clock() * 1000)))
                if await self.registry.put_vmodel(record, expected_revision=revision, previous=existing):
                    log.info("vModel traffic split set", vmodel_id=vmodel_id, sticky_header=header,
                             split={t.model_id: t.weight for t in split}, registered=created)
                    await self._drop_orphans(existing, record)
                    break
                for t in split:  # lost the transaction: a target unregistered meanwhile is NOT_FOUND
                    await self._target_still_registered(t.model_id)
        except BaseException:
            for model_id in created:  # registered for a split that was not set: not left behind
                with contextlib.suppress(Exception):
                    await self.registry.delete_model(model_id)
            raise
        for spec in specs:
            if not self._loaded(spec.model_id):
                try:
                    await self._ensure(spec, sync=sync, last_used_ms=int(self.clock() * 1000))
                except MeshError as exc:  # the split is set: the status returned tells of the failure
                    log.warning("cannot load split target", vmodel_id=vmodel_id, model_id=spec.model_id,
                                error=str(exc))
        return await self.vmodel_status(vmodel_id)

    async def promote_vmodel(self, vmodel_id: str, model_id: str = "", *, owner: str = "",
                             sync: bool = False) -> VModelStatus:
        """Make one target of a split vModel its sole target, with ``set_vmodel``'s safe switch
        (the active model serves until the promoted one is loaded), and clear the split. Without
        ``model_id``: the canary, i.e. the one target that is not the active model."""
        check_model_id(vmodel_id)
        current = await self.registry.get_vmodel(vmodel_id)
        if current is None:
            raise ModelNotFound(vmodel_id, what="vModel")
        existing = current[0]
        _check_owner(existing, owner, current_caller())
        if not existing.split:
            raise FailedPrecondition(f"vModel {vmodel_id!r} has no traffic split to promote a target of")
        names = [t.model_id for t in existing.split]
        if model_id:
            if model_id not in names:
                raise InvalidArgument(f"model {model_id[:100]!r} is not a target of vModel {vmodel_id!r}'s split "
                                      f"({', '.join(names)})")
        else:
            canaries = [m for m in names if m != existing.active_model_id]
            if len(canaries) > 1:
                raise InvalidArgument(f"vModel {vmodel_id!r} splits among {len(canaries)} models besides its "
                                      f"active one ({', '.join(canaries)}): name the one to promote")
            model_id = canaries[0] if canaries else existing.active_model_id
        return await self.set_vmodel(vmodel_id, model_id, owner=owner, sync=sync)

    async def delete_vmodel(self, vmodel_id: str, owner: str = "") -> None:
        current = await self.registry.get_vmodel(vmodel_id)
        if current is None:
            return  # already gone: deleting is idempotent
        record, revision = current
        _check_owner(record, owner, current_caller(), deleting=True)
        if await self.registry.delete_vmodel(record, expected_revision=revision):
            log.info("vModel deleted", vmodel_id=vmodel_id)
            self.view.forget_vmodel(vmodel_id)  # do not count it as a referrer below
            await self._drop_orphans(record, None)

    async def drive_transitions(self) -> None:
        """Advance pending vModel transitions, and keep split targets that get traffic loaded; run
        periodically by every router."""
        now = self.clock()
        for record in list(self.view.vmodels.values()):
            for t in record.split:  # a canary evicted while idle is loaded again before its next share
                # Not one of weight 0: it gets no share, and reloading it on every router would pin
                # it outside the max_pinned_copies quota; a request naming it loads it on demand.
                if t.weight and not self.view.copies(t.model_id) and not load_failed(self.view, t.model_id):
                    await self._load_target(t.model_id, now)
            if record.active_model_id == record.target_model_id:
                continue
            target = record.target_model_id
            if self._loaded(target):
                current = await self.registry.get_vmodel(record.vmodel_id)
                if current is None or current[0].target_model_id != target:
                    continue
                flipped = _owned(replace(current[0], active_model_id=target, failed=False,
                                         updated_ms=int(now * 1000)))
                if await self.registry.put_vmodel(flipped, expected_revision=current[1], previous=current[0]):
                    log.info("vModel switched to its loaded target", vmodel_id=record.vmodel_id,
                             model_id=target)
                    await self._drop_orphans(current[0], flipped)
                continue
            if load_failed(self.view, target):
                if not record.failed:
                    current = await self.registry.get_vmodel(record.vmodel_id)
                    if current is not None and current[0].target_model_id == target:
                        await self.registry.put_vmodel(replace(current[0], failed=True),
                                                       expected_revision=current[1], previous=current[0])
                continue
            if not self.view.copies(target):
                await self._load_target(target, now)

    async def _load_target(self, target: str, now: float) -> None:
        """Start a load of a vModel's target, at most every 10 s per target."""
        if now - self._last_ensure.get(target, 0) <= 10:
            return
        if len(self._last_ensure) > 10_000:  # old targets: keep only the recent attempts
            self._last_ensure = {t: at for t, at in self._last_ensure.items() if now - at <= 10}
        self._last_ensure[target] = now
        spec = await self.registry.get_model(target)
        if spec is not None:
            try:
                await self._ensure(spec, sync=False, last_used_ms=int(now * 1000))
            except Exception as exc:
                log.warning("cannot load vModel target", model_id=target, error=str(exc))

    async def run_transitions(self, interval_s: float = 1.0) -> None:
        """Root task: drive transitions forever."""
        while True:
            try:
                await self.drive_transitions()
            except Exception as exc:
                log.warning("driving vModel transitions failed; will retry", error=str(exc))
            await asyncio.sleep(interval_s)

