"""Object-store providers: list a model's objects and download them to local files.

One provider per load, built from a resolved storage key (``mesh.storage.config.Resolved``). Every
method is synchronous and runs in a pull thread (``mesh.storage.puller``), never on the event loop;
a download checks ``cancelled`` between chunks, so an abandoned pull stops.

Dependencies, chosen by measurement (docs/storage-notes.md section 5, BENCHMARKS.md section 11):

- **S3, GCS, Azure: obstore** (the optional extra ``storage``). One 16 MB wheel with no
  dependencies, a Rust client (object_store) for all three clouds with their auth, retries and
  custom endpoints, against boto3 + google-cloud-storage + azure-storage-blob (what KServe's
  storage initializer uses: ~35 MB for boto3 alone and three different APIs). On loopback it
  streamed at 0.84x / 0.91x / 0.80x of a raw HTTP GET for 1 MB / 100 MB / 1 GB objects (boto3:
  0.43x at 1 MB, its per-request overhead). Without the extra, a key of these types fails its load
  naming the extra.
- **HTTP(S): the standard library** (``urllib`` and ``ssl``). obstore's HTTP store has no client
  certificates, which pullman's ``http`` keys allow (``client_certificate``/``client_key``); one GET
  of one file needs nothing more.
- **pvc**: nothing is downloaded (``mesh.storage.puller`` reads the claim's mount in place).

pullman's rules kept (``pullman/storageproviders/*``, docs/storage-notes.md section 1): S3 is
path-style, with static credentials, an optional CA bundle (``certificate``) and ``endpoint_url``
/ ``region``; a model path is an object or a prefix (every object under ``<path>/``; 0-byte
objects and "directory" markers skipped); GCS takes a service account's ``private_key`` and
``client_email``; Azure takes ``account_name`` and ``container`` with a ``connection_string``,
a service principal, or neither; HTTP GETs ``url`` joined with the path, with ``headers``, a
``certificate`` (CA) and a client certificate, following redirects only within the key's scheme
and host (urllib would send the headers and the client certificate to any host). A key without
credentials reads anonymously: the runtime's own credentials (environment, instance metadata,
managed identity) only for a key file that says ``"use_ambient_credentials": true``
(``mesh.storage.config``). Our additions: that field, ``endpoint_url`` on gcs keys (emulators,
private endpoints), ``account_key`` / ``sas_token`` on azure keys.

Verification: every file's size must equal what the store listed, and where the store's ETag is
an MD5 (S3's single-part uploads: 32 hex digits), the MD5 of the bytes written must match it.

Errors are ``ModelLoadError`` naming the key, the bucket and the path, never a secret: not found,
access denied, endpoint unreachable (after the client's bounded retries with backoff).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import ssl
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from mesh.errors import ModelLoadError
from mesh.storage.config import Resolved

if TYPE_CHECKING:  # obstore is the optional extra: imported where a store is made
    from obstore.store import AzureConfig, ClientConfig, GCSConfig, RetryConfig, S3Config

CHUNK = 256 * 1024
HASH_WHILE_DOWNLOADING = 16 * 1024 * 1024  # objects above this are hashed as their bytes arrive
RANGE_PARALLELISM = 4
_MD5 = re.compile(r'^"?([0-9a-fA-F]{32})"?$')
_NO_RANGES: set[str] = set()  # stores that answered a ranged GET with the whole object
STORAGE_EXTRA = "pip install 'mesh-serving[storage]'"


@dataclass(frozen=True)
class StoredObject:
    key: str  # the object's key in the bucket (or path under the base URL)
    relative: str  # where it goes under the model's folder
    size: int  # -1: unknown until downloaded (HTTP without Content-Length)
    etag: str = ""
    # A GET already answered (its headers read, its body not): the download streams it instead
    # of asking again (a model of one object costs one request, not a HEAD and a GET).
    opened: Any = field(default=None, compare=False, repr=False)


class Hasher:
    """MD5 of the chunks given to ``update``, computed on the hashing thread while the next chunk
    downloads (hashlib releases the GIL on large buffers): the check costs no download time on a
    machine with a core to spare. One thread hashes for every pull, in the order chunks arrive
    (a thread per download cost more than hashing a small model). ``digest`` waits for the last
    chunk."""

    def __init__(self) -> None:
        self._md5 = hashlib.md5(usedforsecurity=False)

    def update(self, chunk: memoryview) -> None:
        _HASHING.submit(self._md5.update, chunk)

    def digest(self) -> str:
        return _HASHING.submit(self._md5.hexdigest).result()

    def abandon(self) -> None:
        pass  # the queued updates run and are dropped with the hasher


_HASHING = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pull-md5")


class Cancelled(Exception):
    """The pull was abandoned (its load timed out)."""


class Provider:
    """One store, as a resolved key describes it."""

    type = ""

    def __init__(self, resolved: Resolved, *, retries: int, connect_timeout_s: float) -> None:
        self.resolved = resolved
        self.fields = resolved.fields
        self.retries = retries
        self.connect_timeout_s = connect_timeout_s

    def where(self) -> str:
        """The store, for messages and logs: no secret."""
        raise NotImplementedError

    def identity(self) -> str:
        """What makes two locations the same bytes (endpoint, bucket): the disk cache's key."""
        return self.where()

    def objects(self, path: str, max_files: int, cancelled: threading.Event) -> list[StoredObject]:
        """The object at ``path``, else every object under ``path/`` (at most ``max_files``)."""
        raise NotImplementedError

    def download(self, obj: StoredObject, dest: Path, *, range_bytes: int,
                 cancelled: threading.Event, progress: Callable[[int], None]) -> Check | None:
        """Write ``obj`` to ``dest``, its size checked; the checksum comparison, which may still be
        computing on a thread of its own, is returned for the caller to run (None: nothing to
        compare), so that it overlaps whatever comes next (the model's load)."""
        raise NotImplementedError

    def _fail(self, what: str, path: str) -> ModelLoadError:
        key = f"storage key {self.resolved.key!r}" if self.resolved.key else "no storage key"
        return ModelLoadError(f"{what}: {path[:300]!r} in {self.where()} ({key})")


