"""Where a registration's model is: local, or object storage by key or URI (mesh.storage.location),
and who may register from which storage key (mesh.auth)."""

from __future__ import annotations

import json

import pytest

from mesh.auth import Principal
from mesh.errors import InvalidArgument, PermissionDenied
from mesh.storage.location import locate


def test_local_paths_and_file_uris_stay_local() -> None:
    assert locate("/models/a.joblib", "") is None
    assert locate("a.joblib", '{"model_type": {"name": "sklearn"}}') is None
    assert locate("file:///models/a.joblib", '{"storage_key": "k"}') is None


def test_a_key_naming_storage_makes_the_path_relative_to_the_bucket() -> None:
    found = locate("/sklearn/mnist.joblib", json.dumps({"storage_key": "localMinIO",
                                                         "storage_params": {"bucket": "models"}}))
    assert found is not None
    assert (found.path, found.key_name, found.named, found.params) == (
        "sklearn/mnist.joblib", "localMinIO", True, {"bucket": "models"})
    legacy = locate("m.onnx", '{"bucket": "old"}')
    assert legacy is not None and (legacy.key_name, legacy.named) == ("default", False)
    typed = locate("m.onnx", '{"storage_params": {"type": "gcs"}}')
    assert typed is not None and typed.key_name == "default_gcs"


@pytest.mark.parametrize(("uri", "params", "path"), [
    ("s3://models/sklearn/m.joblib", {"type": "s3", "bucket": "models"}, "sklearn/m.joblib"),
    ("gs://bucket/a/b", {"type": "gcs", "bucket": "bucket"}, "a/b"),
    ("pvc://claim-a/dir/m.onnx", {"type": "pvc", "name": "claim-a"}, "dir/m.onnx"),
    ("https://acct1.blob.core.windows.net/cont/x/m.onnx",
     {"type": "azure", "account_name": "acct1", "container": "cont"}, "x/m.onnx"),
    ("https://example.com/files/m.joblib", {"type": "http", "url": "https://example.com"}, "files/m.joblib"),
    ("http://127.0.0.1:8080/m%20x.joblib", {"type": "http", "url": "http://127.0.0.1:8080"}, "m x.joblib"),
])
def test_uris_map_as_modelmesh_serving_maps_storage_uri(uri: str, params: dict[str, str], path: str) -> None:
    found = locate(uri, "")
    assert found is not None
    assert (found.params, found.path, found.key_name) == (params, path, f"default_{params['type']}")


def test_uri_parameters_override_the_keys_and_a_named_key_still_applies() -> None:
    found = locate("s3://b2/m.onnx", '{"storage_key": "k", "storage_params": {"bucket": "b1", "region": "eu"}}')
    assert found is not None
    assert found.params == {"bucket": "b2", "region": "eu", "type": "s3"} and found.key_name == "k"


@pytest.mark.parametrize(("path", "key", "message"), [
    ("ftp://h/m", "", "unsupported storage URI scheme 'ftp'"),
    ("s3://b/../etc/passwd", "", "'..' component"),
    ("m/../../x", '{"storage_key": "k"}', "'..' component"),
    ("s3://b", "", "no storage path"),
    ("https://h/m?X-Amz-Signature=abc", "", "query or fragment"),
    ("https://user:pw@h/m", "", "carries credentials"),
    ("s3:///m", "", "names no bucket"),
    ("m\x00x", '{"storage_key": "k"}', "NUL"),
    ("x" * 2000, '{"storage_key": "k"}', "longer than"),
    ("m", '{"storage_key": "k", "storage_params": {"secret_access_key": "s3cr3t"}}', "is a secret"),
    ("m", '{"storage_key": "k", "storage_params": {"headers.Authorization": "Bearer s3cr3t"}}', "is a secret"),
])
def test_bad_locations_are_invalid_arguments_without_echoing_secrets(path: str, key: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message) as caught:
        locate(path, key)
    assert "s3cr3t" not in caught.value.message


def test_tenant_tokens_use_only_their_storage_keys() -> None:
    operator = Principal(name="ops", role="write")
    operator.check_storage("anything", "s3")  # no restriction: every key
    tenant = Principal(name="team-a", role="write", prefixes=("team-a/",), storage_keys=("team-a-s3", "pvc:claim-a"))
    tenant.check_storage("team-a-s3", "s3")
    tenant.check_storage("default_pvc", "pvc", "claim-a")
    for args in (("team-b-s3", "s3"), ("default_http", "http"), ("default_pvc", "pvc", "claim-b")):
        with pytest.raises(PermissionDenied, match="outside its storage_keys"):
            tenant.check_storage(*args)
    no_keys = Principal(name="team-b", role="write", prefixes=("team-b/",))
    with pytest.raises(PermissionDenied, match=r"storage_keys \(none\)"):
        no_keys.check_storage("default_s3", "s3")
