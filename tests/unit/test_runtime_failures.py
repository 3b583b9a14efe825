"""A runtime's memory of its recent load failures (mesh.runtime.failures), on an injected clock."""

from __future__ import annotations

import asyncio
import dataclasses
from concurrent.futures import ThreadPoolExecutor

import pytest

from mesh.errors import DeadlineExceeded, ModelLoadError, ResourceExhausted
from mesh.registry.records import ModelSpec
from mesh.runtime.cache import DeviceBudget
from mesh.runtime.failures import RecentFailures, RememberingCache
from placement.registry import make_policy

SPEC = ModelSpec(model_id="m", type="sklearn", path="/models/m", registered_ms=1)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_failure_is_answered_from_memory_until_it_expires() -> None:
    clock = Clock()
    failures = RecentFailures(10, clock)
    failures.record(SPEC, ModelLoadError("model 'm' failed to load: bad pickle"))
    clock.now += 4
    with pytest.raises(ModelLoadError, match=r"bad pickle \(failed here 4\.0 s ago; not retried .* 6\.0 s more"):
        failures.check(SPEC)
    clock.now += 6
    failures.check(SPEC)  # expired: the load may be tried again


def test_a_new_definition_or_registration_is_tried_at_once() -> None:
    failures = RecentFailures(10, Clock())
    failures.record(SPEC, DeadlineExceeded("load took too long"))
    failures.check(dataclasses.replace(SPEC, path="/models/fixed"))
    failures.record(SPEC, ModelLoadError("bad"))
    failures.check(dataclasses.replace(SPEC, registered_ms=2))
    failures.record(SPEC, ModelLoadError("bad"))
    failures.forget("m")
    failures.check(SPEC)


def test_failures_of_the_moment_and_a_zero_ttl_are_not_remembered() -> None:
    failures = RecentFailures(10, Clock())
    failures.record(SPEC, ResourceExhausted("no room"))
    failures.check(SPEC)
    off = RecentFailures(0, Clock())
    off.record(SPEC, ModelLoadError("bad"))
    off.check(SPEC)


async def test_the_cache_loads_a_bad_model_once_per_ttl_and_names_it() -> None:
    clock = Clock()
    calls: list[str] = []

    def load(spec: ModelSpec, device: str) -> object:
        calls.append(spec.model_id)
        raise ModelLoadError("sklearn: cannot load /models/m/model.joblib: KeyError: 0")

    with ThreadPoolExecutor(2) as pool:
        cache = RememberingCache(
            failures=RecentFailures(10, clock), budgets=[DeviceBudget("ram", 10_000, make_policy("lru"))],
            load_fn=load, predict_size=lambda s, d: 100, observe_size=lambda s, d, n: None,
            choose_device=lambda s, b, p: "ram", executor=pool, max_concurrent_loads=2, load_timeout_s=5,
            clock=clock, rss=lambda: 0)
        for _ in range(2):
            results = await asyncio.gather(*(cache.acquire(SPEC) for _ in range(5)), return_exceptions=True)
            for result in results:
                assert isinstance(result, ModelLoadError)
                assert result.message.startswith("model 'm' failed to load: sklearn: cannot load"), result
        assert calls == ["m"]  # one load; the rest joined it or were answered from memory
        clock.now += 10
        with pytest.raises(ModelLoadError):
            await cache.acquire(SPEC)
        assert calls == ["m", "m"]  # expired: tried again
