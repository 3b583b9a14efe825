"""Single registrations that arrive together share one store round trip (mesh.registry.coalescer),
and each caller still gets its own answer, as ``Registry.register_model`` would give it."""

from __future__ import annotations

import asyncio

import pytest

from mesh.errors import AlreadyExists, BadRecord, RegistryUnavailable
from mesh.registry.coalescer import RegistrationCoalescer
from mesh.registry.memory import MemoryStore
from mesh.registry.records import GraphRecord, ModelSpec
from mesh.registry.registry import Registry


def spec(model_id: str, path: str = "/m.joblib", **kw: object) -> ModelSpec:
    return ModelSpec(model_id, "sklearn", path=path, **kw)  # type: ignore[arg-type]


async def test_concurrent_registrations_share_a_send_and_each_gets_its_answer() -> None:
    registry = Registry(MemoryStore())
    await registry.register_model(spec("taken", path="/other.joblib"))
    await registry.register_model(spec("same", registered_ms=5))  # registered before, at another time
    await registry.put_graph(GraphRecord("a-graph", {"nodes": {"root": {"routerType": "Sequence", "steps": [
        {"serviceName": "x"}]}}}), expected_revision=None)
    coalescer = RegistrationCoalescer(registry)
    asked = [spec(f"m{i}", min_copies=1 if i == 3 else 0) for i in range(40)]
    results = await asyncio.gather(*(coalescer.register(s) for s in asked),
                                   coalescer.register(spec("taken")), coalescer.register(spec("same")),
                                   coalescer.register(spec("a-graph")), return_exceptions=True)
    assert coalescer.batches == 1 and coalescer.items == 43
    assert results[:40] == [(s, True) for s in asked]
    taken, same, graph = results[40:]
    assert isinstance(taken, AlreadyExists) and "different definition" in taken.message
    assert same == (spec("same", registered_ms=5), False)  # the registration there, not created
    assert isinstance(graph, AlreadyExists) and "already an inference graph's ID" in graph.message
    assert [s.model_id for s in await registry.list_models()] == sorted([*(s.model_id for s in asked), "same", "taken"])
    assert await registry.pinned_models() == {"m3": 1}  # the pin index, in the same transaction


async def test_what_arrives_during_a_send_goes_in_the_next_and_one_id_twice_is_sent_twice() -> None:
    registry = Registry(MemoryStore())
    coalescer = RegistrationCoalescer(registry)
    first = asyncio.ensure_future(coalescer.register(spec("a")))
    await asyncio.sleep(0)  # the first send is out
    # (a repeat is a later call: its registration time differs, or it would count as a re-send of the same write)
    later = [asyncio.ensure_future(coalescer.register(spec(m, registered_ms=i))) for i, m in enumerate("bca")]
    assert await first == (spec("a"), True)
    assert [await t for t in later] == [(spec("b", registered_ms=0), True), (spec("c", registered_ms=1), True),
                                        (spec("a"), False)]
    assert coalescer.batches == 2  # "a" again went after its first answer: one batch never holds a key twice
    dup = [asyncio.ensure_future(coalescer.register(spec("d", registered_ms=i))) for i in range(2)]
    assert [await t for t in dup] == [(spec("d"), True), (spec("d"), False)]
    assert coalescer.batches == 4


async def test_a_failed_send_fails_its_callers_only_and_the_next_send_works(monkeypatch: pytest.MonkeyPatch) -> None:
    registry = Registry(MemoryStore())
    coalescer = RegistrationCoalescer(registry)
    real = registry.register_models

    async def down(specs: list[ModelSpec]) -> list[object]:
        raise RegistryUnavailable("registry memory:// unavailable: down for the test")

    monkeypatch.setattr(registry, "register_models", down)
    failed = await asyncio.gather(*(coalescer.register(spec(f"m{i}")) for i in range(3)), return_exceptions=True)
    assert all(isinstance(f, RegistryUnavailable) and "down for the test" in f.message for f in failed)
    monkeypatch.setattr(registry, "register_models", real)
    assert await coalescer.register(spec("m0")) == (spec("m0"), True)


async def test_a_caller_gone_before_the_send_writes_nothing() -> None:
    registry = Registry(MemoryStore())
    coalescer = RegistrationCoalescer(registry)
    busy = asyncio.ensure_future(coalescer.register(spec("first")))
    await asyncio.sleep(0)
    gone = asyncio.ensure_future(coalescer.register(spec("gone")))
    await asyncio.sleep(0)
    gone.cancel()
    kept = asyncio.ensure_future(coalescer.register(spec("kept")))
    assert await busy == (spec("first"), True) and await kept == (spec("kept"), True)
    assert await registry.get_model("gone") is None


async def test_a_queued_callers_cancellation_is_not_anothers_failure() -> None:
    # A client's deadline passes while its registration waits behind the send out; its retry for the
    # same ID must not inherit that cancellation (review finding).
    registry = Registry(MemoryStore())
    coalescer = RegistrationCoalescer(registry)
    out = asyncio.ensure_future(coalescer.register(spec("first")))
    await asyncio.sleep(0)  # its send is out: what follows is queued
    waiting = asyncio.ensure_future(coalescer.register(spec("x")))
    await asyncio.sleep(0)
    retry = asyncio.ensure_future(coalescer.register(spec("x", registered_ms=1)))
    await asyncio.sleep(0)
    waiting.cancel()
    assert await out == (spec("first"), True)
    assert await retry == (spec("x", registered_ms=1), True)


async def test_a_malformed_record_fails_its_own_item_only() -> None:
    store = MemoryStore()
    registry = Registry(store)
    await store.put(registry.keys.model("corrupt"), b"{not json")
    coalescer = RegistrationCoalescer(registry)
    good, corrupt = await asyncio.gather(coalescer.register(spec("good")), coalescer.register(spec("corrupt")),
                                         return_exceptions=True)
    assert good == (spec("good"), True)
    assert isinstance(corrupt, BadRecord) and "not valid JSON" in corrupt.message