def _str(fields: dict[str, Any], name: str) -> str:
    value = fields.get(name, "")
    return value if isinstance(value, str) else ""


def _relative(key: str, path: str) -> str:
    """Where the object with ``key`` goes, for the model path ``path``: ``basename(path)`` for the
    object itself, ``basename(path)/rest`` for one under the prefix (pullman's layout)."""
    base = posixpath.basename(path.rstrip("/")) or "_model"
    if key == path:
        return base
    return posixpath.join(base, key[len(path):].lstrip("/"))


# Raises ModelLoadError when a finished download is not what the store holds; called with where the
# file is now (the puller renames its folder into place before it compares).
Check = Callable[[Path], None]


def check_size(obj: StoredObject, written: int) -> None:
    if obj.size >= 0 and written != obj.size:
        raise ModelLoadError(f"download of {obj.key[:300]!r} is incomplete: {written} of {obj.size} bytes")


def md5_check(obj: StoredObject, digest: Callable[[Path], str]) -> Check | None:
    """The MD5 comparison with the ETag, where the ETag is an MD5, to run when ``digest`` can
    answer (it may wait for a hashing thread, or read the file where it is). None where the store
    gives no MD5."""
    m = _MD5.match(obj.etag or "")
    if not m:
        return None
    expected = m.group(1).lower()

    def check(path: Path) -> None:
        if digest(path) != expected:
            raise ModelLoadError(f"download of {obj.key[:300]!r} does not match its ETag (checksum mismatch)")

    return check


def file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(8 * 1024 * 1024):
            digest.update(block)
    return digest.hexdigest()


