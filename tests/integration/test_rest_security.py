"""The REST front end under the router's security settings, as its gRPC port is: bearer tokens for
the data plane (``auth.tokens_file`` with ``auth.data_plane``; health open), TLS from ``tls.cert_file``,
client certificates (``tls.client_auth = require``) and ``tls.allowed_peers``. Real servers on
127.0.0.1, certificates from throwaway CAs made by the test."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import joblib
import numpy as np
import pytest

from mesh.gen.mmesh import model_mesh_pb2 as mm
from mesh.gen.mmesh import model_mesh_pb2_grpc as mm_grpc
from tests.support.certs import CertAuthority, Pem
from tests.support.inprocess import InProcessMesh, memory_url
from tests.support.tokens import tokens_toml

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

WRITER = "rest-writer-token-3c5e7a9b1d2f4e6a"
READER = "rest-reader-token-9f8e7d6c5b4a3f2e"
TEAM_A = "rest-team-a-token-0a1b2c3d4e5f6a7b"
X = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5]]


@dataclass(frozen=True)
class Pki:
    ca: CertAuthority
    server: Pem  # the router's and the runtime's, for 127.0.0.1
    client: Pem  # signed by ca; also what the router presents to the runtime
    intruder: Pem  # signed by ca, another name
    stranger: Pem  # signed by another CA


@dataclass(frozen=True)
class Model:
    path: Path
    predict: list[int]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("rest-pki")
    ca, other = CertAuthority(d, "mesh"), CertAuthority(d, "other")
    return Pki(ca, ca.issue("server"), ca.issue("client"), ca.issue("intruder"), other.issue("client"))


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Model:
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    x, y = load_iris(return_X_y=True)
    estimator = LogisticRegression(max_iter=500).fit(x, y)
    path = tmp_path_factory.mktemp("rest-security") / "iris"
    path.mkdir()
    joblib.dump(estimator, path / "model.joblib")
    return Model(path, estimator.predict(np.array(X)).tolist())


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rest-auth") / "tokens.toml"
    path.write_text(tokens_toml(writer=WRITER, reader=READER, team_a=TEAM_A))
    return path


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def infer_body() -> dict[str, Any]:
    return {"inputs": [{"name": "x", "shape": [len(X), 4], "datatype": "FP64", "data": X}]}


async def request(url: str, method: str = "GET", body: Any = None, headers: Mapping[str, str] | None = None,
                  tls: ssl.SSLContext | bool = True) -> tuple[int, Any]:
    """(status, JSON body); connection failures raise (aiohttp.ClientError or OSError)."""
    connector = aiohttp.TCPConnector(ssl=tls)
    async with aiohttp.ClientSession(connector=connector) as session, session.request(
            method, url, json=body, headers=headers, timeout=aiohttp.ClientTimeout(total=20)) as response:
        assert response.content_type == "application/json", (response.status, await response.read())
        return response.status, await response.json()


# --- tokens --------------------------------------------------------------------------------------
@pytest.fixture
async def auth_mesh(tokens_file: Path, model: Model) -> AsyncIterator[InProcessMesh]:
    m = InProcessMesh(memory_url(), extra={"auth": {"tokens_file": str(tokens_file), "data_plane": True}})
    await m.start(runtimes=1)
    try:
        for model_id in ("team-a/iris", "team-b/iris"):
            await m.mesh.registerModel(mm.RegisterModelRequest(
                modelId=model_id, modelInfo=mm.ModelInfo(type="sklearn", path=str(model.path))),
                metadata=(("authorization", f"Bearer {WRITER}"),), timeout=10)
        yield m
    finally:
        await m.stop()


async def test_data_plane_tokens_over_rest(auth_mesh: InProcessMesh, model: Model) -> None:
    base = auth_mesh.rest_url
    infer_a, infer_b = f"{base}/v2/models/team-a%2Firis/infer", f"{base}/v2/models/team-b%2Firis/infer"
    # No token, an unknown one, one without the Bearer scheme: 401, the same words as gRPC.
    for headers in ({}, bearer("not-a-token"), {"Authorization": TEAM_A}, {"Authorization": f"Basic {TEAM_A}"}):
        status, body = await request(infer_a, "POST", infer_body(), headers)
        assert (status, body) == (401, {"error": "missing or invalid bearer token"}), headers
    # A token whose prefixes do not cover the model: 403 naming it, by path or by header.
    status, body = await request(infer_b, "POST", infer_body(), bearer(TEAM_A))
    assert status == 403 and "'team-b/iris'" in body["error"] and "team-a/" in body["error"]
    status, body = await request(infer_a, "POST", infer_body(), {**bearer(TEAM_A), "mm-model-id": "team-b/iris"})
    assert status == 403 and "'team-b/iris'" in body["error"]
    # Good tokens: the model's answers.
    for token, url in ((TEAM_A, infer_a), (READER, infer_b), (WRITER, infer_b)):
        status, body = await request(url, "POST", infer_body(), bearer(token))
        assert status == 200, body
        assert body["outputs"][0]["data"] == model.predict
    # Every endpoint naming a model needs the token: metadata, readiness, KServe V1.
    for method, path, payload in (("GET", "/v2/models/team-a%2Firis", None),
                                  ("GET", "/v2/models/team-a%2Firis/ready", None),
                                  ("GET", "/v1/models/team-a%2Firis", None),
                                  ("POST", "/v1/models/team-a%2Firis:predict", {"instances": X})):
        status, body = await request(base + path, method, payload)
        assert status == 401 and body["error"] == "missing or invalid bearer token", path
        status, body = await request(base + path, method, payload, bearer(TEAM_A))
        assert status == 200, (path, body)
        status, body = await request(base + path.replace("team-a", "team-b"), method, payload, bearer(TEAM_A))
        assert status == 403, (path, body)
    assert (await request(base + "/v1/models/team-a%2Firis:predict", "POST", {"instances": X},
                          bearer(TEAM_A)))[1] == {"predictions": model.predict}
    # Health stays open, as grpc.health.v1, ServerLive and ServerReady do on gRPC; server metadata
    # needs a token, any token, as ServerMetadata does.
    assert await request(base + "/v2/health/live") == (200, {"live": True})
    assert await request(base + "/v2/health/ready") == (200, {"ready": True})
    assert (await request(base + "/v2"))[0] == 401
    status, body = await request(base + "/v2", "GET", None, bearer(TEAM_A))
    assert status == 200 and body["name"] == "mesh-serving"


async def test_authorization_is_ignored_on_an_open_mesh_however_long(model: Model) -> None:
    """An API gateway in front of an open mesh (no tokens) attaches its own long JWT: the router
    neither checks nor forwards it (no client credential reaches a runtime), so it is no reason to
    refuse the request (the attacker review found 400s past 1 KiB)."""
    m = await InProcessMesh(memory_url()).start(runtimes=1)
    try:
        await m.mesh.registerModel(mm.RegisterModelRequest(
            modelId="iris", modelInfo=mm.ModelInfo(type="sklearn", path=str(model.path))), timeout=10)
        url = f"{m.rest_url}/v2/models/iris/infer"
        for authorization in ("Bearer " + "eyJ" + "x" * 1497, "Bearer " + "a" * 8000, "Bearer \t tab"):
            status, body = await request(url, "POST", infer_body(), {"Authorization": authorization})
            assert status == 200, (len(authorization), body)
            assert body["outputs"][0]["data"] == model.predict
    finally:
        await m.stop()


# --- TLS -----------------------------------------------------------------------------------------
def client_tls(pki: Pki, cert: Pem | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca.ca_file))
    if cert is not None:
        ctx.load_cert_chain(cert.cert, cert.key)
    return ctx


def tls_settings(pki: Pki, **more: str) -> dict[str, str]:
    """The router serves TLS with the server certificate; runtimes too, and the router dials them
    presenting the client certificate."""
    return {"cert_file": str(pki.server.cert), "key_file": str(pki.server.key),
            "runtime_ca_file": str(pki.ca.ca_file), "runtime_cert_file": str(pki.client.cert),
            "runtime_key_file": str(pki.client.key), **more}


async def tls_mesh(pki: Pki, model: Model, **tls: str) -> InProcessMesh:
    m = await InProcessMesh(memory_url(), extra={"tls": tls_settings(pki, **tls)}).start(runtimes=1)
    assert m.router is not None
    credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca.ca_file.read_bytes(),
                                               private_key=pki.client.key.read_bytes(),
                                               certificate_chain=pki.client.cert.read_bytes())
    async with grpc.aio.secure_channel(m.router.endpoint, credentials) as channel:
        await mm_grpc.ModelMeshStub(channel).registerModel(mm.RegisterModelRequest(
            modelId="iris", modelInfo=mm.ModelInfo(type="sklearn", path=str(model.path))), timeout=10)
    return m


async def refused(url: str, tls: ssl.SSLContext | bool) -> None:
    with pytest.raises((aiohttp.ClientError, OSError)):
        await request(url, "POST", infer_body(), tls=tls)


async def test_rest_serves_https_with_the_routers_certificate(pki: Pki, model: Model) -> None:
    m = await tls_mesh(pki, model)
    try:
        assert m.rest_url.startswith("https://127.0.0.1:")
        url = f"{m.rest_url}/v2/models/iris/infer"
        status, body = await request(url, "POST", infer_body(), tls=client_tls(pki))  # no client certificate needed
        assert status == 200 and body["outputs"][0]["data"] == model.predict
        assert await request(f"{m.rest_url}/v2/health/live", tls=client_tls(pki)) == (200, {"live": True})
        # Plain HTTP to the TLS port gets no answer; nor does a client that does not trust the CA.
        await refused(url.replace("https://", "http://"), tls=False)
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await request(url, "POST", infer_body(), tls=ssl.create_default_context())
    finally:
        await m.stop()


async def test_rest_requires_a_client_certificate_of_the_ca(pki: Pki, model: Model) -> None:
    m = await tls_mesh(pki, model, client_ca_file=str(pki.ca.ca_file), client_auth="require")
    try:
        url = f"{m.rest_url}/v2/models/iris/infer"
        await refused(url, client_tls(pki))  # no certificate
        await refused(url, client_tls(pki, pki.stranger))  # a certificate of another CA
        status, body = await request(url, "POST", infer_body(), tls=client_tls(pki, pki.client))
        assert status == 200 and body["outputs"][0]["data"] == model.predict
        status, body = await request(url, "POST", infer_body(), tls=client_tls(pki, pki.intruder))
        assert status == 200  # any name the CA signed, without allowed_peers
    finally:
        await m.stop()


async def test_rest_accepts_only_the_allowed_peers(pki: Pki, model: Model) -> None:
    m = await tls_mesh(pki, model, client_ca_file=str(pki.ca.ca_file), client_auth="require",
                       allowed_peers="client")
    try:
        url = f"{m.rest_url}/v2/models/iris/infer"
        status, body = await request(url, "POST", infer_body(), tls=client_tls(pki, pki.client))
        assert status == 200 and body["outputs"][0]["data"] == model.predict
        # The CA signed "intruder" too, but it is not among the allowed peers: 403, on every endpoint.
        for method, path, payload in (("POST", "/v2/models/iris/infer", infer_body()), ("GET", "/v2/models/iris", None),
                                      ("POST", "/v1/models/iris:predict", {"instances": X}),
                                      ("GET", "/v2/health/ready", None)):
            status, body = await request(m.rest_url + path, method, payload, tls=client_tls(pki, pki.intruder))
            assert status == 403 and "tls.allowed_peers" in body["error"], (path, body)
        await refused(url, client_tls(pki))  # and still no certificate, no connection
    finally:
        await m.stop()
