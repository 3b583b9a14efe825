"""Bulk registration (``registerModels``): many registrations in one call, transport-neutral.

One call carries up to ``MAX_ITEMS`` items (and ``MAX_BYTES``, checked at the gRPC edge); a call
over either is refused whole, with INVALID_ARGUMENT, before anything is read or written. Each item
gets what ``registerModel`` gives one registration, and its own result:

1. **Checks, per item, before any write**: ``Management._spec`` (the ID, the bounds of every
   field, the path under the model roots), the caller's token (``Principal.check_model`` and
   ``check_source``: the checks the interceptor makes on a ``registerModel``; refused items are
   reported PERMISSION_DENIED and never written), an ID named twice in the call (the second is
   INVALID_ARGUMENT), an ID that is an inference graph's in this router's view.
2. **Quotas** (``max_models``, ``max_pinned_copies``), under the same per-token lock as one-by-one
   registration: the registrations the items would add are read in one grouped read
   (``KVStore.get_many``), and items are admitted in order while the quota allows; the others
   answer RESOURCE_EXHAUSTED. An item already registered with the same definition is free.
3. **Writes**: ``Registry.register_models``, which groups create-if-absent transactions (etcd:
   nested transactions, 128 items a round trip). Same definition already there: OK, not created;
   a different one, or a graph's ID: ALREADY_EXISTS.
4. **vModel items** (the controller's: ``setVModel`` with a model info, in bulk): once their model is
   registered, the vModel is set as ``setVModel`` sets it (owner rules, auto-delete of the models
   it created), a few at a time.

``all_or_nothing``: if any item fails its checks or quota, nothing is written and every other item
answers ABORTED. A write that then fails (another client took an ID meanwhile, the registry
unreachable) undoes the registrations the call created (each only if unchanged since), so none
of the batch stays; others may see them for that moment. vModel items cannot be all-or-nothing
(a vModel set cannot be undone safely): such a call is refused whole.

Throughput: the router spends its CPU per call and per round trip, not per item, so a batch of
1,000 costs about what a handful of single registrations cost (BENCHMARKS.md, loadtest
``scale --bulk``). One log line per call, not per item.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from mesh.auth import Principal, current_caller
from mesh.errors import Code, InvalidArgument, MeshError, ResourceExhausted, Unavailable
from mesh.ids import check_model_id
from mesh.registry.records import ModelSpec
from mesh.registry.registry import graph_clash
from mesh.router.management import Management, ModelInfoData, VModelStatus

log = structlog.get_logger(__name__)

MAX_ITEMS = 1_000
MAX_BYTES = 4 * 1024 * 1024  # of one call's request (router.max_message_bytes must be above it: 16 MiB)
VMODEL_CONCURRENCY = 32  # vModel items set at a time (each is a few registry round trips)
OK = "OK"


@dataclass(frozen=True)
class BulkItem:
    model_id: str
    info: ModelInfoData
    load_now: bool = False
    vmodel_id: str = ""  # also set this vModel to the model (setVModel's semantics)
    owner: str = ""
    auto_delete: bool = False


@dataclass
class BulkResult:
    index: int
    model_id: str
    code: str = OK  # a canonical status code's name (mesh.errors.Code), or OK
    message: str = ""  # why it failed; for an OK item, a warning (no runtime loads its type)
    created: bool = False
    vmodel: VModelStatus | None = None

    @property
    def ok(self) -> bool:
        return self.code == OK

    def fail(self, exc: MeshError) -> None:
        self.code, self.message, self.created = exc.code.value, exc.message, False


def _check_id(model_id: str, what: str) -> None:
    if not model_id:
        raise InvalidArgument(f"no {what} ID given")
    check_model_id(model_id, what)


class BulkRegistration:
    """``registerModels`` over a :class:`~mesh.router.management.Management` (its checks, quotas,
    registry and view)."""

    def __init__(self, management: Management) -> None:
        self.m = management

    async def register(self, items: Sequence[BulkItem], *, all_or_nothing: bool = False) -> list[BulkResult]:
        if len(items) > MAX_ITEMS:
            raise InvalidArgument(f"registerModels got {len(items):,} items; the limit is {MAX_ITEMS:,} a call "
                                  "(send several calls)")
        if all_or_nothing and any(item.vmodel_id for item in items):
            raise InvalidArgument("allOrNothing cannot be combined with items that set a vModel")
        caller = current_caller()
        results = [BulkResult(i, item.model_id) for i, item in enumerate(items)]
        specs: dict[int, ModelSpec] = {}
        seen: dict[str, int] = {}
        seen_vmodels: dict[str, int] = {}
        for i, item in enumerate(items):
            try:
                specs[i] = self._check(item, caller, seen, seen_vmodels, i)
            except MeshError as exc:
                results[i].fail(exc)
        if all_or_nothing and len(specs) < len(items):
            return _abort(results)
        if caller is not None and (caller.max_models or caller.max_pinned_copies):
            async with self.m._quota_locks.setdefault(caller.name, asyncio.Lock()):
                await self._quota(caller, specs, results)
                if all_or_nothing and len(specs) < len(items):
                    return _abort(results)
                await self._write(specs, results, all_or_nothing)
        else:
            await self._write(specs, results, all_or_nothing)
        await self._vmodels(items, specs, results)
        created = sum(r.created for r in results)
        log.info("models registered in bulk", items=len(items), created=created,
                 existing=sum(r.ok and not r.created for r in results), failed=sum(not r.ok for r in results))
        return results

    def _check(self, item: BulkItem, caller: Principal | None, seen: dict[str, int],
               seen_vmodels: dict[str, int], index: int) -> ModelSpec:
        """Step 1 of the module docstring, for one item: its spec, or the MeshError to report."""
        _check_id(item.model_id, "model")
        if item.model_id in seen:
            raise InvalidArgument(f"model {item.model_id[:100]!r} is also item {seen[item.model_id]} of this call; "
                                  "name each model once")
        seen[item.model_id] = index
        if item.vmodel_id:
            _check_id(item.vmodel_id, "vModel")
            if item.vmodel_id in seen_vmodels:
                raise InvalidArgument(f"vModel {item.vmodel_id[:100]!r} is also set by item "
                                      f"{seen_vmodels[item.vmodel_id]} of this call")
            seen_vmodels[item.vmodel_id] = index
        if caller is not None:  # what the interceptor checks on registerModel and setVModel
            caller.check_model(item.model_id)
            if item.vmodel_id:
                caller.check_model(item.vmodel_id, "vModel")
            caller.check_source(item.info.path, item.info.key, self.m.model_roots)
        spec = self.m._spec(item.model_id, item.info, load_now=item.load_now, last_used_ms=0)
        if item.model_id in self.m.view.graphs:  # the registry checks it again as it writes
            raise graph_clash(item.model_id, "model")
        return spec

    async def _quota(self, caller: Principal, specs: dict[int, ModelSpec], results: list[BulkResult]) -> None:
        """Step 2: admit items in order while the caller's quotas allow; refuse the others."""
        order = sorted(specs)
        found = await self.m.registry.store.get_many([self.m.registry.keys.model(specs[i].model_id) for i in order])
        registered = 0
        if caller.max_models:
            for prefix in caller.prefixes or ("",):
                registered += await self.m._count_under(prefix)
        pinned = 0
        if caller.max_pinned_copies:
            pinned = sum(c for model_id, c in (await self.m.registry.pinned_models()).items()
                         if caller.allows(model_id))
        for i, kv in zip(order, found, strict=True):
            spec = specs[i]
            if kv is not None:
                continue  # the same definition is free; a different one is ALREADY_EXISTS at the write
            if caller.max_models and registered >= caller.max_models:
                where = f"under its prefixes ({', '.join(caller.prefixes)})" if caller.prefixes else "in the mesh"
                results[i].fail(ResourceExhausted(
                    f"token {caller.name!r} may have at most {caller.max_models} models registered {where}; "
                    f"{registered} are or are being registered by this call (unregister some first)"))
                del specs[i]
                continue
            if caller.max_pinned_copies and spec.min_copies and pinned + spec.min_copies > caller.max_pinned_copies:
                results[i].fail(ResourceExhausted(
                    f"token {caller.name!r} may pin at most {caller.max_pinned_copies} copies (minCopies summed "
                    f"over its models); {pinned} are or are being pinned, and this registration asks for "
                    f"{spec.min_copies}"))
                del specs[i]
                continue
            registered += 1
            pinned += spec.min_copies

    async def _write(self, specs: dict[int, ModelSpec], results: list[BulkResult], all_or_nothing: bool) -> None:
        """Step 3; with ``all_or_nothing``, a write that fails undoes the call's own."""
        order = sorted(specs)
        asked = [specs[i] for i in order]
        answers = await self.m.registry.register_models(asked)
        for i, answer in zip(order, answers, strict=True):
            if answer.error is not None or answer.spec is None:
                results[i].fail(answer.error or InvalidArgument("not registered"))
                del specs[i]
            else:
                specs[i] = answer.spec
                results[i].created = answer.created
        if all_or_nothing and len(specs) < len(order):
            for i, mine, answer in zip(order, asked, answers, strict=True):
                try:
                    if answer.created and answer.spec is not None:
                        await self.m.registry.undo(answer.spec, answer.revision)
                    elif isinstance(answer.error, Unavailable):  # unanswered: it may have been written
                        await self.m.registry.undo_if_written(mine)
                except MeshError as exc:
                    log.warning("could not undo a registration of a failed all-or-nothing batch",
                                model_id=mine.model_id, error=exc.message)
                results[i].created = False
            specs.clear()
            _abort(results)
            return
        # Unlike registerModel, the router's spec cache is not primed: a batch of a thousand would
        # push out the specs of the models in use (their next request would read etcd again).
        for i, spec in specs.items():
            unservable = self.m._unservable(spec)
            if unservable:  # registered all the same, as registerModel does
                results[i].message = unservable

    async def _vmodels(self, items: Sequence[BulkItem], specs: dict[int, ModelSpec],
                       results: list[BulkResult]) -> None:
        """Step 4, and the loads asked for (``loadNow``) of the items that set no vModel."""
        gate = asyncio.Semaphore(VMODEL_CONCURRENCY)

        async def one(i: int) -> None:
            item, spec = items[i], specs[i]
            async with gate:
                try:
                    results[i].vmodel = await self.m.set_vmodel(
                        item.vmodel_id, item.model_id, owner=item.owner, info=item.info,
                        auto_delete=item.auto_delete, load_now=item.load_now,
                        registered=(spec, results[i].created))
                except MeshError as exc:
                    created = results[i].created  # the model stays registered, as with setVModel
                    results[i].fail(exc)
                    results[i].created = created

        await asyncio.gather(*(one(i) for i in specs if items[i].vmodel_id))
        for i, spec in specs.items():
            if items[i].load_now and not items[i].vmodel_id:
                try:
                    await self.m._ensure(spec, sync=False, last_used_ms=spec.last_used_ms)
                except MeshError as exc:  # registered; the load is the runtimes' business from here
                    results[i].message = results[i].message or exc.message


def _abort(results: list[BulkResult]) -> list[BulkResult]:
    """All or nothing: every item not failed on its own answers ABORTED, naming the first failure."""
    first = next((r for r in results if not r.ok and r.code != Code.ABORTED.value), None)
    because = f"item {first.index} ({first.model_id[:100]!r}) failed: {first.code}" if first else "the batch failed"
    for r in results:
        if r.ok:
            r.code, r.message, r.created = Code.ABORTED.value, f"not registered (allOrNothing): {because}", False
    return results


__all__ = ["MAX_BYTES", "MAX_ITEMS", "BulkItem", "BulkRegistration", "BulkResult"]
