"""The registration cache of routers and runtimes (mesh.registry.specs) over the memory store.

A runtime's cache watches deletions only: registrations of models it does not hold cost it no
event, so a "not registered" answer may not be kept (nothing would correct it): it lasts
``NEGATIVE_TTL_S``. A router's watches every change and keeps its answers until one comes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from mesh.registry import specs as specs_module
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


async def test_a_runtime_cache_hears_only_deletions_and_forgets_a_miss_after_its_ttl(
        monkeypatch: pytest.MonkeyPatch) -> None:
    registry = Registry(MemoryStore())
    cache = SpecCache(registry, deletes_only=True)
    heard: list[tuple[str, ModelSpec | None]] = []
    cache.subscribe(lambda model_id, spec: heard.append((model_id, spec)))
    async with running(cache):
        assert await cache.get("m") is None  # not registered yet: a miss, kept a while
        await registry.register_model(ModelSpec("m", "sklearn", path="/a"))
        await registry.register_model(ModelSpec("other", "sklearn", path="/b"))
        await asyncio.sleep(0.1)
        assert heard == []  # registrations are not events for a runtime
        assert await cache.get("m") is None  # the miss is still believed
        monkeypatch.setattr(specs_module, "NEGATIVE_TTL_S", 0.0)
        cache._cache.clear()  # the next miss expires at once
        assert await cache.get("nothing") is None
        assert (await cache.get("m")) == ModelSpec("m", "sklearn", path="/a")
        # a router hands the runtime a spec: it does not replace a live registration's
        cache.prime(ModelSpec("m", "sklearn", path="/stale"), replace=False)
        assert cache.peek("m") == ModelSpec("m", "sklearn", path="/a")
        await registry.delete_model("m")
        await settle(lambda: heard == [("m", None)])
        assert cache.peek("m") is None
        # a stale spec handed over right after the deletion is not taken while the deletion is fresh
        monkeypatch.setattr(specs_module, "NEGATIVE_TTL_S", 60.0)
        await registry.delete_model("other")
        await settle(lambda: len(heard) == 2)
        cache.prime(ModelSpec("other", "sklearn", path="/b"), replace=False)
        assert await cache.get("other") is None


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
