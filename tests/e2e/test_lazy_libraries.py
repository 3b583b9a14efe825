"""A runtime pays for a model library only when it is used (issue 18, part 1), and predicts a
model's memory from its size on disk (part 2), seen from outside: real processes started as
``mesh up`` starts them (``loadtest.cluster``: a private etcd, a runtime, a router), real
scikit-learn models, the runtime's own /metrics and log lines.

- Started with no model loaded, a runtime has imported no model library (its import gauges are
  empty); the first scikit-learn load imports scikit-learn's, once, reported on its own (time,
  resident growth) and kept out of the model's measured size; no other library is imported.
- ``runtime.preload_types`` imports the named libraries at start-up instead; an unknown type
  there stops the start with a one-line reason naming the setting.
- Each load's prediction is its file's size x the learned ratio, not the 64 KiB floor, and its
  error is in ``mesh_size_prediction_ratio``.
"""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loadtest.cluster import Cluster, Server
from loadtest.management import register
from loadtest.models import TrainedModel, infer_body, train_logistic
from loadtest.scenarios.many_models import load_sizes, metrics_url
from mesh.gen.mmesh import model_mesh_pb2_grpc as mm_grpc

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

INFER = "/inference.GRPCInferenceService/ModelInfer"
MB = 1_000_000


def scrape(server: Server) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(metrics_url(server), timeout=5) as response:
        text = response.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def imports(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], what: str = "seconds"
            ) -> dict[tuple[str, str], float]:
    return {(dict(labels)["type"], dict(labels)["when"]): value for (name, labels), value in samples.items()
            if name == f"mesh_model_library_import_{what}"}


async def register_and_infer(router: Server, models: list[TrainedModel]) -> None:
    async with grpc.aio.insecure_channel(router.endpoint) as channel:
        stub = mm_grpc.ModelMeshStub(channel)  # type: ignore[no-untyped-call]
        call = channel.unary_unary(INFER)
        for m in models:
            await register(stub, m.model_id, str(m.path))
            await call(infer_body(m), metadata=(("mm-model-id", m.model_id),), timeout=60)


def test_a_library_is_imported_at_the_first_load_of_its_type_and_charged_to_no_model(tmp_path: Path) -> None:
    models = [train_logistic(f"lazy-{i}", tmp_path, n_features=8, seed=i) for i in range(3)]
    with Cluster() as cluster:
        runtime = cluster.start_runtime()
        router = cluster.start_router()
        assert imports(scrape(runtime)) == {}  # started, ready, and no model library imported
        asyncio.run(register_and_infer(router, models))
        samples = scrape(runtime)
        seconds, grown = imports(samples), imports(samples, "rss_bytes")
        assert set(seconds) == {("sklearn", "first_load")}  # not torch, onnxruntime, xgboost, lightgbm
        assert seconds["sklearn", "first_load"] > 0
        assert grown["sklearn", "first_load"] > 5 * MB  # scikit-learn's estimator modules (and scipy)
        events = runtime.events("model library imported")
        assert [(e["model_type"], e["when"]) for e in events] == [("sklearn", "first load of the type")]
        sizes = load_sizes([runtime])
        assert len(sizes) == 3 and max(sizes) < 200_000, sizes  # the models, not the library
        # Part 2: predicted from each file's size (a few KB), not from the 64 KiB floor.
        predicted = [int(e["predicted_bytes"]) for e in runtime.events("model loaded")]
        assert all(0 < p < 64 * 1024 for p in predicted), predicted
        ratio_count = samples[("mesh_size_prediction_ratio_count", frozenset({("type", "sklearn")}))]
        assert ratio_count == 3
        assert ("mesh_size_prediction_error_bytes_total", frozenset({("type", "sklearn")})) in samples


def test_preloaded_types_are_imported_at_start_and_an_unknown_one_stops_the_start() -> None:
    with Cluster() as cluster:
        runtime = cluster.start_runtime(extra_env={"MESH_RUNTIME_PRELOAD_TYPES": "scikit-learn,lightgbm"})
        assert set(imports(scrape(runtime))) == {("sklearn", "start"), ("lightgbm", "start")}
        with pytest.raises(RuntimeError) as failed:
            cluster.start_runtime("runtime-bad", extra_env={"MESH_RUNTIME_PRELOAD_TYPES": "tensorflow"})
        message = str(failed.value)
        assert "setting runtime.preload_types: unknown model type 'tensorflow'" in message
        assert "Traceback" not in message
