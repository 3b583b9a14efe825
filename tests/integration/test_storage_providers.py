"""Every storage provider against a real server on 127.0.0.1 (tests.support.object_stores): moto's
S3 (IAM on) and rclone's S3 (answers ranges with 200), fake-gcs-server, Azurite, and an HTTP(S)
server with required headers, a private CA and client certificates. Through the runtime's puller
(mesh.storage.puller) with keys in modelmesh-serving's storage-config format: a single object
(in parallel ranges where the object is larger than ``range_bytes``), a prefix of several objects,
a ``.tar.gz``; a missing object and wrong credentials fail with a message naming key, store and
path and never the secret."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh.errors import ModelLoadError
from mesh.registry.records import ModelSpec
from mesh.settings import StorageSettings
from mesh.storage.puller import Puller
from tests.support.object_stores import azurite, fake_gcs, http_store, moto_s3, rclone_s3, tarball

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

BIG = os.urandom(3 * 1024 * 1024 + 17)  # over range_bytes below: three ranges and a bit


@contextlib.contextmanager
def _server(kind: str, tmp_path: Path) -> Iterator[Any]:
    factories: dict[str, Callable[[], Any]] = {
        "moto": moto_s3, "rclone": lambda: rclone_s3(tmp_path / "rclone"), "gcs": fake_gcs, "azure": azurite,
        "http": lambda: http_store(tmp_path / "http", required_headers={"Authorization": "Bearer ok-token-1"}),
        "https-mtls": lambda: http_store(tmp_path / "https", client_cert=True)}
    with factories[kind]() as server:
        yield server


def _puller(tmp_path: Path, keys: dict[str, dict[str, Any]]) -> Puller:
    folder = tmp_path / "keys"
    folder.mkdir(exist_ok=True)
    for name, value in keys.items():
        (folder / name).write_text(json.dumps(value))
    puller = Puller(StorageSettings(config_dir=str(folder), cache_dir=str(tmp_path / "cache"), retries=1,
                                    range_bytes=1024 * 1024))
    puller.start()
    return puller


def _spec(model_id: str, path: str, storage_key: str) -> ModelSpec:
    key = {"storage_key": storage_key, "storage_params": {"bucket": "models"}, "model_type": {"name": "onnx"}}
    return ModelSpec(model_id=model_id, type="onnx", path=path, key=json.dumps(key), registered_ms=1)


def _files(path: str) -> dict[str, bytes]:
    """The files at ``path`` by their path under it ("" for a file itself), with their bytes."""
    root = Path(path)
    if root.is_file():
        return {"": root.read_bytes()}
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _wrong(kind: str, key: dict[str, Any]) -> dict[str, Any] | None:
    """The same key with a wrong secret, where the server checks one."""
    if kind in ("moto", "rclone"):
        return {**key, "secret_access_key": "s3cr3t-wrong-value"}
    if kind == "azure":
        return {**key, "connection_string": key["connection_string"].replace("AccountKey=", "AccountKey=AAAA")}
    if kind == "http":
        return {**key, "headers": {"Authorization": "Bearer s3cr3t-wrong-value"}}
    return None


@pytest.mark.parametrize("kind", ["moto", "rclone", "gcs", "azure", "http", "https-mtls"])
async def test_a_provider_pulls_objects_prefixes_and_archives(tmp_path: Path, kind: str) -> None:
    with _server(kind, tmp_path) as server:
        server.put("models", "onnx/big.onnx", BIG)
        server.put("models", "onnx/bundle.tar.gz",
                   tarball({"1/model.onnx": b"onnx-bytes", "config.pbtxt": b"name: 'x'"}))
        folder = kind not in ("http", "https-mtls")  # an HTTP key names one file: no listing
        if folder:
            server.put("models", "triton/mnist/1/model.onnx", b"weights")
            server.put("models", "triton/mnist/config.pbtxt", b"config")
            server.put("models", "triton/mnist2/other.onnx", b"not part of mnist")
        key = server.storage_key("models")
        wrong = _wrong(kind, key)
        puller = _puller(tmp_path, {"good": key, **({"wrong": wrong} if wrong else {})})
        try:
            big = await puller.pull(_spec("big", "onnx/big.onnx", "good"))
            assert big is not None and Path(big.path).name == "big.onnx"
            await puller.verified(big)  # the MD5 comparison with the ETag, where the store gives one
            assert _files(big.path) == {"": BIG} and big.downloaded_bytes == len(BIG)
            bundle = await puller.pull(_spec("bundle", "onnx/bundle.tar.gz", "good"))
            assert bundle is not None
            await puller.verified(bundle)
            assert _files(bundle.path) == {"1/model.onnx": b"onnx-bytes", "config.pbtxt": b"name: 'x'"}
            if folder:
                mnist = await puller.pull(_spec("mnist", "triton/mnist", "good"))
                assert mnist is not None
                await puller.verified(mnist)
                assert _files(mnist.path) == {"1/model.onnx": b"weights", "config.pbtxt": b"config"}  # not mnist2's
            with pytest.raises(ModelLoadError, match=r"object not found: 'onnx/none\.onnx'") as missing:
                await puller.pull(_spec("none", "onnx/none.onnx", "good"))
            assert "storage key 'good'" in missing.value.message
            if wrong:
                with pytest.raises(ModelLoadError, match=r"access denied: 'onnx/big\.onnx'") as denied:
                    await puller.pull(_spec("denied", "onnx/big.onnx", "wrong"))
                assert "storage key 'wrong'" in denied.value.message and "s3cr3t" not in denied.value.message
        finally:
            puller.close()
