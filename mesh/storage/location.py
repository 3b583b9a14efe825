"""Whether a registration's model lives in object storage, and where: the registration's side.

A registration names object storage in one of two ways (modelmesh-serving's contract, and URIs):

- its ``ModelInfo.key`` names storage: a ``storage_key``, ``storage_params`` or the deprecated
  top-level ``bucket`` (the JSON modelmesh-serving's controller writes); ``path`` is then the
  object's path inside the bucket (or under the HTTP base URL, or in the claim);
- its ``path`` is a storage URI, mapped as modelmesh-serving's controller maps an
  InferenceService's ``storageUri`` (``processInferenceServiceStorage``): ``s3://B/p`` ->
  ``{type: s3, bucket: B}``; ``gs://B/p`` -> ``{type: gcs, bucket: B}``; ``pvc://C/p`` ->
  ``{type: pvc, name: C}``; ``https://A.blob.core.windows.net/C/p`` -> ``{type: azure,
  account_name: A, container: C}``; any other ``http(s)://host/p`` -> ``{type: http, url:
  "scheme://host"}``. The URI's parameters override the key's ``storage_params``.

Anything else (a plain path, ``file://``) is a local file, read under the model roots as before.

The storage key used is the one named, else ``default_<type>`` when the parameters give a type,
else ``default`` (pullman's rule; a missing default is no error there, and here neither: the
parameters alone must then say everything). :func:`locate` computes that name from the
registration alone, so the router can authorize it (``mesh.auth``: a tenant's token lists the
storage keys its registrations may use) without seeing the runtimes' keys.

Checked here, for routers (at registration: INVALID_ARGUMENT) and runtimes (at load) alike: the
path is bounded, has no NUL and no ``..`` component, and is relative to the bucket; the
parameters carry no secret (a registration is stored in etcd and shown by getModelStatus;
credentials belong in a storage key) and are bounded (``ModelKey.parse``).
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from mesh.errors import InvalidArgument
from mesh.paths import shown
from mesh.storage.config import SECRET_FIELDS, ModelKey

MAX_PATH = 1024  # S3's bound on a key, in characters here
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
SCHEMES = ("s3", "gs", "http", "https", "pvc", "file")
_AZURE_HOST = re.compile(r"^([a-z0-9]{3,24})\.blob\.core\.windows\.net$")


@dataclass(frozen=True)
class Location:
    """Where a registration's model is in object storage (module docstring)."""

    path: str  # inside the bucket / base URL / claim, without a leading '/'
    params: dict[str, str]  # storage_params, with the URI's over them
    key_name: str  # the storage key to use: named, default_<type> or default
    named: bool  # the registration named the key (a missing key is then an error)
    model_key: ModelKey

    @property
    def type_hint(self) -> str:
        """The provider type the parameters give ("" when only the key will say)."""
        return self.params.get("type", "")


def locate(path: str, key_text: str) -> Location | None:
    """The registration's storage location; None for a local file. InvalidArgument for a
    malformed key, a URI of an unknown scheme, a bad path or secrets in the parameters."""
    model_key = ModelKey.parse(key_text)
    match = _URI.match(path or "")
    scheme = match.group(1).lower() if match else ""
    if scheme and scheme not in SCHEMES:
        raise InvalidArgument(f"unsupported storage URI scheme {scheme[:20]!r}; supported: "
                              f"{', '.join(SCHEMES)}")
    names_storage = bool(model_key.storage_key or model_key.storage_params or model_key.bucket)
    if scheme == "file" or (not scheme and not names_storage):
        return None
    params = dict(model_key.storage_params)
    if scheme:
        uri_params, path = _from_uri(path, scheme)
        params.update(uri_params)
    check_params(params)
    path = check_object_path(path)
    if model_key.storage_key:
        name, named = model_key.storage_key, True
    else:
        name, named = (f"default_{params['type']}" if params.get("type") else "default"), False
    return Location(path=path, params=params, key_name=name, named=named, model_key=model_key)


def _from_uri(uri: str, scheme: str) -> tuple[dict[str, str], str]:
    if len(uri) > MAX_PATH + 300:
        raise InvalidArgument(f"storage URI is longer than {MAX_PATH + 300} characters")
    parts = urlsplit(uri)
    if parts.query or parts.fragment:
        raise InvalidArgument(f"storage URI {shown(uri)} has a query or fragment; put credentials in a "
                              "storage key (storage.config_dir), not in the URI")
    if parts.username is not None or parts.password is not None:
        raise InvalidArgument("storage URI carries credentials; put them in a storage key (storage.config_dir)")
    host, path = parts.netloc, unquote(parts.path)
    if not host:
        raise InvalidArgument(f"storage URI {shown(uri)} names no bucket or host")
    if scheme == "s3":
        return {"type": "s3", "bucket": host}, path
    if scheme == "gs":
        return {"type": "gcs", "bucket": host}, path
    if scheme == "pvc":
        return {"type": "pvc", "name": host}, path
    azure = _AZURE_HOST.match(host.lower())
    if azure and scheme == "https":
        container, _, rest = path.lstrip("/").partition("/")
        if not container:
            raise InvalidArgument(f"Azure blob URI {shown(uri)} names no container")
        return {"type": "azure", "account_name": azure.group(1), "container": container}, rest
    return {"type": "http", "url": f"{scheme}://{host}"}, path


def check_params(params: dict[str, str]) -> None:
    """No secret in ``storage_params`` (module docstring)."""
    for name in params:
        if name.split(".")[0] in SECRET_FIELDS:
            raise InvalidArgument(f"storage parameter {name[:80]!r} is a secret: registrations are stored in "
                                  "the registry and shown in status; put it in a storage key "
                                  "(storage.config_dir, the storage-config Secret)")


def check_object_path(path: str) -> str:
    """The object path without its leading '/'; InvalidArgument when unbounded or escaping."""
    if len(path) > MAX_PATH:
        raise InvalidArgument(f"model path is longer than {MAX_PATH} characters")
    if "\x00" in path or "\\" in path:
        raise InvalidArgument(f"model path {shown(path)} contains a NUL or a backslash")
    path = path.lstrip("/")
    if not path or path in (".",):
        raise InvalidArgument("the model has no storage path (the object or prefix in the bucket)")
    if ".." in path.split("/"):
        raise InvalidArgument(f"model path {shown(path)} has a '..' component")
    return posixpath.normpath(path)


__all__ = ["MAX_PATH", "SCHEMES", "Location", "check_object_path", "check_params", "locate"]
