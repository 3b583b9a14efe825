"""Capacity is never exceeded, whatever interleaves: a hypothesis property test drives the real
``ModelCache`` with concurrent requests, loads that complete (larger or smaller than predicted),
fail or are still in flight, copies in use, unloads in progress and evictions, and checks at every
single change of the counted bytes that they stay within the capacity.

The executor is a fake whose jobs (loads, closes) stay pending until a step of the test runs
them, so the interleaving is chosen by hypothesis and replays exactly (derandomized); the clock is
injected. Loaders report chosen sizes through ``footprint_bytes``; RSS reads 0.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, Future
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.errors import MeshError
from mesh.registry.records import ModelSpec
from mesh.runtime.cache import DeviceBudget, Entry, ModelCache, measured_size
from mesh.runtime.loaders.base import LoadedModel
from placement.registry import make_policy

CAPACITY = 1000
MODELS = [f"m{i}" for i in range(8)]


class CheckedBudget(DeviceBudget):
    """A device budget that records, at the assignment itself, any count outside [0, capacity]
    (recorded rather than raised: the cache would turn an exception into a failed load)."""

    violations: list[int]

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "used_bytes" and not 0 <= value <= self.capacity_bytes:
            self.__dict__.setdefault("violations", []).append(value)
        super().__setattr__(name, value)


class SizedModel(LoadedModel):
    def __init__(self, model_id: str, size: int) -> None:
        super().__init__(model_id=model_id, type="fake", device="ram", inputs=[], outputs=[])
        self.size = size

    def _predict(self, inputs: Mapping[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        return {}

    def footprint_bytes(self) -> int:
        return self.size

    def _release(self) -> None:
        pass


class StepExecutor(Executor):
    """Jobs wait until the test runs them (``run``), in an order the test chooses."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        self.jobs.append((future, fn, args))
        return future

    def run(self, index: int) -> None:
        future, fn, args = self.jobs.pop(index % len(self.jobs))
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # handed to the awaiting coroutine
            future.set_exception(exc)


steps = st.lists(st.one_of(
    st.tuples(st.just("request"), st.sampled_from(MODELS)),
    st.tuples(st.just("run"), st.integers(0, 50)),
    st.tuples(st.just("done"), st.integers(0, 50)),
    st.tuples(st.just("unload"), st.sampled_from(MODELS)),
    st.tuples(st.just("tick"), st.just("")),
), min_size=1, max_size=60)
# Per model: predicted size, measured size (up to 1.5 x the capacity: some never fit), load fails.
models = st.fixed_dictionaries({m: st.tuples(st.integers(1, 600), st.integers(1, 1500), st.booleans())
                                for m in MODELS})


async def _scenario(plan: list[tuple[str, Any]], sizes: dict[str, tuple[int, int, bool]]) -> None:
    now = [1000.0]
    budget = CheckedBudget("ram", CAPACITY, make_policy("lru"))
    executor = StepExecutor()

    def load(spec: ModelSpec, device: str) -> LoadedModel:
        _, actual, fails = sizes[spec.model_id]
        if fails:
            raise RuntimeError("corrupt model file")
        return SizedModel(spec.model_id, actual)

    cache = ModelCache(budgets=[budget], load_fn=load, predict_size=lambda s, d: sizes[s.model_id][0],
                       observe_size=lambda s, d, n: None, choose_device=lambda s, b, p: "ram",
                       executor=executor, max_concurrent_loads=2, load_timeout_s=30.0,
                       clock=lambda: now[0], rss=lambda: 0)
    requests: list[asyncio.Task[Entry]] = []
    others: list[asyncio.Task[bool]] = []
    held: list[Entry] = []

    async def settle() -> None:
        for _ in range(10):
            await asyncio.sleep(0)
        for task in [t for t in requests if t.done()]:
            requests.remove(task)
            error = task.exception()
            if error is None:
                entry = task.result()
                if entry.state == "loaded":
                    cache.begin_use(entry)  # the request runs on the copy until a "done" step
                    held.append(entry)
            elif not isinstance(error, MeshError):  # a proper error, never a crash or an Over
                raise error
        for task in [t for t in others if t.done()]:
            others.remove(task)
            task.result()
        assert not budget.__dict__.get("violations"), f"capacity {CAPACITY} exceeded: {budget.violations}"
        counted = sum(e.reserved_bytes for e in cache.entries()) + \
            sum(e.reserved_bytes for e in cache._unloading)
        assert budget.used_bytes == counted, (budget.used_bytes, counted)

    for op, arg in plan:
        if op == "request":
            requests.append(asyncio.create_task(cache.acquire(ModelSpec(model_id=arg, type="fake"))))
        elif op == "run" and executor.jobs:
            executor.run(arg)
        elif op == "done" and held:
            cache.end_use(held.pop(arg % len(held)))
        elif op == "unload":
            others.append(asyncio.create_task(cache.unload(arg)))
        now[0] += 1
        await settle()
    # Let everything finish: end every use, run every job, until nothing is pending.
    for _ in range(200):
        while held:
            cache.end_use(held.pop())
        if executor.jobs:
            executor.run(0)
        await settle()
        if not (requests or others or executor.jobs or held):
            break
    for task in requests + others:
        task.cancel()
    assert budget.used_bytes == sum(e.reserved_bytes for e in cache.entries() if e.state == "loaded")


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(plan=steps, sizes=models)
def test_capacity_holds_at_every_step(plan: list[tuple[str, Any]], sizes: dict[str, tuple[int, int, bool]]) -> None:
    asyncio.run(asyncio.wait_for(_scenario(plan, sizes), 30))


def test_a_tiny_model_is_charged_about_its_size_not_an_allocator_step() -> None:
    floor = 64 * 1024
    # The benchmark's case: 2.7 KB model, prediction at the floor, RSS grew by one 260 KiB step.
    assert measured_size(2700, 266_240, floor, floor) <= 3 * 2700
    # A real prediction still lets native memory the loader cannot see count (capped).
    assert measured_size(100_000, 900_000, 400_000, floor) == 900_000
    assert measured_size(100_000, 50_000_000, 400_000, floor) == 2 * 400_000 + 256 * 1024
    # Without a footprint the prediction is all there is.
    assert measured_size(0, 10_000, floor, floor) == 10_000
    # Growth within 256 KiB of the footprint is noise: the footprint, whatever the prediction.
    assert measured_size(4_000, 33_000, 5_000, floor) == 4_000
    assert measured_size(18_000, 56_000, 67_000, floor) == 18_000
    assert measured_size(18_000, 18_000 + 256 * 1024 + 1, 300_000, floor) == 18_000 + 256 * 1024 + 1