class ObjectStoreProvider(Provider):
    """S3, GCS and Azure through obstore."""

    def __init__(self, resolved: Resolved, *, retries: int, connect_timeout_s: float) -> None:
        super().__init__(resolved, retries=retries, connect_timeout_s=connect_timeout_s)
        try:
            import obstore  # noqa: F401
        except ImportError:
            raise ModelLoadError(f"storage type {resolved.type!r} needs the storage extra: {STORAGE_EXTRA}") from None
        try:
            self.store = self._store()
        except ModelLoadError:
            raise
        except BaseException as exc:  # the Rust client panics on some configurations (a space in a URL)
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            raise ModelLoadError(f"storage key {resolved.key!r}: the {resolved.type} client refuses its configuration "
                                 f"({type(exc).__name__})") from None

    def _client_options(self, endpoint: str) -> ClientConfig:
        # The client's default bounds a whole request, body included, to 30 s: a large object
        # streamed from a store without ranges would fail. The load's deadline bounds a pull.
        options: ClientConfig = {"connect_timeout": timedelta(seconds=self.connect_timeout_s),
                                   "timeout": timedelta(hours=1), "allow_http": endpoint.startswith("http://")}
        certificate = _str(self.fields, "certificate")
        if certificate:
            options["root_certificate"] = certificate
        return options

    def _retry(self) -> RetryConfig:
        return {"max_retries": self.retries, "retry_timeout": timedelta(seconds=60),
                "backoff": {"init_backoff": timedelta(milliseconds=500), "max_backoff": timedelta(seconds=8),
                            "base": 2}}

    def _store(self) -> Any:
        raise NotImplementedError

    def objects(self, path: str, max_files: int, cancelled: threading.Event) -> list[StoredObject]:
        import obstore

        try:
            opened = obstore.get(self.store, path)  # the object itself: its body is streamed by download
            meta = opened.meta
            if meta["size"] > 0:
                return [StoredObject(path, _relative(path, path), meta["size"], meta.get("e_tag") or "", opened)]
        except (obstore.exceptions.NotFoundError, FileNotFoundError):
            pass
        except Exception as exc:
            raise self._error(exc, path) from None
        found: list[StoredObject] = []
        listed = 0  # every entry, skipped ones too: an endless listing of empty objects stops as well
        try:
            for batch in obstore.list(self.store, path.rstrip("/") + "/", chunk_size=1000):
                if cancelled.is_set():
                    raise Cancelled()
                listed += len(batch)
                if listed > 10 * max_files + 1000:
                    raise ModelLoadError(f"model {path[:300]!r} in {self.where()} lists more than {10 * max_files} "
                                         "entries (storage.max_files)")
                for meta in batch:
                    key = meta["path"]
                    if meta["size"] == 0 or key.endswith("/"):
                        continue
                    found.append(StoredObject(key, _relative(key, path), meta["size"], meta.get("e_tag") or ""))
                    if len(found) > max_files:
                        raise ModelLoadError(f"model {path[:300]!r} in {self.where()} has more than {max_files} "
                                             "objects (storage.max_files)")
        except (ModelLoadError, Cancelled):
            raise
        except Exception as exc:
            raise self._error(exc, path) from None
        if not found:
            raise self._fail("object not found", path)
        return found

    def download(self, obj: StoredObject, dest: Path, *, range_bytes: int,
                 cancelled: threading.Event, progress: Callable[[int], None]) -> Check | None:
        import obstore

        try:
            if 0 < range_bytes < obj.size and self.identity() not in _NO_RANGES:
                try:
                    return self._ranged(obj, dest, range_bytes, cancelled, progress)
                except obstore.exceptions.BaseError as exc:
                    if "non-partial" not in str(exc).lower() and "range" not in str(exc).lower():
                        raise
                    # The server answered a range with the whole object (rclone does): one
                    # stream, now and from now on for this store.
                    if len(_NO_RANGES) >= MAX_PROVIDERS:  # stores a registration may name: bounded
                        _NO_RANGES.clear()
                    _NO_RANGES.add(self.identity())
            return self._stream(obj, dest, cancelled, progress)
        except (ModelLoadError, Cancelled):
            raise
        except Exception as exc:
            raise self._error(exc, obj.key) from None

    def _stream(self, obj: StoredObject, dest: Path, cancelled: threading.Event,
                progress: Callable[[int], None]) -> Check | None:
        import obstore

        # A large object is hashed while it downloads (the hash keeps pace on the other core); a
        # small one after, beside its load: on 2 cores, hashing 1 MB while it arrives slowed its
        # download by a quarter (BENCHMARKS.md section 11).
        md5 = Hasher() if _MD5.match(obj.etag or "") and obj.size > HASH_WHILE_DOWNLOADING else None
        written = 0
        response = obj.opened if obj.opened is not None else obstore.get(self.store, obj.key)
        try:
            with open(dest, "wb") as out:
                for chunk in response.stream(min_chunk_size=CHUNK):
                    if cancelled.is_set():
                        raise Cancelled()
                    view = memoryview(chunk)
                    if obj.size >= 0 and written + len(view) > obj.size:
                        raise ModelLoadError(f"download of {obj.key[:300]!r} is longer than the {obj.size} bytes "
                                             "the store listed")
                    out.write(view)
                    if md5 is not None:
                        md5.update(view)
                    written += len(view)
                    progress(len(view))
            check_size(obj, written)
        except BaseException:
            if md5 is not None:
                md5.abandon()
            raise
        hasher = md5
        return md5_check(obj, lambda _path: hasher.digest()) if hasher is not None else md5_check(obj, file_md5)

    def _ranged(self, obj: StoredObject, dest: Path, range_bytes: int, cancelled: threading.Event,
                progress: Callable[[int], None]) -> Check | None:
        """Parallel ranges, RANGE_PARALLELISM at a time, written in place; the MD5 (where the ETag
        is one) is computed from the file afterwards, in order."""
        import obstore

        starts = list(range(0, obj.size, range_bytes))
        with open(dest, "wb") as out:
            out.truncate(obj.size)
            fd = out.fileno()
            for i in range(0, len(starts), RANGE_PARALLELISM):
                if cancelled.is_set():
                    raise Cancelled()
                group = starts[i:i + RANGE_PARALLELISM]
                ends = [min(s + range_bytes, obj.size) for s in group]
                parts = obstore.get_ranges(self.store, obj.key, starts=group, ends=ends, coalesce=0)
                for start, end, part in zip(group, ends, parts, strict=True):
                    view = memoryview(part)
                    if len(view) != end - start:
                        raise ModelLoadError(f"range {start}-{end} of {obj.key[:300]!r} came back with "
                                             f"{len(view)} bytes")
                    os.pwrite(fd, view, start)
                    progress(len(view))
        check_size(obj, dest.stat().st_size)
        return md5_check(obj, file_md5)  # read back in order, where the file is when the caller checks

    def _error(self, exc: Exception, path: str) -> ModelLoadError:
        import obstore

        errors = obstore.exceptions
        # obstore raises the built-in FileNotFoundError / PermissionError for these two.
        if isinstance(exc, errors.NotFoundError | FileNotFoundError):
            return self._fail("object not found", path)
        if isinstance(exc, errors.PermissionDeniedError | errors.UnauthenticatedError | PermissionError):
            return self._fail("access denied", path)
        text = str(exc).split("Debug source")[0]  # the rest is the client's internals (its retry settings)
        low = text.lower()
        if "nosuchbucket" in low or "containernotfound" in low or "404 not found" in low:
            return self._fail("object not found (or no such bucket)", path)
        if any(s in low for s in ("403", "forbidden", "accessdenied", "signaturedoesnotmatch",
                                  "invalidaccesskeyid", "authenticationfailed", "401")):
            return self._fail("access denied", path)
        if any(s in low for s in ("connect", "dns", "timed out", "unreachable", "error sending request")):
            return self._fail(f"storage endpoint unreachable after {self.retries} retries", path)
        first = text.strip().splitlines()[0][:200] if text.strip() else type(exc).__name__
        return self._fail(f"storage error ({_redact(first, self.fields)})", path)


