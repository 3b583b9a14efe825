"""modelmesh-serving's quickstart InferenceServices (docs/kserve-notes.md section 8), applied as its
docs give them, reach the status its docs show, with their models pulled from S3.

Real: an S3 server (moto, IAM on: tests/support/object_stores.py) holding a bucket
``modelmesh-example-models`` with a scikit-learn model at ``sklearn/mnist-svm.joblib`` and an ONNX
model at ``onnx/mnist.onnx`` (trained here on a scikit-learn dataset, not MNIST: only the object
keys are the quickstart's), the runtime's storage key ``localMinIO`` (one JSON file in
``storage.config_dir``, as the quickstart's ``storage-config`` secret has one entry per key), the
router and a runtime on 127.0.0.1, and the controller process assembly. Fake: the Kubernetes API
server (tests/support/fake_kube.py), as no kube-apiserver runs on this machine.

The manifests are the quickstart's, field for field; the namespace is the one ``kubectl apply -n``
would give them. What the docs show and is not checked here, on purpose: the concrete model's hash
(``example-sklearn-isvc__isvc-3642375d03``: the mesh hashes the spec its own way, see
mesh/controller/isvc.py); the response's ``modelName`` (the quickstart's answer names the concrete
model; the mesh's built-in models echo the request's ``model_name``, the InferenceService's name);
``totalCopies: 2`` (the quickstart runs two runtime Pods, this mesh one); the host names in the
URLs (the router's address here); the MNIST tensors (``predict`` FP32 [1, 64]: the models differ).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from mesh.tensors import decode_response, encode_request
from tests.integration.test_controller import wait_for
from tests.integration.test_controller_isvc import NS, Env, conditions, ready, running
from tests.support.fake_kube import INFERENCE_SERVICES, PREDICTORS, FakeKubeApiServer
from tests.support.inprocess import InProcessMesh, memory_url
from tests.support.models import ModelArtifact, assert_outputs_match, make_model
from tests.support.object_stores import moto_s3

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

BUCKET = "modelmesh-example-models"  # the quickstart MinIO's, its storage key's default_bucket
SKLEARN = "example-sklearn-isvc"
ONNX = "example-onnx-mnist"


def quickstart(name: str, model: dict[str, Any], **annotations: str) -> dict[str, Any]:
    """An InferenceService as the quickstart writes it: no namespace, the ModelMesh annotation."""
    return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
            "metadata": {"name": name, "annotations": {"serving.kserve.io/deploymentMode": "ModelMesh",
                                                       **annotations}},
            "spec": {"predictor": {"model": model}}}


# docs/quickstart.md section 2, the storage spec form
SKLEARN_STORAGE = quickstart(SKLEARN, {"modelFormat": {"name": "sklearn"},
                                       "storage": {"key": "localMinIO", "path": "sklearn/mnist-svm.joblib"}})
# docs/quickstart.md section 2, "you can also continue using the storageUri field"
SKLEARN_URI = quickstart(SKLEARN, {"modelFormat": {"name": "sklearn"},
                                   "storageUri": "s3://modelmesh-example-models/sklearn/mnist-svm.joblib"},
                         **{"serving.kserve.io/secretKey": "localMinIO"})
# config/example-isvcs/example-onnx-mnist-isvc.yaml
ONNX_MNIST = quickstart(ONNX, {"modelFormat": {"name": "onnx"},
                               "storage": {"key": "localMinIO", "path": "onnx/mnist.onnx"}})


def applied_in_namespace(manifest: dict[str, Any]) -> dict[str, Any]:
    """``kubectl apply -n <NS> -f <manifest>``: the manifest itself stays as written."""
    return {**manifest, "metadata": {**manifest["metadata"], "namespace": NS}}


@pytest.fixture
async def quickstart_env(tmp_path: Path) -> AsyncIterator[tuple[Env, ModelArtifact, ModelArtifact]]:
    sklearn = make_model("sklearn", tmp_path / "trained", seed=0)
    onnx = make_model("onnx", tmp_path / "trained", seed=1)
    keys = tmp_path / "storage-config"
    keys.mkdir()
    with moto_s3() as s3:
        s3.create_bucket(BUCKET)
        s3.put(BUCKET, "sklearn/mnist-svm.joblib", sklearn.file.read_bytes())
        s3.put(BUCKET, "onnx/mnist.onnx", onnx.file.read_bytes())
        (keys / "localMinIO").write_text(json.dumps(s3.storage_key(BUCKET)))
        mesh = await InProcessMesh(memory_url(), extra={"storage": {
            "config_dir": str(keys), "cache_dir": str(tmp_path / "cache")}}).start(runtimes=1)
        kube = FakeKubeApiServer(resources=(PREDICTORS, INFERENCE_SERVICES), bookmark_interval_s=0.5).start()
        async with running(mesh, kube) as env:
            yield env, sklearn, onnx


def assert_quickstart_status(env: Env, name: str) -> None:
    """What ``kubectl describe isvc`` shows in the quickstart (docs/kserve-notes.md sections 3, 8)."""
    status = env.status(name)
    assert conditions(status) == {"PredictorReady": "True", "Ready": "True"}, status
    model_status = status["modelStatus"]
    assert model_status["states"] == {"activeModelState": "Loaded"}, model_status  # empty target
    assert model_status["transitionStatus"] == "UpToDate", model_status
    assert model_status["copies"] == {"failedCopies": 0, "totalCopies": 1}, model_status  # one runtime here
    assert "lastFailureInfo" not in model_status, model_status
    assert status["url"] == env.grpc_url
    predictor = status["components"]["predictor"]
    assert {k: predictor[k] for k in ("url", "grpcUrl", "restUrl")} == {
        "url": env.grpc_url, "grpcUrl": env.grpc_url, "restUrl": env.mesh.rest_url}
    # KServe's revision fields, the model ID as the revision: all traffic to it (no canary here)
    model_id = model_status.get("lastFailureInfo", {}).get("modelRevisionName") or predictor["latestReadyRevision"]
    assert model_id.startswith(f"{name}__isvc-")
    assert predictor["traffic"] == [{"revisionName": model_id, "percent": 100, "latestRevision": True}]


async def infer_by_name(env: Env, name: str, input_name: str, model: ModelArtifact) -> None:
    """``ModelInfer`` with ``model_name: <isvc name>`` only, as the quickstart's grpcurl call: the
    outputs of the model trained here."""
    request = encode_request(model_name=name, inputs={input_name: model.sample})
    response = await env.mesh.infer(name, request, header="")
    assert_outputs_match(decode_response(response), model.expected, atol=1e-5)


async def test_quickstart_isvcs_reach_ready_and_serve_from_s3(
        quickstart_env: tuple[Env, ModelArtifact, ModelArtifact]) -> None:
    env, sklearn, onnx = quickstart_env
    env.apply(applied_in_namespace(SKLEARN_STORAGE))
    env.apply(applied_in_namespace(ONNX_MNIST))
    await env.start_controller()
    for name in (SKLEARN, ONNX):
        await wait_for(ready(env, name), timeout=30, what=f"{name} Ready")
        assert_quickstart_status(env, name)
    await infer_by_name(env, SKLEARN, "input-0", sklearn)
    await infer_by_name(env, ONNX, "input", onnx)  # the ONNX graph's own input name
    first = (await env.vmodel(SKLEARN)).activeModelId

    # the storageUri form applied over it, as the quickstart's alternative: another spec, so another
    # concrete model, pulled with the key that the annotation names
    env.apply(applied_in_namespace(SKLEARN_URI))

    async def moved() -> bool:
        return (await env.vmodel(SKLEARN)).activeModelId not in ("", first) and ready(env, SKLEARN)()

    await wait_for(moved, timeout=30, what=f"{SKLEARN} (storageUri form) Ready")
    await wait_for(lambda: env.model_status(SKLEARN).get("copies", {}).get("totalCopies") == 1, timeout=10,
                   what="the first form's copy gone")
    assert_quickstart_status(env, SKLEARN)
    await infer_by_name(env, SKLEARN, "input-0", sklearn)
    # every manifest as written: the controller wrote status only, and no Predictor
    for manifest in (SKLEARN_URI, ONNX_MNIST):
        stored = env.kube.get(NS, manifest["metadata"]["name"], INFERENCE_SERVICES)
        assert stored is not None
        assert stored["spec"] == manifest["spec"]
        assert stored["metadata"]["annotations"] == manifest["metadata"]["annotations"]
    assert env.kube.objects(PREDICTORS) == []
