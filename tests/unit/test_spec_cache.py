"""The registration cache of routers and runtimes (mesh.registry.specs) over the memory store.

A runtime's cache watches deletions only: registrations of models it does not hold cost it no
event, so a "not registered" answer is never given from memory (nothing would correct it). A
router's watches every change and keeps its answers until one comes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from mesh.registry.memory import MemoryStore
from mesh.registry.records import ModelSpec
from mesh.registry.registry import Registry
from mesh.registry.specs import SpecCache


@contextlib.asynccontextmanager
async def running(cache: SpecCache) -> AsyncIterator[SpecCache]:
    await cache.start()
    task = asyncio.create_task(cache.run())
    try:
        yield cache
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def settle(condition, within_s: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(within_s):
        while not condition():  # noqa: ASYNC110 (the cache's state, which its watch task changes)
            await asyncio.sleep(0.01)


async def test_a_runtime_cache_hears_only_deletions_and_never_answers_a_miss_from_memory(
        monkeypatch: pytest.MonkeyPatch) -> None:
    registry = Registry(MemoryStore())
    cache = SpecCache(registry, deletes_only=True)
    heard: list[tuple[str, ModelSpec | None]] = []
    cache.subscribe(lambda model_id, spec: heard.append((model_id, spec)))
    reads: list[str] = []
    real_get = registry.get_model

    async def counted(model_id: str) -> ModelSpec | None:
        reads.append(model_id)
        return await real_get(model_id)

    monkeypatch.setattr(registry, "get_model", counted)
    async with running(cache):
        assert await cache.get("m") is None  # not registered yet
        spec = ModelSpec("m", "sklearn", path="/a")
        await registry.register_model(spec)
        await registry.register_model(ModelSpec("other", "sklearn", path="/b"))
        await asyncio.sleep(0.1)
        assert heard == []  # registrations are not events for a runtime
        assert await cache.get("m") == spec  # the earlier miss was not believed: read again
        assert reads == ["m", "m"]
        assert await cache.get("m") == spec and reads == ["m", "m"]  # a registration is cached
        # a router hands the runtime a spec: it does not replace a live registration's
        cache.prime(ModelSpec("m", "sklearn", path="/stale"), replace=False)
        assert cache.peek("m") == spec
        await registry.delete_model("m")
        await settle(lambda: heard == [("m", None)])
        assert cache.peek("m") is None
        # Just after a deletion (even of a model never looked up here), a registration handed over
        # by a router with a stale cache is not taken: the next lookup reads the registry.
        await registry.delete_model("other")
        await settle(lambda: len(heard) == 2)
        cache.prime(ModelSpec("other", "sklearn", path="/b"), replace=False)
        assert cache.peek("other") is None and await cache.get("other") is None
        # Unregistered and registered again at once (a controller redefining a model): found.
        again = ModelSpec("m", "sklearn", path="/new")
        await registry.register_model(again)
        assert await cache.get("m") == again


async def test_a_router_cache_follows_registrations_and_keeps_a_miss_until_one_comes() -> None:
    registry = Registry(MemoryStore())
    cache = SpecCache(registry)
    heard: list[tuple[str, ModelSpec | None]] = []
    cache.subscribe(lambda model_id, spec: heard.append((model_id, spec)))
    async with running(cache):
        assert await cache.get("m") is None
        spec = ModelSpec("m", "sklearn", path="/a")
        await registry.register_model(spec)
        await settle(lambda: heard == [("m", spec)])
        assert cache.peek("m") == spec  # the event corrected the cached miss
