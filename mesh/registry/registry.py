"""Typed access to the registry tables (models, vModels, instances, placements, failures).

A thin layer over :class:`~mesh.registry.base.KVStore`: it owns the key layout and the record
encoding, so that the router, runtime and controller never build keys or JSON themselves.
Compare-and-swap loops live with their callers, which know what a conflict means.
"""

from __future__ import annotations

from dataclasses import dataclass

from mesh.errors import AlreadyExists, FailedPrecondition, MeshError, Unavailable
from mesh.registry.base import Compare, Create, KeyValue, KVStore, Lease, Op
from mesh.registry.keys import Keys
from mesh.registry.records import CRASH, FailureRecord, GraphRecord, ModelSpec, PlacementRecord, VModelRecord


@dataclass(frozen=True)
class Registered:
    """One item of :meth:`Registry.register_models`: the registration now in the registry (ours, or
    the same definition found there) and whether this call ``created`` it at ``revision``; or
    ``error`` (ALREADY_EXISTS, or the registry could not say whether it was written)."""

    spec: ModelSpec | None
    created: bool = False
    revision: int = 0
    error: MeshError | None = None


def _taken(spec: ModelSpec, existing: ModelSpec) -> AlreadyExists:
    return AlreadyExists(
        f"model {spec.model_id!r} is already registered with a different definition "
        f"(type={existing.type!r}, path={existing.path!r}); unregister it first or use a new ID")


def graph_clash(id_: str, what: str) -> AlreadyExists:
    return AlreadyExists(f"{what} ID {id_!r} is already an inference graph's ID; a request naming it could "
                         "not tell which is meant: choose another ID (or delete the graph)")


