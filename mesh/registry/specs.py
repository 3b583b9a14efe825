"""On-demand lookup of model registrations, cached, and kept fresh by a watch.

Routers and runtimes must not hold every registration in memory (there may be millions); they
need the ones they route or load. ``SpecCache`` fetches a registration on first use and keeps up
to ``max_entries`` of them (LRU, negative answers included so that a flood of requests for an
unknown model does not become a flood of registry reads). The watch on the ``models/`` prefix
keeps cached entries current: an event's value replaces the cached one. The watch delivers events
only; nothing is stored for models that were never looked up. After a watch reset (compaction)
the whole cache is dropped, since any entry might be stale. A process that writes a registration
(the router) or is handed one (a runtime, by the router on a cold request) primes the cache with
it, so the first request for a new model needs no registry read.

Subscribers (the runtime) are told about every change to a registration, so that a loaded copy
of a model that was unregistered or redefined can be unloaded.

A runtime needs only the deletions (``deletes_only``): a registration is created once and never
rewritten in place (redefining one is unregistering it and registering it again), so the store
filters creations out (etcd's NOPUT) and a registration of a model the runtime does not hold
costs it nothing. Without creations in the watch, nothing would correct a cached "not registered",
so a runtime's ``get`` never answers from one: it reads the registry again (a router sends a
runtime only models it found registered, so this is the rare path). What it keeps, for
``NEGATIVE_TTL_S``, is that a model was just deleted, so that a router with a stale cache cannot
hand it the old registration (``prime``) in that moment.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import cachetools
import structlog

from mesh.errors import BadRecord
from mesh.registry.base import EventType, KVStore, WatchReset
from mesh.registry.keys import Keys
from mesh.registry.records import ModelSpec
from mesh.registry.registry import Registry

log = structlog.get_logger(__name__)

_MISSING = object()
# deletes_only: how long a deletion keeps a handed-over registration out (a router's watch may lag
# that long behind an unregistration and a new registration of the same ID; its readiness goes first)
NEGATIVE_TTL_S = 60.0


class SpecCache:
    def __init__(self, registry: Registry, max_entries: int = 10_000, *, deletes_only: bool = False) -> None:
        self._registry = registry
        self._store: KVStore = registry.store
        self._keys: Keys = registry.keys
        self._cache: cachetools.LRUCache[str, object] = cachetools.LRUCache(maxsize=max_entries)
        self._inflight: dict[str, asyncio.Future[ModelSpec | None]] = {}
        self._listeners: list[Callable[[str, ModelSpec | None], None]] = []
        self._reset_listeners: list[Callable[[], None]] = []
        self._start_revision = 0
        self._generation = 0  # bumped on every change, so a lookup racing a change is not cached
        self._deletes_only = deletes_only

    def subscribe(self, on_change: Callable[[str, ModelSpec | None], None],
                  on_reset: Callable[[], None] | None = None) -> None:
        """``on_change(model_id, new_spec_or_None)`` on every change seen by the watch;
        ``on_reset()`` when the watch lost history and every registration may have changed."""
        self._listeners.append(on_change)
        if on_reset is not None:
            self._reset_listeners.append(on_reset)

    async def start(self) -> None:
        """Fix the revision the watch starts from; call before the first ``get``."""
        # Not get_prefix(models, limit=1): etcd would count every registration to answer it.
        self._start_revision = await self._store.current_revision(self._keys.models) + 1

    async def run(self) -> None:
        """The watch loop: a root task of its process (it ends only by cancellation)."""
        # After a compaction only the cache is dropped: no relist of every registration.
        async for event in self._store.watch_prefix(self._keys.models, start_revision=self._start_revision,
                                                      snapshot_on_reset=False, deletes_only=self._deletes_only):
            if isinstance(event, WatchReset):
                self._generation += 1
                self._cache.clear()
                for reset_listener in self._reset_listeners:
                    reset_listener()
                continue
            model_id = Keys.model_id_of(event.key, self._keys.models)
            try:
                spec = ModelSpec.from_json(event.value) if event.type is EventType.PUT else None
            except BadRecord as exc:
                # Not this process's to fix, and no reason to stop: forget the model (a copy
                # loaded here goes); a request for it reads the record and gets the reason.
                log.warning("malformed registration skipped", model_id=model_id[:200], reason=exc.message)
                spec = None
            self._invalidate(model_id, spec)

    def peek(self, model_id: str) -> ModelSpec | None:
        """The cached spec, without a registry read (None if unknown or not cached)."""
        value = self._cache.get(model_id, _MISSING)
        return value if isinstance(value, ModelSpec) else None

    def _absent(self) -> object:
        """What the cache holds for a model not registered: None, or (deletes_only) until when."""
        return time.monotonic() + NEGATIVE_TTL_S if self._deletes_only else None

    async def get(self, model_id: str) -> ModelSpec | None:
        value = self._cache.get(model_id, _MISSING)
        if isinstance(value, float):
            value = _MISSING  # deletes_only: "not registered" is never answered from the cache
        if value is not _MISSING:
            return value if isinstance(value, ModelSpec) else None
        pending = self._inflight.get(model_id)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[ModelSpec | None] = asyncio.get_running_loop().create_future()
        self._inflight[model_id] = future
        generation = self._generation
        try:
            spec = await self._registry.get_model(model_id)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, no "never retrieved" warning
            raise
        finally:
            self._inflight.pop(model_id, None)
        if generation == self._generation:
            self._cache[model_id] = spec if spec is not None else self._absent()
        future.set_result(spec)
        return spec

    def prime(self, spec: ModelSpec, *, replace: bool = True) -> None:
        """Cache a registration this process just wrote or was handed (no registry read)."""
        held = self._cache.get(spec.model_id, _MISSING)
        if replace or held is _MISSING or (isinstance(held, float) and held < time.monotonic()):
            self._cache[spec.model_id] = spec

    def _invalidate(self, model_id: str, spec: ModelSpec | None) -> None:
        self._generation += 1
        # The event carries the new value: keep a cached entry current instead of dropping it, so
        # that a model in use is not read again (and a primed entry survives its own write's event).
        # A runtime's (deletes_only) remembers a deletion even of a model it had not looked up, for
        # a while: a router with a stale cache may hand it the old registration just after.
        if model_id in self._cache or (spec is None and self._deletes_only):
            self._cache[model_id] = spec if spec is not None else self._absent()
        for listener in self._listeners:
            try:
                listener(model_id, spec)
            except Exception:
                log.exception("spec listener failed", model_id=model_id)
