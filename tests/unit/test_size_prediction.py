"""Predicting a model's memory before its load (issue 18, part 2): its size on disk x a ratio
learned per type from measured loads, with no fixed floor once that size is known; the floor only
when nothing is known. Real files on disk; the SizePredictor and SizeEstimator are the runtime's."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from mesh.registry.records import ModelSpec
from mesh.runtime.cache import DeviceBudget, ModelCache
from mesh.runtime.loaders.base import LoadedModel
from mesh.runtime.service import SizePredictor
from placement.registry import make_policy
from placement.sizing import SizeEstimator

FLOOR = 64 * 1024


def predictor(roots: tuple[str, ...] = ()) -> SizePredictor:
    return SizePredictor(SizeEstimator(default_ratio=1.25, floor_bytes=FLOOR), roots=roots)


def model_file(tmp_path: Path, size: int, name: str = "model.joblib") -> Path:
    path = tmp_path / name
    path.write_bytes(b"x" * size)
    return path


def spec(path: str, *, key: str = "", hint: int = 0, model_type: str = "sklearn") -> ModelSpec:
    return ModelSpec(model_id="m", type=model_type, path=path, key=key, size_hint_bytes=hint)


def test_a_small_model_is_predicted_from_its_file_not_the_floor(tmp_path: Path) -> None:
    s = spec(str(model_file(tmp_path, 7_000)))
    sizer = predictor()
    sizer.prepare(s)
    assert sizer.predict(s) == math.ceil(7_000 * 1.25)  # 8,750 B, not 65,536


def test_the_ratio_is_learned_per_type_from_measured_loads(tmp_path: Path) -> None:
    sizer = predictor()
    small = spec(str(model_file(tmp_path, 10_000)))
    sizer.prepare(small)
    for _ in range(20):
        sizer.observe(small, "ram", 8_000)  # these models take 0.8 x their file in memory
    unseen = ModelSpec(model_id="n", type="sklearn", path=str(model_file(tmp_path, 20_000, "n.joblib")))
    sizer.prepare(unseen)
    assert sizer.predict(unseen) == pytest.approx(16_000, rel=0.02)  # the type's ratio
    other = spec(str(model_file(tmp_path, 10_000, "model.json")), model_type="xgboost")
    sizer.prepare(other)
    assert sizer.predict(other) == 12_500  # another type keeps the default ratio


def test_modelmeshs_disk_size_bytes_stands_in_for_a_file_not_here_yet(tmp_path: Path) -> None:
    # A model in object storage asked about before its pull (predictModelSize): the key's size.
    key = json.dumps({"storage_key": "minio", "disk_size_bytes": 40_000})
    s = spec("models/m/model.joblib", key=key)
    sizer = predictor(roots=(str(tmp_path),))
    sizer.prepare(s)
    assert sizer.disk_size(s) == 40_000
    assert sizer.predict(s) == 50_000
    # Where the file is readable, its real size wins over the key's word.
    local = spec(str(model_file(tmp_path, 2_000)), key=key)
    sizer.prepare(local)
    assert sizer.predict(local) == 2_500


@pytest.mark.parametrize("key", ["", "{}", '{"disk_size_bytes": -5}', '{"disk_size_bytes": "9000"}',
                                 '{"disk_size_bytes": true}', '{"disk_size_bytes": 1.5e3}', "not json {disk_size_bytes",
                                 '["disk_size_bytes", 9000]'])
def test_nothing_known_gives_the_floor(tmp_path: Path, key: str) -> None:
    s = spec(str(tmp_path / "absent.joblib"), key=key)
    sizer = predictor()
    sizer.prepare(s)
    assert sizer.disk_size(s) == 0
    assert sizer.predict(s) == FLOOR
    sizer.observe(s, "ram", 123)  # nothing to learn from: no size on disk
    assert sizer.estimator.observations("sklearn") == 0


def test_the_registrations_hint_wins(tmp_path: Path) -> None:
    s = spec(str(model_file(tmp_path, 7_000)), hint=3_000_000)
    sizer = predictor()
    sizer.prepare(s)
    assert sizer.predict(s) == 3_000_000


def test_on_a_gpu_the_floor_holds_until_the_type_is_measured_there(tmp_path: Path) -> None:
    s = spec(str(model_file(tmp_path, 4_000, "model.onnx")), model_type="onnx")
    sizer = predictor()
    sizer.prepare(s)
    assert sizer.predict(s, "gpu0") == FLOOR  # the workspace that comes with it is unknown yet
    sizer.observe(s, "gpu0", 1_004_000)  # a session's workspace on top of the weights
    assert sizer.predict(s, "gpu0") == 1_004_000
    small = spec(str(model_file(tmp_path, 100, "small.onnx")), model_type="onnx")
    sizer.prepare(small)
    assert sizer.predict(small, "gpu0") == 100 + 1_000_000  # weights + the learned extra, no floor


class _Model(LoadedModel):
    def __init__(self, model_id: str, footprint: int) -> None:
        super().__init__(model_id=model_id, type="fake", device="ram", inputs=[], outputs=[])
        self.footprint = footprint

    def _predict(self, inputs: Mapping[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        return {}

    def footprint_bytes(self) -> int:
        return self.footprint

    def _release(self) -> None:
        pass


@pytest.mark.parametrize("importing", [False, True])
async def test_a_load_measured_while_a_library_imports_is_charged_its_footprint(importing: bool) -> None:
    """The first load of another type imports its library in the middle of this load's measured
    window: the process's growth is that library's, not this model's."""
    rss = [100_000_000]
    activity = [(0, 0)]

    def load(spec: ModelSpec, device: str) -> LoadedModel:
        rss[0] += 900_000  # what the process grew by during the load
        if importing:
            activity[0] = (2, 0)  # an import started and ended meanwhile
        return _Model(spec.model_id, 100_000)

    pool = ThreadPoolExecutor(2)
    cache = ModelCache(budgets=[DeviceBudget("ram", 10_000_000, make_policy("lru"))], load_fn=load,
                       predict_size=lambda s, d: 400_000, observe_size=lambda s, d, n: None,
                       choose_device=lambda s, b, p: "ram", executor=pool, max_concurrent_loads=2,
                       load_timeout_s=5, rss=lambda: rss[0], process_activity=lambda: activity[0],
                       size_floor_bytes=FLOOR)
    try:
        entry = await cache.acquire(ModelSpec(model_id="m", type="fake"))
        assert entry.reserved_bytes == (100_000 if importing else 900_000)
    finally:
        await cache.close()
        pool.shutdown()


