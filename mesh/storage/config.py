"""Storage keys and where a model's files are: modelmesh-serving's contract (issue 14).

A *storage key* is a JSON object in a file of its own, named after the key, in one directory
(``storage.config_dir``): how modelmesh-serving mounts its ``storage-config`` Secret, one file per
data key (docs/storage-notes.md section 1 has the provider fields). A registration names its
storage in ``ModelInfo.key``, the JSON modelmesh-serving's controller writes:
``{"storage_key": "localMinIO", "storage_params": {"bucket": "models"}, "model_type": {...},
"schema_path": ..., "disk_size_bytes": N}``, plus the deprecated top-level ``bucket``.

:func:`resolve` gives the provider configuration for one load (its :class:`~mesh.storage.location.
Location` says which key and parameters), by pullman's rules
(model-serving-puller/puller/puller.go at kserve/modelmesh-runtime-adapter af7d500):

- ``storage_key`` named: that key's file; a missing one is an error naming the key.
- none named: ``default_<storage_params.type>`` when the parameters name a type, else ``default``;
  a missing default is no error, the parameters alone must then say everything.
- parameters may change only the bucket, container or region of a key that exists
  (:data:`KEY_PARAMETERS`): pullman lets them change anything, which sends the key's credentials
  (a signed request, a service account's token, an HTTP key's ``Authorization`` header) to any
  host a registration names, or moves a claim key to another tenant's claim. With no key at all,
  the parameters say everything, and no credential is involved:
- a key with no credentials reads anonymously, unless its file says ``"use_ambient_credentials":
  true`` (ours): only then does the client use the runtime's own credentials (AWS environment,
  web identity or instance metadata; Google's application default credentials). A registration
  cannot ask for them.
- ``storage_params`` override the key's fields by dot path (``a.b`` sets a nested field).
- the deprecated top-level ``bucket`` applies when the parameters name no bucket (pullman applies
  it only when the key already has a bucket, which looks like a bug there; we take the
  registration's word either way), and an s3 key's ``default_bucket`` fills an absent ``bucket``.
- the result must name its ``type``: one of :data:`TYPES`.

Keys are read when asked for and read again when their file changes (a mounted Secret is
updated in place by Kubernetes' symbolic-link swap), so keys added or changed are picked up
without a restart. A key's secrets never leave this module in text: :meth:`Resolved.__repr__` and
every error name the key and the fields, never a value of :data:`SECRET_FIELDS`.
"""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mesh.errors import InvalidArgument, ModelLoadError

if TYPE_CHECKING:
    from mesh.storage.location import Location

TYPES = ("s3", "gcs", "azure", "http", "pvc")
# Fields whose values are secrets: never logged, never in an error, a status or a repr.
SECRET_FIELDS = frozenset({"secret_access_key", "access_key_id", "private_key", "connection_string",
                           "client_secret", "client_key", "headers", "account_key", "sas_token", "token"})
MAX_KEY_BYTES = 64 * 1024  # one storage key's file
MAX_MODEL_KEY_BYTES = 16 * 1024  # a registration's ModelInfo.key
MAX_PARAMS = 64
_KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,252}$")


class UnknownStorageKey(ModelLoadError):
    """A registration names a storage key the runtime has no file for."""


@dataclass(frozen=True)
class ModelKey:
    """A registration's ``ModelInfo.key``, parsed."""

    storage_key: str = ""
    storage_params: dict[str, str] = field(default_factory=dict)
    bucket: str = ""  # deprecated top-level form
    schema_path: str = ""
    disk_size_bytes: int = 0

    @classmethod
    def parse(cls, text: str) -> ModelKey:
        """InvalidArgument for a key that is not the JSON object modelmesh-serving writes."""
        if not text.strip():
            return cls()
        if len(text) > MAX_MODEL_KEY_BYTES:
            raise InvalidArgument(f"model key is longer than {MAX_MODEL_KEY_BYTES} bytes")
        try:
            raw = json.loads(text)
        except ValueError:
            raise InvalidArgument("model key is not JSON (modelmesh-serving's form: "
                                  '{"storage_key": ..., "storage_params": {...}})') from None
        if not isinstance(raw, dict):
            raise InvalidArgument("model key must be a JSON object")
        params = raw.get("storage_params") or {}
        if not isinstance(params, dict) or len(params) > MAX_PARAMS or \
                not all(isinstance(k, str) and isinstance(v, str) for k, v in params.items()):
            raise InvalidArgument(f"model key: storage_params must be an object of at most {MAX_PARAMS} "
                                  "string values")
        texts = {name: raw.get(name) or "" for name in ("storage_key", "bucket", "schema_path")}
        if not all(isinstance(v, str) for v in texts.values()):
            raise InvalidArgument("model key: storage_key, bucket and schema_path must be strings")
        size = raw.get("disk_size_bytes") or 0
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidArgument("model key: disk_size_bytes must be a non-negative integer")
        if texts["storage_key"] and not _KEY_NAME.match(texts["storage_key"]):
            raise InvalidArgument(f"model key: storage_key {texts['storage_key'][:80]!r} is not a key name")
        return cls(storage_key=texts["storage_key"], storage_params=dict(params), bucket=texts["bucket"],
                   schema_path=texts["schema_path"], disk_size_bytes=size)


