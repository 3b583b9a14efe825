"""Predictors written for modelmesh-serving, with their models in S3, served unchanged: the
controller (against a FAKE Kubernetes API server, tests/support/fake_kube.py: no kube-apiserver runs
on this machine) maps ``storage.key``/``path``, ``storage.s3`` and the ``default`` key
(``controller.default_storage_key``) onto ModelInfo.key, and a real runtime pulls the models from a
real S3 server (moto, IAM on) with the keys of a storage-config folder; a Predictor whose key does
not exist reports FailedToLoad with the key's name."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mesh.tensors import decode_response, encode_request
from tests.integration.test_controller import NS, Env, up_to_date, wait_for
from tests.support.fake_kube import FakeKubeApiServer
from tests.support.inprocess import InProcessMesh, memory_url
from tests.support.models import ModelArtifact, assert_outputs_match, make_model
from tests.support.object_stores import MotoS3, moto_s3

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@pytest.fixture
async def stored(tmp_path: Path) -> AsyncIterator[tuple[Env, MotoS3, ModelArtifact]]:
    model = make_model("sklearn", tmp_path / "trained", seed=4)
    keys = tmp_path / "storage-config"
    keys.mkdir()
    with moto_s3() as s3:
        for path in ("sklearn/iris.joblib", "legacy/iris.joblib", "plain/iris.joblib"):
            s3.put("models", path, model.file.read_bytes())
        (keys / "localMinIO").write_text(json.dumps(s3.storage_key("models")))
        (keys / "default").write_text(json.dumps(s3.storage_key("models")))
        mesh = InProcessMesh(memory_url(), extra={"storage": {"config_dir": str(keys),
                                                              "cache_dir": str(tmp_path / "cache")}})
        await mesh.start(runtimes=1)
        kube = FakeKubeApiServer(bookmark_interval_s=0.5).start()
        environment = Env(mesh, kube)
        try:
            yield environment, s3, model
        finally:
            if environment.controller is not None:
                await environment.controller.stop()
            kube.stop()
            await mesh.stop()


async def test_modelmesh_serving_predictors_pull_from_s3(stored: tuple[Env, MotoS3, ModelArtifact]) -> None:
    env, _, model = stored
    specs = {
        "quickstart": {"modelType": {"name": "sklearn"}, "storage": {"key": "localMinIO",
                                                                     "path": "sklearn/iris.joblib"}},
        "legacy": {"modelType": {"name": "sklearn"}, "path": "legacy/iris.joblib",
                   "storage": {"s3": {"secretKey": "localMinIO", "bucket": "models"}}},
        "defaulted": {"modelType": {"name": "sklearn"}, "path": "plain/iris.joblib"},
        "nokey": {"modelType": {"name": "sklearn"}, "storage": {"key": "notThere", "path": "sklearn/iris.joblib"}},
    }
    for name, spec in specs.items():
        env.apply(name, spec)
    await env.start_controller(default_storage_key="default")
    for name in ("quickstart", "legacy", "defaulted"):
        await wait_for(up_to_date(env, name), timeout=30, what=f"{name} available and Loaded")
        response = await env.mesh.infer(name, encode_request(model_name="", inputs={"input-0": model.sample}),
                                        header="mm-vmodel-id")
        assert_outputs_match(decode_response(response), model.expected)

    def failed() -> bool:
        return env.status("nokey").get("activeModelState") == "FailedToLoad"

    await wait_for(failed, timeout=30, what="nokey FailedToLoad")
    info = env.status("nokey").get("lastFailureInfo") or {}
    assert "storage key 'notThere' is not configured" in info.get("message", ""), info
    assert env.kube.get(NS, "nokey") is not None