async def test_a_load_measured_above_its_prediction_waits_for_a_concurrent_load_rather_than_fail() -> None:
    """Capacity 700: ``a`` (predicted 300, measures 500) needs 200 more while ``b`` (predicted 300)
    still loads and holds the room. ``a`` waits for ``b``, which measures 100, and both stay;
    before, ``a`` failed with RESOURCE_EXHAUSTED at once (and its requests with it)."""
    import asyncio
    import threading

    b_may_finish = threading.Event()
    sizes, predicted = {"a": 500, "b": 100}, {"a": 300, "b": 300}

    def load(spec: ModelSpec, device: str) -> LoadedModel:
        if spec.model_id == "b":
            b_may_finish.wait(10)
        return _Model(spec.model_id, sizes[spec.model_id])

    pool = ThreadPoolExecutor(2)
    cache = ModelCache(budgets=[DeviceBudget("ram", 700, make_policy("lru"))], load_fn=load,
                       predict_size=lambda s, d: predicted[s.model_id], observe_size=lambda s, d, n: None,
                       choose_device=lambda s, b, p: "ram", executor=pool, max_concurrent_loads=2,
                       load_timeout_s=10, rss=lambda: 0, size_floor_bytes=FLOOR)
    try:
        b = asyncio.create_task(cache.acquire(ModelSpec(model_id="b", type="fake")))
        a = asyncio.create_task(cache.acquire(ModelSpec(model_id="a", type="fake")))
        for _ in range(200):  # until a waits for room for its measured size
            await asyncio.sleep(0.01)
            if "a" in cache._topping_up:
                break
        assert "a" in cache._topping_up and not a.done()
        b_may_finish.set()
        entry_a, entry_b = await asyncio.wait_for(asyncio.gather(a, b), 10)
        assert (entry_a.reserved_bytes, entry_b.reserved_bytes) == (500, 100)
        assert cache.budgets()["ram"].used_bytes == 600
    finally:
        b_may_finish.set()
        await cache.close()
        pool.shutdown()


def test_a_model_loaded_before_is_predicted_at_its_smallest_measured_size(tmp_path: Path) -> None:
    """Re-loads (most loads of an evicting cache) reserve what the model measured, not its type's
    average: the smallest measurement, since other threads' allocations only ever add."""
    sizer = predictor()
    odd = spec(str(model_file(tmp_path, 10_000)))
    sizer.prepare(odd)
    assert sizer.predict(odd) == 12_500  # never loaded: the type's (default) ratio
    sizer.observe(odd, "ram", 30_000)
    sizer.observe(odd, "ram", 19_000)
    sizer.observe(odd, "ram", 25_000)
    assert sizer.predict(odd) == 19_000
    assert sizer.predict(odd, "gpu0") != 19_000  # per device
    other = ModelSpec(model_id="other", type="sklearn", path=odd.path)
    assert sizer.predict(other) != 19_000  # per model: another registration of the file is not known


def test_remembered_sizes_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SizePredictor, "MAX_KNOWN", 3)
    sizer = predictor()
    path = str(model_file(tmp_path, 1_000))
    models = [ModelSpec(model_id=f"m{i}", type="sklearn", path=path) for i in range(5)]
    for i, m in enumerate(models):
        sizer.prepare(m)
        sizer.observe(m, "ram", 2_000 + 7 * i)
    assert [sizer.predict(m) == 2_000 + 7 * i for i, m in enumerate(models)] == [False, False, True, True, True]
