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


def test_dot_paths_set_nested_fields_where_no_key_holds_them(tmp_path: Path) -> None:
    keys = StorageKeys(tmp_path)
    found = resolve_key('{"storage_params": {"type": "http", "url": "http://h", "options.y": "2"}}', keys)
    assert found.key == "" and found.fields["options"] == {"y": "2"}
    with pytest.raises(InvalidArgument, match="would replace an object"):
        resolve_key('{"storage_params": {"type": "http", "options.y": "2", "options": "flat"}}', keys)


def test_parameters_change_only_the_bucket_container_or_region_of_a_key(tmp_path: Path) -> None:
    """A tenant allowed one key must not send its credentials (or the runtime's own) elsewhere, nor
    move a claim key to another claim: endpoint, type, name, token URI, CA, nested fields."""
    mount(tmp_path, {"s3": S3, "gcs": {"type": "gcs", "bucket": "g", "private_key": "pk", "client_email": "e"},
                     "claim": {"type": "pvc", "name": "team-a"}, "web": {"type": "http", "url": "https://h"}})
    keys = StorageKeys(tmp_path)
    allowed = resolve_key('{"storage_key": "s3", "storage_params": {"bucket": "b2", "region": "eu-west-1"}}', keys)
    assert (allowed.fields["bucket"], allowed.fields["region"]) == ("b2", "eu-west-1")
    same = resolve_key('{"storage_key": "web", "storage_params": {"type": "http", "url": "https://h"}}', keys)
    assert same.fields["url"] == "https://h"  # what a storageUri on the key's own host sets
    for key, param in (("s3", {"endpoint_url": "http://attacker"}), ("gcs", {"endpoint_url": "http://attacker"}),
                       ("gcs", {"token_uri": "http://attacker/token"}), ("s3", {"type": "gcs"}),
                       ("web", {"url": "https://attacker"}), ("claim", {"name": "team-b"}),
                       ("s3", {"certificate": "PEM"}), ("web", {"options.x": "1"})):
        text = json.dumps({"storage_key": key, "storage_params": param})
        with pytest.raises(ModelLoadError, match=f"may not change storage key '{key}'"):
            resolve_key(text, keys)


def test_only_the_key_file_asks_for_the_runtimes_own_credentials(tmp_path: Path) -> None:
    mount(tmp_path, {"ambient": {"type": "s3", "bucket": "b", "use_ambient_credentials": True},
                     "plain": {"type": "s3", "bucket": "b"}})
    keys = StorageKeys(tmp_path)
    assert resolve_key('{"storage_key": "ambient"}', keys).ambient
    assert not resolve_key('{"storage_key": "plain"}', keys).ambient
    asked = '{"storage_params": {"type": "s3", "bucket": "b", "use_ambient_credentials": "true"}}'
    assert not resolve_key(asked, keys).ambient


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