def _redact(text: str, fields: dict[str, Any]) -> str:
    from mesh.storage.config import SECRET_FIELDS

    for name in SECRET_FIELDS:
        value = fields.get(name)
        if isinstance(value, str) and len(value) >= 4:
            text = text.replace(value, "***")
    return text


class S3Provider(ObjectStoreProvider):
    type = "s3"

    def where(self) -> str:
        endpoint = _str(self.fields, "endpoint_url") or "AWS"
        return f"s3 bucket {_str(self.fields, 'bucket')!r} at {endpoint}"

    def _store(self) -> Any:
        from obstore.store import S3Store

        bucket = _str(self.fields, "bucket")
        if not bucket:
            raise ModelLoadError(f"storage key {self.resolved.key!r}: no bucket (bucket, default_bucket or "
                                 "storage_params.bucket)")
        endpoint = _str(self.fields, "endpoint_url")
        config: S3Config = {"virtual_hosted_style_request": False}  # path-style, as pullman forces
        if endpoint:
            config["endpoint"] = endpoint
        config["region"] = _str(self.fields, "region") or "us-east-1"
        access, secret = _str(self.fields, "access_key_id"), _str(self.fields, "secret_access_key")
        if access and secret:
            config["access_key_id"], config["secret_access_key"] = access, secret
        elif not self.resolved.ambient:  # anonymous (pullman's static empty keys), never the runtime's own
            config["skip_signature"] = True
        return S3Store(bucket, config=config, client_options=self._client_options(endpoint or "https://"),
                       retry_config=self._retry())