@dataclass(frozen=True)
class Resolved:
    """The provider configuration of one load: ``type`` and its fields (secrets included)."""

    key: str  # the storage key's name ("" when the parameters alone say everything)
    type: str
    fields: dict[str, Any]
    # The key file asks for the runtime's own cloud credentials (environment, instance metadata)
    # when it holds none; otherwise such a key reads anonymously (module docstring).
    ambient: bool = False

    def __repr__(self) -> str:
        shown = {k: ("***" if k in SECRET_FIELDS else v) for k, v in self.fields.items()}
        return f"Resolved(key={self.key!r}, type={self.type!r}, fields={shown!r})"

    __str__ = __repr__


class StorageKeys:
    """The storage keys in ``directory``, read when asked for and again when their file changes."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self._cache: dict[str, tuple[tuple[int, int, int], dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> dict[str, Any] | None:
        """The key's fields, None when there is no such key; ModelLoadError for a file that is
        not a JSON object (naming the key, never its content)."""
        if not _KEY_NAME.match(name):
            return None  # also keeps "..data" and path tricks out: no such key
        path = self.directory / name
        try:
            stat = path.stat()  # follows the Secret's symbolic links
        except OSError:
            with self._lock:
                self._cache.pop(name, None)
            return None
        stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        with self._lock:
            held = self._cache.get(name)
            if held is not None and held[0] == stamp:
                return dict(held[1])
        if stat.st_size > MAX_KEY_BYTES:
            raise ModelLoadError(f"storage key {name!r} is larger than {MAX_KEY_BYTES} bytes")
        try:
            fields = json.loads(path.read_bytes())
        except (OSError, ValueError):
            raise ModelLoadError(f"storage key {name!r} is not readable JSON") from None
        if not isinstance(fields, dict):
            raise ModelLoadError(f"storage key {name!r} must be a JSON object")
        with self._lock:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[name] = (stamp, fields)
        return dict(fields)


def _set_path(fields: dict[str, Any], dotted: str, value: str) -> None:
    """``a.b`` = value, creating objects on the way; InvalidArgument over a value that is not one."""
    parts = dotted.split(".")
    node = fields
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise InvalidArgument(f"storage parameter {dotted!r} goes through a field that is not an object")
        node = child
    if isinstance(node.get(parts[-1]), dict | list):
        raise InvalidArgument(f"storage parameter {dotted!r} would replace an object with a string")
    node[parts[-1]] = value


# What a registration's parameters may change in a storage key it uses: which bucket (container)
# and region. Nothing else: the endpoint, the type, a claim's name, a token URI or a CA would send
# the key's credentials (or the runtime's) elsewhere, or read another tenant's claim.
KEY_PARAMETERS = frozenset({"bucket", "default_bucket", "container", "region"})
AMBIENT = "use_ambient_credentials"  # ours: a key that signs with the runtime's own credentials


def resolve(location: Location, keys: StorageKeys) -> Resolved:
    """The provider configuration for a registration's storage location (module docstring).
    InvalidArgument for a parameter that cannot apply, UnknownStorageKey for a named key with
    no file, ModelLoadError when nothing names a provider type, or for a parameter a key does not
    let registrations change (:data:`KEY_PARAMETERS`)."""
    model_key, params, name = location.model_key, location.params, location.key_name
    found = keys.get(name)
    if found is None:
        if location.named:
            raise UnknownStorageKey(f"storage key {name!r} is not configured on this runtime "
                                    "(storage.config_dir)")
        name, found = "", {}
    fields = dict(found)
    fields.pop(AMBIENT, None)  # read from the key file alone, below
    if fields.get("type") == "s3" and "bucket" not in fields and isinstance(fields.get("default_bucket"), str):
        fields["bucket"] = fields["default_bucket"]
    if model_key.bucket and "bucket" not in params:
        fields["bucket"] = model_key.bucket
    for dotted, value in params.items():
        if not dotted or any(not part for part in dotted.split(".")):
            raise InvalidArgument(f"storage parameter {dotted[:80]!r} is not a field name")
        if name and dotted not in KEY_PARAMETERS and fields.get(dotted) != value:
            raise ModelLoadError(f"storage parameter {dotted[:80]!r} may not change storage key {name!r} (a "
                                 f"registration may set only {', '.join(sorted(KEY_PARAMETERS))}); name a key "
                                 "for that store instead")
        _set_path(fields, dotted, value)
    kind = fields.get("type")
    if not isinstance(kind, str) or not kind:
        where = f"storage key {name!r}" if name else f"no storage key (and no {location.key_name!r} key)"
        raise ModelLoadError(f"{where}: the storage type is not given (storage_params.type or the key's type)")
    if kind not in TYPES:
        raise ModelLoadError(f"storage type {kind[:40]!r} is not one of {', '.join(TYPES)}")
    return Resolved(key=name, type=kind, fields=fields, ambient=found.get(AMBIENT) is True)


__all__ = ["AMBIENT", "KEY_PARAMETERS", "SECRET_FIELDS", "TYPES", "ModelKey", "Resolved", "StorageKeys",
           "UnknownStorageKey", "resolve"]
