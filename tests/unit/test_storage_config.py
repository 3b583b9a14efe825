"""Storage keys and a registration's storage, resolved by modelmesh-serving's (pullman's) rules:
real files in a directory laid out as Kubernetes mounts a Secret (symbolic links into ``..data``,
swapped atomically on update)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mesh.errors import InvalidArgument, ModelLoadError
from mesh.storage.config import ModelKey, Resolved, StorageKeys, UnknownStorageKey, resolve
from mesh.storage.location import locate


def resolve_key(text: str, keys: StorageKeys, path: str = "models/m.joblib") -> Resolved:
    """``resolve`` for a registration with key ``text`` (it must name storage) and ``path``."""
    location = locate(path, text)
    assert location is not None
    return resolve(location, keys)

S3 = {"type": "s3", "access_key_id": "AKIAEXAMPLE", "secret_access_key": "s3cr3t-value",
      "endpoint_url": "http://127.0.0.1:9000", "region": "us-east-1", "default_bucket": "models"}


def mount(directory: Path, keys: dict[str, object], version: int = 1) -> None:
    """Write ``keys`` as Kubernetes writes a Secret volume: ..<version>/<key>, ..data -> it, <key> -> ..data/<key>."""
    data = directory / f"..{version}"
    data.mkdir(parents=True)
    for name, value in keys.items():
        (data / name).write_text(value if isinstance(value, str) else json.dumps(value))
    link = directory / "..data_tmp"
    link.symlink_to(data.name)
    os.replace(link, directory / "..data")
    for name in keys:
        if not (directory / name).is_symlink():
            (directory / name).symlink_to(f"..data/{name}")


def test_a_named_key_with_params_overriding_it(tmp_path: Path) -> None:
    mount(tmp_path, {"localMinIO": S3})
    found = resolve_key(json.dumps({"storage_key": "localMinIO", "storage_params": {"bucket": "other", "region": "eu"},
                                "model_type": {"name": "sklearn"}}), StorageKeys(tmp_path))
    assert (found.key, found.type) == ("localMinIO", "s3")
    assert found.fields["bucket"] == "other" and found.fields["region"] == "eu"
    assert found.fields["secret_access_key"] == "s3cr3t-value"  # the provider gets it...
    assert "s3cr3t-value" not in repr(found) and "AKIAEXAMPLE" not in str(found)  # ...nothing prints it


def test_default_bucket_and_the_deprecated_top_level_bucket(tmp_path: Path) -> None:
    mount(tmp_path, {"k": S3})
    keys = StorageKeys(tmp_path)
    assert resolve_key('{"storage_key": "k"}', keys).fields["bucket"] == "models"
    assert resolve_key('{"storage_key": "k", "bucket": "legacy"}', keys).fields["bucket"] == "legacy"
    assert resolve_key('{"storage_key": "k", "bucket": "legacy", "storage_params": {"bucket": "p"}}',
                   keys).fields["bucket"] == "p"


def test_default_keys_follow_pullman(tmp_path: Path) -> None:
    mount(tmp_path, {"default": S3, "default_gcs": {"type": "gcs", "bucket": "g"}})
    keys = StorageKeys(tmp_path)
    assert resolve_key('{"bucket": "b"}', keys).key == "default"
    assert resolve_key('{"storage_params": {"type": "gcs"}}', keys).fields["bucket"] == "g"
    # A default that is not there is no error: the parameters alone must say everything.
    only_params = resolve_key('{"storage_params": {"type": "pvc", "name": "claim-a"}}', keys)
    assert (only_params.key, only_params.fields) == ("", {"type": "pvc", "name": "claim-a"})


def test_dot_paths_set_nested_fields(tmp_path: Path) -> None:
    mount(tmp_path, {"h": {"type": "http", "url": "http://h", "options": {"x": "1"}}})
    found = resolve_key('{"storage_key": "h", "storage_params": {"options.y": "2"}}', StorageKeys(tmp_path))
    assert found.fields["options"] == {"x": "1", "y": "2"}
    with pytest.raises(InvalidArgument, match="would replace an object"):
        resolve_key('{"storage_key": "h", "storage_params": {"options": "flat"}}', StorageKeys(tmp_path))


def test_errors_name_the_key_never_a_secret(tmp_path: Path) -> None:
    mount(tmp_path, {"broken": "{not json s3cr3t", "list": "[1]", "notype": {"secret_access_key": "s3cr3t"},
                     "ftp": {"type": "ftp"}})
    keys = StorageKeys(tmp_path)
    cases = [('{"storage_key": "missing"}', UnknownStorageKey, "storage key 'missing' is not configured"),
             ('{"storage_key": "broken"}', ModelLoadError, "storage key 'broken' is not readable JSON"),
             ('{"storage_key": "list"}', ModelLoadError, "must be a JSON object"),
             ('{"storage_key": "notype"}', ModelLoadError, "storage key 'notype': the storage type is not given"),
             ('{"storage_key": "ftp"}', ModelLoadError, "'ftp' is not one of s3, gcs, azure, http, pvc"),
             ('{"storage_key": "../etc/passwd"}', InvalidArgument, "is not a key name"),
             ('{"storage_key": "..data"}', InvalidArgument, "is not a key name"),
             ("[1, 2]", InvalidArgument, "must be a JSON object"),
             ("{", InvalidArgument, "is not JSON"),
             ('{"storage_params": {"a": 1}}', InvalidArgument, "string values"),
             ('{"disk_size_bytes": -1}', InvalidArgument, "non-negative"),
             ("x" * 20_000, InvalidArgument, "longer than")]
    for text, error, message in cases:
        with pytest.raises(error, match=message) as caught:
            resolve_key(text, keys)
        assert "s3cr3t" not in str(caught.value)


def test_keys_are_read_again_when_the_secret_is_updated(tmp_path: Path) -> None:
    mount(tmp_path, {"k": S3})
    keys = StorageKeys(tmp_path)
    assert resolve_key('{"storage_key": "k"}', keys).fields["region"] == "us-east-1"
    mount(tmp_path, {"k": {**S3, "region": "eu-west-1"}, "added": {"type": "pvc", "name": "c"}}, version=2)
    assert resolve_key('{"storage_key": "k"}', keys).fields["region"] == "eu-west-1"
    assert resolve_key('{"storage_key": "added"}', keys).type == "pvc"


def test_model_key_fields() -> None:
    key = ModelKey.parse(json.dumps({"storage_key": "k", "schema_path": "s.json", "disk_size_bytes": 7,
                                     "model_type": {"name": "onnx"}}))
    assert (key.storage_key, key.schema_path, key.disk_size_bytes) == ("k", "s.json", 7)
    assert ModelKey.parse("") == ModelKey()