class GcsProvider(ObjectStoreProvider):
    type = "gcs"

    def where(self) -> str:
        endpoint = _str(self.fields, "endpoint_url") or "Google Cloud Storage"
        return f"gcs bucket {_str(self.fields, 'bucket')!r} at {endpoint}"

    def _store(self) -> Any:
        import json

        from obstore.store import GCSStore

        bucket = _str(self.fields, "bucket")
        if not bucket:
            raise ModelLoadError(f"storage key {self.resolved.key!r}: no bucket")
        private_key, email = _str(self.fields, "private_key"), _str(self.fields, "client_email")
        if bool(private_key) != bool(email):
            raise ModelLoadError(f"storage key {self.resolved.key!r}: private_key and client_email go together")
        config: GCSConfig = {}
        endpoint = _str(self.fields, "endpoint_url")
        if endpoint:
            config["base_url"] = endpoint
        if private_key:
            account = {"type": "service_account", "private_key": private_key, "client_email": email,
                       "private_key_id": "", "token_uri": _str(self.fields, "token_uri")
                       or "https://oauth2.googleapis.com/token"}
            config["service_account_key"] = json.dumps(account)
        elif not self.resolved.ambient:
            config["skip_signature"] = True  # public objects, an emulator: never the runtime's own account
        return GCSStore(bucket, config=config, client_options=self._client_options(endpoint or "https://"),
                        retry_config=self._retry())


def parse_connection_string(text: str) -> dict[str, str]:
    """Azure's ``Key=Value;...`` connection string."""
    parts: dict[str, str] = {}
    for item in text.split(";"):
        name, sep, value = item.partition("=")
        if sep and name.strip():
            parts[name.strip()] = value.strip()
    return parts


class AzureProvider(ObjectStoreProvider):
    type = "azure"

    def _endpoint(self) -> str:
        connection = parse_connection_string(_str(self.fields, "connection_string"))
        if connection.get("BlobEndpoint"):
            return connection["BlobEndpoint"].rstrip("/")
        account = connection.get("AccountName") or _str(self.fields, "account_name")
        protocol = connection.get("DefaultEndpointsProtocol", "https")
        suffix = connection.get("EndpointSuffix", "core.windows.net")
        return f"{protocol}://{account}.blob.{suffix}"

    def where(self) -> str:
        return f"azure container {_str(self.fields, 'container')!r} at {self._endpoint()}"

    def _store(self) -> Any:
        from obstore.store import AzureStore

        container = _str(self.fields, "container")
        connection = parse_connection_string(_str(self.fields, "connection_string"))
        account = connection.get("AccountName") or _str(self.fields, "account_name")
        if not container or not account:
            raise ModelLoadError(f"storage key {self.resolved.key!r}: azure needs account_name and container")
        endpoint = self._endpoint()
        config: AzureConfig = {"account_name": account, "endpoint": endpoint}
        key = connection.get("AccountKey") or _str(self.fields, "account_key")
        sas = connection.get("SharedAccessSignature") or _str(self.fields, "sas_token")
        client_id, client_secret, tenant = (_str(self.fields, n) for n in ("client_id", "client_secret", "tenant_id"))
        if key:
            config["account_key"] = key  # obstore's documented name; "access_key" is its alias
        elif sas:
            config["sas_key"] = sas.lstrip("?")
        elif client_id and client_secret and tenant:
            config.update({"client_id": client_id, "client_secret": client_secret, "tenant_id": tenant})
        elif not self.resolved.ambient:
            config["skip_signature"] = True  # public containers: never the runtime's managed identity
        return AzureStore(container, config=config, client_options=self._client_options(endpoint),
                          retry_config=self._retry())