class Registry:
    def __init__(self, store: KVStore, prefix: str = "/mesh/") -> None:
        self.store = store
        self.keys = Keys(prefix)

    # --- models -------------------------------------------------------------------------------
    async def get_model(self, model_id: str) -> ModelSpec | None:
        kv = await self.store.get(self.keys.model(model_id))
        return ModelSpec.from_json(kv.value) if kv else None

    async def register_model(self, spec: ModelSpec, *, graph_free: bool = False) -> tuple[ModelSpec, bool]:
        """Create the registration; (existing, False) if the same definition is already there.

        One transaction: the model's key absent (and with ``graph_free``, no inference graph of the
        same ID: the check rides along instead of costing a read of its own), then the registration
        and its pin index written together.

        Raises AlreadyExists when the ID is taken by a different definition (ModelMesh's rule), or
        (``graph_free``) by an inference graph.
        """
        key = self.keys.model(spec.model_id)
        compares = [Compare("absent", key)]
        if graph_free:
            compares.append(Compare("absent", self.keys.graph(spec.model_id)))
        ops = [Op("put", key, spec.to_json())]
        if spec.min_copies > 0:
            ops.append(Op("put", self.keys.pin(spec.model_id), str(spec.min_copies).encode()))
        while True:
            if await self.store.txn(compares, ops):
                return spec, True
            kv = await self.store.get(key)
            if kv is None:
                if graph_free and await self.get_graph(spec.model_id) is not None:
                    raise graph_clash(spec.model_id, "model")
                continue  # deleted between our transaction and the read: try again
            existing = ModelSpec.from_json(kv.value)
            if existing.same_definition(spec):
                await self._index_pin(existing)  # repairs an index write lost to a crash
                return existing, False
            raise _taken(spec, existing)

    async def register_models(self, specs: list[ModelSpec]) -> list[Registered]:
        """Register many models (distinct IDs), grouped into few store round trips
        (``KVStore.create_many``), with ``register_model``'s rules per item, and one more: an ID
        that is an inference graph's is refused (ALREADY_EXISTS) in the same transaction as the
        write, where one-by-one registration checks it just before. The pin index is written in
        the same transaction as the registration. Not atomic across items (``undo`` removes what
        a call created).

        An item found with exactly the bytes this call wrote (a round trip sent again after a lost
        answer: ``create_many``) counts as created: the bytes hold the registration time to the
        millisecond, so they are this call's own."""
        items = [Create(self.keys.model(s.model_id), s.to_json(), absent=(self.keys.graph(s.model_id),),
                        also=((self.keys.pin(s.model_id), str(s.min_copies).encode()),) if s.min_copies > 0 else ())
                 for s in specs]
        answers = await self.store.create_many(items)
        out: list[Registered] = []
        for spec, item, answer in zip(specs, items, answers, strict=True):
            if answer.error is not None:
                out.append(Registered(None, error=answer.error))
            elif answer.created:
                out.append(Registered(spec, True, answer.revision))
            elif answer.existing is not None and answer.existing.value == item.value:
                out.append(Registered(spec, True, answer.existing.mod_revision))
            elif answer.existing is not None:
                try:  # one item's trouble (a malformed record, a pin not written) is its own answer
                    existing = ModelSpec.from_json(answer.existing.value)
                    if existing.same_definition(spec):
                        await self._index_pin(existing)  # repairs an index write lost to a crash
                        out.append(Registered(existing))
                    else:
                        out.append(Registered(None, error=_taken(spec, existing)))
                except MeshError as exc:
                    out.append(Registered(None, error=exc))
            elif answer.blocker:
                out.append(Registered(None, error=graph_clash(spec.model_id, "model")))
            else:  # not written, yet nothing in the way: unregistered and re-registered meanwhile?
                out.append(Registered(None, error=Unavailable(f"model {spec.model_id!r}: the registry did not "
                                                              "write it and gave no reason; register it again")))
        return out

    async def undo(self, spec: ModelSpec, revision: int) -> bool:
        """Delete a registration this call created at ``revision`` (and its pin), unless it changed
        since: an all-or-nothing batch that could not be written whole."""
        key = self.keys.model(spec.model_id)
        return await self.store.txn([Compare("mod_revision", key, revision)],
                                    [Op("delete", self.keys.pin(spec.model_id)), Op("delete", key)])

    async def undo_if_written(self, spec: ModelSpec) -> bool:
        """Undo a registration whose write went unanswered (it may have been applied): delete it if
        the registry holds exactly this call's bytes (they carry its registration time to the ms)."""
        kv = await self.store.get(self.keys.model(spec.model_id))
        if kv is None or kv.value != spec.to_json():
            return False
        return await self.undo(spec, kv.mod_revision)

    async def delete_model(self, model_id: str) -> bool:
        """Delete the registration unless a vModel refers to it (FailedPrecondition naming them),
        in one transaction with that check (module ``keys``: ``refs/``); False if it was absent."""
        key = self.keys.model(model_id)
        deleted = await self.store.txn(
            [Compare("present", key), Compare("prefix_empty", self.keys.refs_of(model_id))],
            [Op("delete", self.keys.pin(model_id)), Op("delete", key)])
        if deleted:
            return True
        if await self.store.get(key) is None:
            return False
        referrers = await self.referrers(model_id)
        raise FailedPrecondition(f"model {model_id!r} is used by vModel(s) {', '.join(referrers[:10])}; "
                                 "delete or retarget them first")

    async def referrers(self, model_id: str) -> list[str]:
        """The vModels that refer to ``model_id`` (from the refs index)."""
        kvs, _ = await self.store.get_prefix(self.keys.refs_of(model_id))
        return [Keys.model_id_of(kv.key, self.keys.refs_of(model_id)) for kv in kvs]

    async def _index_pin(self, spec: ModelSpec) -> None:
        if spec.min_copies > 0:
            await self.store.put(self.keys.pin(spec.model_id), str(spec.min_copies).encode())

    async def pinned_models(self) -> dict[str, int]:
        """Model ID -> min copies, for every model registered with ``min_copies > 0``."""
        kvs, _ = await self.store.get_prefix(self.keys.pinned)
        return {Keys.model_id_of(kv.key, self.keys.pinned): int(kv.value) for kv in kvs}

    async def list_models(self, *, prefix: str = "", limit: int = 0,
                          start_after: str = "") -> list[ModelSpec]:
        from mesh.registry.keys import _enc  # same encoding as the keys themselves

        kvs, _ = await self.store.get_prefix(
            self.keys.models + _enc(prefix), limit=limit,
            start_after=self.keys.model(start_after) if start_after else "")
        return [ModelSpec.from_json(kv.value) for kv in kvs]

    async def count_models(self) -> int:
        """Registered models, counted by the store without reading them. The router counts every
        30 s; paging through 100,000 registrations took 1.5 s of etcd time and 0.2 s of router CPU
        each time (ten times that at a million), a count-only read takes 30 ms."""
        return await self.store.count_prefix(self.keys.models)

    # --- vModels ------------------------------------------------------------------------------
    async def get_vmodel(self, vmodel_id: str) -> tuple[VModelRecord, int] | None:
        """The record and its mod_revision (for compare-and-swap)."""
        kv = await self.store.get(self.keys.vmodel(vmodel_id))
        return (VModelRecord.from_json(kv.value), kv.mod_revision) if kv else None

    async def put_vmodel(self, record: VModelRecord, *, expected_revision: int | None,
                         previous: VModelRecord | None = None) -> bool:
        """Create (expected_revision None) or compare-and-swap the vModel record, with its refs
        (``previous``: the record it replaces, whose refs no longer needed are dropped), only if
        the models it refers to are registered: one transaction (module ``keys``)."""
        key = self.keys.vmodel(record.vmodel_id)
        now = record.models()  # split targets are referrers too
        before = previous.models() if previous else set()
        compares = [Compare("absent", key) if expected_revision is None
                    else Compare("mod_revision", key, expected_revision)]
        compares += [Compare("present", self.keys.model(m)) for m in sorted(now - before)]
        ops = [Op("put", key, record.to_json())]
        ops += [Op("put", self.keys.ref(m, record.vmodel_id)) for m in sorted(now)]
        ops += [Op("delete", self.keys.ref(m, record.vmodel_id)) for m in sorted(before - now)]
        return await self.store.txn(compares, ops)

    async def delete_vmodel(self, record: VModelRecord, *, expected_revision: int) -> bool:
        """Delete the vModel record and its refs, if it is still at ``expected_revision``."""
        ops = [Op("delete", self.keys.vmodel(record.vmodel_id))]
        ops += [Op("delete", self.keys.ref(m, record.vmodel_id))
                for m in sorted(record.models())]
        return await self.store.txn([Compare("mod_revision", self.keys.vmodel(record.vmodel_id), expected_revision)],
                                    ops)

    async def repair_refs(self) -> int:
        """Write the refs of every vModel whose refs are missing (written before the index
        existed); how many were written. Every router runs it at start, before it serves: the
        refs are listed once and only the missing ones written, so that a start with 10,000
        vModels costs two listings, not 10,000 etcd round trips."""
        present = {kv.key for kv in (await self.store.get_prefix(self.keys.refs))[0]}
        written = 0
        for vmodel in await self.list_vmodels():
            for m in vmodel.models():
                key = self.keys.ref(m, vmodel.vmodel_id)
                if key not in present and await self.store.create(key, b""):
                    written += 1
        return written

    async def list_vmodels(self) -> list[VModelRecord]:
        kvs, _ = await self.store.get_prefix(self.keys.vmodels)
        return [VModelRecord.from_json(kv.value) for kv in kvs]

    # --- inference graphs --------------------------------------------------------------------
    async def get_graph(self, graph_id: str) -> tuple[GraphRecord, int] | None:
        """The record and its mod_revision (for compare-and-swap)."""
        kv = await self.store.get(self.keys.graph(graph_id))
        return (GraphRecord.from_json(kv.value), kv.mod_revision) if kv else None

    async def put_graph(self, record: GraphRecord, *, expected_revision: int | None) -> bool:
        """Create (expected_revision None) or compare-and-swap the graph record."""
        key = self.keys.graph(record.graph_id)
        if expected_revision is None:
            return await self.store.create(key, record.to_json())
        return await self.store.replace(key, record.to_json(), expected_mod_revision=expected_revision)

    async def delete_graph(self, graph_id: str, *, expected_revision: int | None = None) -> bool:
        """Delete the graph record (conditionally); False if it was absent (or changed)."""
        return await self.store.delete(self.keys.graph(graph_id), expected_mod_revision=expected_revision)

    async def list_graphs(self, *, prefix: str = "", limit: int = 0, start_after: str = "") -> list[GraphRecord]:
        from mesh.registry.keys import _enc

        kvs, _ = await self.store.get_prefix(
            self.keys.graphs + _enc(prefix), limit=limit,
            start_after=self.keys.graph(start_after) if start_after else "")
        return [GraphRecord.from_json(kv.value) for kv in kvs]

    # --- placements and failures --------------------------------------------------------------
    async def placements_of(self, model_id: str) -> list[PlacementRecord]:
        kvs, _ = await self.store.get_prefix(self.keys.placements_of(model_id))
        return [PlacementRecord.from_json(kv.value) for kv in kvs]

    async def failures_of(self, model_id: str) -> list[FailureRecord]:
        kvs, _ = await self.store.get_prefix(self.keys.failures_of(model_id))
        return [FailureRecord.from_json(kv.value) for kv in kvs]

    async def put_failure(self, record: FailureRecord, lease: Lease) -> None:
        await self.store.put(self.keys.failure(record.model_id, record.instance_id),
                             record.to_json(), lease=lease)

    async def clear_failures(self, model_id: str, *, keep_crashes: bool = False) -> None:
        """Delete the model's load-failure records; ``keep_crashes``: not those of a runtime that
        died loading it (``CRASH``, the quarantine)."""
        if not keep_crashes:
            await self.store.delete_prefix(self.keys.failures_of(model_id))
            return
        for record in await self.failures_of(model_id):
            if record.kind != CRASH:
                await self.store.delete(self.keys.failure(model_id, record.instance_id))


def decode_spec(kv: KeyValue) -> ModelSpec:
    return ModelSpec.from_json(kv.value)