class HttpProvider(Provider):
    """One file by GET (module docstring)."""

    type = "http"

    def __init__(self, resolved: Resolved, *, retries: int, connect_timeout_s: float) -> None:
        super().__init__(resolved, retries=retries, connect_timeout_s=connect_timeout_s)
        self.base = _str(self.fields, "url").rstrip("/")
        parts = urlsplit(self.base)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ModelLoadError(f"storage key {resolved.key!r}: url must be an http(s) URL")
        self.headers = self._headers()
        self.context = self._context() if parts.scheme == "https" else None
        # Redirects are followed within the key's scheme and host only: urllib would send the
        # key's headers (and client certificate) to any host a redirect names, and downgrade https.
        self.opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=self.context),
                                                  _SameOriginRedirects())

    def where(self) -> str:
        parts = urlsplit(self.base)
        host = parts.netloc.rpartition("@")[2]  # never a user:password a url may carry
        return f"{parts.scheme}://{host}{parts.path}"

    def _headers(self) -> dict[str, str]:
        raw = self.fields.get("headers") or {}
        if not isinstance(raw, dict):
            raise ModelLoadError(f"storage key {self.resolved.key!r}: headers must be an object")
        headers: dict[str, str] = {}
        for name, value in raw.items():
            values = value if isinstance(value, list) else [value]
            if not all(isinstance(v, str) for v in values) or any("\n" in v or "\r" in v for v in values):
                raise ModelLoadError(f"storage key {self.resolved.key!r}: header {str(name)[:80]!r} must be text")
            headers[str(name)] = ", ".join(values)
        return headers

    def _context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        certificate = _str(self.fields, "certificate")
        if certificate:
            context.load_verify_locations(cadata=certificate)
        cert, key = _str(self.fields, "client_certificate"), _str(self.fields, "client_key")
        if bool(cert) != bool(key):
            raise ModelLoadError(f"storage key {self.resolved.key!r}: client_certificate and client_key go together")
        if cert:
            # ssl loads a client certificate from files only: a private folder, removed at once.
            with tempfile.TemporaryDirectory(prefix="mesh-tls-") as folder:
                pem = Path(folder) / "client.pem"
                fd = os.open(pem, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(cert.strip() + "\n" + key.strip() + "\n")
                try:
                    context.load_cert_chain(pem)
                except ssl.SSLError:
                    raise ModelLoadError(f"storage key {self.resolved.key!r}: client_certificate/client_key "
                                         "are not a PEM certificate and its key") from None
        return context

    def _url(self, path: str) -> str:
        base = urlsplit(self.base)
        joined = posixpath.join(base.path or "/", path)
        return f"{base.scheme}://{base.netloc}{quote(joined)}"

    def objects(self, path: str, max_files: int, cancelled: threading.Event) -> list[StoredObject]:
        return [StoredObject(path, _relative(path, path), -1)]  # one file, its size from the answer

    def download(self, obj: StoredObject, dest: Path, *, range_bytes: int,
                 cancelled: threading.Event, progress: Callable[[int], None]) -> Check | None:
        attempt = 0
        while True:
            try:
                return self._get(obj, dest, cancelled, progress)
            except _Transient as exc:
                attempt += 1
                if attempt > self.retries:
                    raise self._fail(f"storage endpoint unreachable after {self.retries} retries ({exc})",
                                     obj.key) from None
                if cancelled.wait(min(8.0, 0.5 * 2 ** (attempt - 1))):
                    raise Cancelled() from None

    def _get(self, obj: StoredObject, dest: Path, cancelled: threading.Event,
             progress: Callable[[int], None]) -> Check | None:
        request = urllib.request.Request(self._url(obj.key), headers=self.headers)
        try:
            response = self.opener.open(request, timeout=max(self.connect_timeout_s, 30.0))
        except urllib.error.HTTPError as exc:
            exc.close()
            if 300 <= exc.code < 400:
                raise self._fail(f"redirected to another host or scheme (HTTP {exc.code}; not followed: the key's "
                                 "headers would go with it)", obj.key) from None
            if exc.code in (401, 403):
                raise self._fail("access denied", obj.key) from None
            if exc.code == 404:
                raise self._fail("object not found", obj.key) from None
            if exc.code >= 500 or exc.code == 429:
                raise _Transient(f"HTTP {exc.code}") from None
            raise self._fail(f"HTTP {exc.code}", obj.key) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, ssl.SSLError):
                raise self._fail(f"TLS failure ({type(reason).__name__})", obj.key) from None
            raise _Transient(type(reason).__name__) from None
        with response:
            length = response.headers.get("Content-Length")
            expected = int(length) if length and length.isdigit() else -1
            etag = response.headers.get("ETag") or ""
            written = 0
            md5 = hashlib.md5(usedforsecurity=False) if _MD5.match(etag) else None
            with open(dest, "wb") as out:
                while True:
                    if cancelled.is_set():
                        raise Cancelled()
                    try:
                        # read1: what one receive gives, so that a store dripping bytes is
                        # cancelled at the next one (readinto would wait for a whole chunk).
                        view = memoryview(response.read1(CHUNK))
                    except OSError as exc:
                        raise _Transient(type(exc).__name__) from None
                    n = len(view)
                    if not n:
                        break
                    out.write(view)
                    if md5 is not None:
                        md5.update(view)
                    written += n
                    progress(n)
        answered = StoredObject(obj.key, obj.relative, expected, etag)
        check_size(answered, written)
        if md5 is None:
            return None
        computed = md5.hexdigest()  # hashed in the read loop: an HTTP body is read in small pieces
        return md5_check(answered, lambda _path: computed)


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    max_redirections = 5

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> urllib.request.Request | None:
        old, new = urlsplit(req.full_url), urlsplit(newurl)
        if (new.scheme, new.netloc) != (old.scheme, old.netloc):
            raise urllib.error.HTTPError(req.full_url, code, "redirect to another origin refused", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _Transient(Exception):
    """A failure worth another attempt (connection refused or reset, 5xx, 429)."""


PROVIDERS: dict[str, type[Provider]] = {"s3": S3Provider, "gcs": GcsProvider, "azure": AzureProvider,
                                        "http": HttpProvider}


_providers: dict[str, Provider] = {}  # one client per key's configuration, as pullman keeps one
_providers_lock = threading.Lock()
MAX_PROVIDERS = 256


def provider_for(resolved: Resolved, *, retries: int, connect_timeout_s: float) -> Provider:
    """The provider of a resolved key (not ``pvc``: read in place), kept and reused while the
    key's fields stay the same (a store's client holds its connections: building an S3 client took
    3.3 ms, a third of a 1 MB pull). A changed key builds a new one."""
    cls = PROVIDERS.get(resolved.type)
    if cls is None:
        raise ModelLoadError(f"storage type {resolved.type!r} has no downloader")
    identity = [resolved.key, resolved.type, resolved.fields, retries, connect_timeout_s]
    fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
    with _providers_lock:
        held = _providers.get(fingerprint)
    if held is not None:
        return held
    made = cls(resolved, retries=retries, connect_timeout_s=connect_timeout_s)
    with _providers_lock:
        if len(_providers) >= MAX_PROVIDERS:
            _providers.pop(next(iter(_providers)))
        return _providers.setdefault(fingerprint, made)


__all__ = [
    "PROVIDERS",
    "Cancelled",
    "Provider",
    "StoredObject",
    "check_size",
    "md5_check",
    "parse_connection_string",
    "provider_for",
]
