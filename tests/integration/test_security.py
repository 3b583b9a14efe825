"""TLS and mTLS on the router's and runtimes' ports, bearer tokens on the management API and the data
plane, etcd over TLS with a user and password, and no secret in the logs: real servers on 127.0.0.1,
certificates made by the test."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh.controller.predictor import Registration
from mesh.controller.router_client import RouterClient, RouterError
from mesh.errors import Code, InvalidArgument, RegistryUnavailable
from mesh.gen.inference import grpc_service_pb2 as pb
from mesh.gen.inference import grpc_service_pb2_grpc as pb_grpc
from mesh.gen.mmesh import model_mesh_pb2 as mm
from mesh.gen.mmesh import model_mesh_pb2_grpc as mm_grpc
from mesh.gen.mmesh import model_runtime_pb2 as rt
from mesh.gen.mmesh import model_runtime_pb2_grpc as rt_grpc
from mesh.logging import add_request_context, redact_secrets
from mesh.registry import open_store
from mesh.registry.etcd_server import EtcdProcess, EtcdTls
from mesh.registry.security import etcd_security
from mesh.router.app import serve_router
from mesh.settings import ControllerSettings, RegistrySettings, TlsSettings
from mesh.tensors import decode_response, encode_request
from mesh.transport.tls import runtime_channel_security, server_credentials
from tests.support.certs import CertAuthority, Pem
from tests.support.inprocess import Component, InProcessMesh, memory_url, start
from tests.support.models import ModelArtifact, make_model
from tests.support.tokens import tokens_toml

pytestmark = pytest.mark.integration

WRITER = "writer-token-5f1c0b2e9d7a4c3b"
READER = "reader-token-8a2d4e6f0b1c3d5e"
TEAM_A = "team-a-token-1b3d5f7a9c0e2d4f"
ETCD_PASSWORD = "etcd-pw-9e8d7c6b5a4f3e2d"


@dataclass(frozen=True)
class Pki:
    ca: CertAuthority
    server: Pem  # for 127.0.0.1: the router, the runtimes, etcd
    client: Pem  # signed by ca
    stranger: Pem  # signed by another CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca, other = CertAuthority(d, "mesh"), CertAuthority(d, "other")
    return Pki(ca, ca.issue("server"), ca.issue("client"), other.issue("client"))


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> ModelArtifact:
    return make_model("sklearn", tmp_path_factory.mktemp("models"), seed=1)


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "tokens.toml"
    path.write_text(tokens_toml(writer=WRITER, reader=READER, team_a=TEAM_A,
                                team_a_extra='storage_keys = ["team-a-s3"]\n'))
    return path


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def tls_channel(endpoint: str, pki: Pki, client: Pem | None) -> grpc.aio.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.ca_file.read_bytes(),
        private_key=client.key.read_bytes() if client else None,
        certificate_chain=client.cert.read_bytes() if client else None)
    return grpc.aio.secure_channel(endpoint, creds)


def infer_request(model: ModelArtifact) -> pb.ModelInferRequest:
    return encode_request(model_name="", inputs={"input-0": model.sample})


async def infer(channel: grpc.aio.Channel, model_id: str, model: ModelArtifact,
                metadata: tuple[tuple[str, str], ...] = ()) -> np.ndarray:
    response = await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
        infer_request(model), metadata=(("mm-model-id", model_id), *metadata), timeout=30)
    return decode_response(response)["predict"]


def tls_settings(pki: Pki, *, client_auth: str = "require") -> dict[str, str]:
    """Router and runtimes serve TLS and require client certificates; the router presents its own to
    runtimes."""
    return {"cert_file": str(pki.server.cert), "key_file": str(pki.server.key),
            "client_ca_file": str(pki.ca.ca_file), "client_auth": client_auth,
            "runtime_ca_file": str(pki.ca.ca_file), "runtime_cert_file": str(pki.client.cert),
            "runtime_key_file": str(pki.client.key)}


# --- TLS and mTLS ---------------------------------------------------------------------------------
@pytest.fixture
async def tls_mesh(pki: Pki, model: ModelArtifact) -> AsyncIterator[InProcessMesh]:
    m = InProcessMesh(memory_url(), extra={"tls": tls_settings(pki)})
    await m.start(runtimes=1)
    channel = tls_channel(m.router.endpoint if m.router else "", pki, pki.client)
    try:
        await mm_grpc.ModelMeshStub(channel).registerModel(mm.RegisterModelRequest(
            modelId="iris", modelInfo=mm.ModelInfo(type="sklearn", path=str(model.path))), timeout=10)
        yield m
    finally:
        await channel.close()
        await m.stop()


async def expect_refused(channel: grpc.aio.Channel, model: ModelArtifact) -> None:
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await infer(channel, "iris", model)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await channel.close()


async def test_mtls_client_infers_through_the_router_to_a_tls_runtime(
        tls_mesh: InProcessMesh, pki: Pki, model: ModelArtifact) -> None:
    assert tls_mesh.router is not None
    channel = tls_channel(tls_mesh.router.endpoint, pki, pki.client)
    try:
        # The router reached the runtime over mTLS (runtimes require a client certificate too).
        np.testing.assert_array_equal(await infer(channel, "iris", model), model.expected["predict"])
    finally:
        await channel.close()


async def test_plaintext_no_certificate_and_foreign_ca_clients_are_refused(
        tls_mesh: InProcessMesh, pki: Pki, model: ModelArtifact) -> None:
    assert tls_mesh.router is not None
    endpoint = tls_mesh.router.endpoint
    await expect_refused(grpc.aio.insecure_channel(endpoint), model)
    await expect_refused(tls_channel(endpoint, pki, None), model)  # TLS, but no client certificate
    await expect_refused(tls_channel(endpoint, pki, pki.stranger), model)  # a certificate of another CA
    # Runtimes are closed to anyone without a certificate of the mesh's CA as well.
    await expect_refused(tls_channel(tls_mesh.runtimes[0].endpoint, pki, None), model)


async def test_runtimes_accept_only_the_named_peers(pki: Pki, model: ModelArtifact, tmp_path: Path) -> None:
    """With tls.allowed_peers, a certificate the mesh's CA signed is not enough: only the routers'
    name may call a runtime (SPI, inference, the multiplexed stream); health stays open to probes.
    The router (certificate "client") serves through the runtime; an intruder with a certificate of
    the same CA gets PERMISSION_DENIED on every runtime method, and cannot load a path of its own."""
    intruder = pki.ca.issue("intruder")
    health_port = _free_port()
    m = await InProcessMesh(memory_url(), extra={"tls": {**tls_settings(pki), "allowed_peers": "client"}},
                            runtime_overrides={"health_port": health_port}).start(runtimes=1)
    assert m.router is not None
    router = tls_channel(m.router.endpoint, pki, pki.client)
    runtime = tls_channel(m.runtimes[0].endpoint, pki, intruder)
    try:
        await mm_grpc.ModelMeshStub(router).registerModel(mm.RegisterModelRequest(
            modelId="iris", modelInfo=mm.ModelInfo(type="sklearn", path=str(model.path))), timeout=10)
        np.testing.assert_array_equal(await infer(router, "iris", model), model.expected["predict"])
        calls = [
            lambda: infer(runtime, "iris", model),
            lambda: rt_grpc.ModelRuntimeStub(runtime).loadModel(rt.LoadModelRequest(
                modelId="mine", modelType="sklearn", modelPath=str(tmp_path)), timeout=10),
            lambda: rt_grpc.ModelRuntimeStub(runtime).unloadModel(rt.UnloadModelRequest(modelId="iris"), timeout=10),
        ]
        for call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call()
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, err.value
        health = await health_pb2_grpc.HealthStub(runtime).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        # Kubernetes' gRPC probe speaks no TLS: the plaintext health port answers it, and only it.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{health_port}") as probe:
            reply = await health_pb2_grpc.HealthStub(probe).Check(
                health_pb2.HealthCheckRequest(service="liveness"), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await rt_grpc.ModelRuntimeStub(probe).unloadModel(rt.UnloadModelRequest(modelId="iris"), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        np.testing.assert_array_equal(await infer(router, "iris", model), model.expected["predict"])
    finally:
        await router.close()
        await runtime.close()
        await m.stop()


async def test_server_only_tls_accepts_clients_without_certificates(pki: Pki, model: ModelArtifact) -> None:
    settings = {"cert_file": str(pki.server.cert), "key_file": str(pki.server.key),
                "runtime_ca_file": str(pki.ca.ca_file)}
    m = await InProcessMesh(memory_url(), extra={"tls": settings}).start(runtimes=1)
    assert m.router is not None
    channel = tls_channel(m.router.endpoint, pki, None)
    try:
        await mm_grpc.ModelMeshStub(channel).registerModel(mm.RegisterModelRequest(
            modelId="iris", modelInfo=mm.ModelInfo(type="sklearn", path=str(model.path))), timeout=10)
        np.testing.assert_array_equal(await infer(channel, "iris", model), model.expected["predict"])
        await expect_refused(grpc.aio.insecure_channel(m.router.endpoint), model)
    finally:
        await channel.close()
        await m.stop()


async def test_controller_reaches_a_router_with_mtls_and_a_token(
        pki: Pki, model: ModelArtifact, tokens_file: Path, tmp_path: Path) -> None:
    """The controller's client (controller.router_* settings) registers through a router that
    requires a client certificate and a write token; without the token it gets the router's
    UNAUTHENTICATED, and a missing token file is a one-line settings error."""
    m = await InProcessMesh(memory_url(), extra={"tls": tls_settings(pki),
                                                 "auth": {"tokens_file": str(tokens_file)}}).start(runtimes=1)
    assert m.router is not None
    token_file = tmp_path / "token"
    token_file.write_text(WRITER + "\n")
    tls = {"router_endpoint": m.router.endpoint, "router_ca_file": str(pki.ca.ca_file),
           "router_cert_file": str(pki.client.cert), "router_key_file": str(pki.client.key)}
    good = RouterClient.from_settings(ControllerSettings(**tls, router_token_file=str(token_file)))
    anonymous = RouterClient.from_settings(ControllerSettings(**tls))
    reg = Registration(vmodel_id="ctl", model_id="ctl__1", type="sklearn", path=str(model.path), key="",
                       labels=())
    try:
        state = await good.set_vmodel(reg, owner="mesh-controller/ns", load_now=False)
        assert state.target_model_id == "ctl__1" or state.active_model_id == "ctl__1"
        with pytest.raises(RouterError) as err:
            await anonymous.vmodel_status("ctl", owner="mesh-controller/ns")
        assert err.value.code == Code.UNAUTHENTICATED
        with pytest.raises(InvalidArgument, match=r"controller\.router_token_file: cannot read"):
            RouterClient.from_settings(ControllerSettings(**tls, router_token_file=str(tmp_path / "nope")))
    finally:
        await good.close()
        await anonymous.close()
        await m.stop()


def test_bad_tls_settings_are_one_clear_error(pki: Pki, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    cases = [
        (TlsSettings(cert_file=str(tmp_path / "missing.pem"), key_file=str(pki.server.key)),
         r"tls.cert_file: cannot read .*missing.pem"),
        (TlsSettings(cert_file=str(pki.server.cert)), r"tls.key_file is required"),
        (TlsSettings(cert_file=str(garbage), key_file=str(pki.server.key)), r"not a certificate and its private key"),
        (TlsSettings(cert_file=str(pki.server.cert), key_file=str(pki.client.key)), r"not a certificate"),
        (TlsSettings(cert_file=str(pki.server.cert), key_file=str(pki.server.key), client_auth="require"),
         r"require needs tls.client_ca_file"),
        (TlsSettings(cert_file=str(pki.server.cert), key_file=str(pki.server.key), client_auth="maybe"),
         r"tls.client_auth: 'maybe'"),
        (TlsSettings(client_auth="require", client_ca_file=str(pki.ca.ca_file)), r"need TLS"),
    ]
    for settings, message in cases:
        with pytest.raises(InvalidArgument, match=message):
            server_credentials(settings)
    with pytest.raises(InvalidArgument, match=r"tls.runtime_ca_file: .*garbage.pem holds no usable CA"):
        runtime_channel_security(TlsSettings(runtime_ca_file=str(garbage)))
    with pytest.raises(InvalidArgument, match=r"need tls.runtime_ca_file"):
        runtime_channel_security(TlsSettings(runtime_cert_file=str(pki.client.cert)))


def test_mesh_serve_with_a_missing_certificate_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    env = {**os.environ, "MESH_TLS_CERT_FILE": str(tmp_path / "nope.pem"),
           "MESH_TLS_KEY_FILE": str(tmp_path / "nope-key.pem"), "MESH_ROUTER_METRICS_PORT": "-1"}
    proc = subprocess.run([sys.executable, "-m", "mesh", "serve", "router", "--registry", "memory://x",
                           "--port", "0"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "tls.cert_file: cannot read" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


# --- bearer tokens ----------------------------------------------------------------------------------
@dataclass
class AuthMesh:
    mesh: InProcessMesh
    data_plane_router: Component  # a second router over the same registry, with auth.data_plane on

    @property
    def router(self) -> str:
        assert self.mesh.router is not None
        return self.mesh.router.endpoint


@pytest.fixture
async def auth_mesh(tokens_file: Path, model: ModelArtifact) -> AsyncIterator[AuthMesh]:
    m = InProcessMesh(memory_url(), extra={"auth": {"tokens_file": str(tokens_file)}})
    await m.start(runtimes=1)
    second = InProcessMesh(m.registry_url, extra={"auth": {"tokens_file": str(tokens_file), "data_plane": True}})
    router2 = await start(serve_router, second.settings())
    try:
        await m.mesh.registerModel(mm.RegisterModelRequest(
            modelId="team-a/iris", modelInfo=mm.ModelInfo(type="sklearn", path=str(model.path))),
            metadata=bearer(WRITER), timeout=10)
        await m.mesh.registerModel(mm.RegisterModelRequest(
            modelId="team-b/iris", modelInfo=mm.ModelInfo(type="sklearn", path=str(model.path))),
            metadata=bearer(WRITER), timeout=10)
        yield AuthMesh(m, router2)
    finally:
        await router2.stop()
        await m.stop()


async def rpc_error(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    return err.value


async def test_management_needs_a_token_with_the_right_role_and_prefix(auth_mesh: AuthMesh) -> None:
    stub = auth_mesh.mesh.mesh
    status = mm.GetStatusRequest(modelId="team-a/iris")
    for metadata in ((), bearer("not-a-token"), (("authorization", WRITER),)):
        err = await rpc_error(stub.getModelStatus(status, metadata=metadata, timeout=5))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert err.details() == "missing or invalid bearer token"
    # read: may read, may not write
    reply = await stub.getModelStatus(status, metadata=bearer(READER), timeout=5)
    assert reply.status == mm.ModelStatusInfo.NOT_LOADED
    register = mm.RegisterModelRequest(modelId="team-a/new", modelInfo=mm.ModelInfo(type="sklearn", path="/x"))
    err = await rpc_error(stub.registerModel(register, metadata=bearer(READER), timeout=5))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "registerModel" in (err.details() or "")
    err = await rpc_error(stub.unregisterModel(mm.UnregisterModelRequest(modelId="team-a/iris"),
                                               metadata=bearer(READER), timeout=5))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "unregisterModel" in (err.details() or "")
    # write with prefix team-a/: inside it, yes; outside it, no, and the ID is named
    await stub.registerModel(register, metadata=bearer(TEAM_A), timeout=5)
    outside = mm.RegisterModelRequest(modelId="team-b/y", modelInfo=mm.ModelInfo(type="sklearn", path="/x"))
    err = await rpc_error(stub.registerModel(outside, metadata=bearer(TEAM_A), timeout=5))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "'team-b/y'" in (err.details() or "")
    err = await rpc_error(stub.getModelStatus(mm.GetStatusRequest(modelId="team-b/iris"),
                                              metadata=bearer(TEAM_A), timeout=5))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    # a vModel in the prefix may not point outside it
    err = await rpc_error(stub.setVModel(mm.SetVModelRequest(vModelId="team-a/v", targetModelId="team-b/iris"),
                                         metadata=bearer(TEAM_A), timeout=5))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "'team-b/iris'" in (err.details() or "")
    listed = await stub.listModels(mm.ListModelsRequest(prefix="team-a/"), metadata=bearer(TEAM_A), timeout=5)
    assert {e.modelId for e in listed.models} == {"team-a/iris", "team-a/new"}
    err = await rpc_error(stub.listModels(mm.ListModelsRequest(), metadata=bearer(TEAM_A), timeout=5))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_tenants_pull_only_with_their_storage_keys_and_no_secret_reaches_the_registry(
        auth_mesh: AuthMesh) -> None:
    stub = auth_mesh.mesh.mesh

    def register(model_id: str, path: str, key: dict[str, object]) -> mm.RegisterModelRequest:
        return mm.RegisterModelRequest(modelId=model_id, modelInfo=mm.ModelInfo(
            type="sklearn", path=path, key=json.dumps(key)))

    await stub.registerModel(register("team-a/s3", "sk/m.joblib", {"storage_key": "team-a-s3"}),
                             metadata=bearer(TEAM_A), timeout=5)
    for path, key, named in (("sk/m.joblib", {"storage_key": "team-b-s3"}, "'team-b-s3'"),
                             ("s3://team-b/m.joblib", {}, "'default_s3'"),
                             ("https://169.254.169.254/latest/meta-data", {}, "'default_http'"),
                             ("m.joblib", {"storage_params": {"type": "pvc", "name": "team-b"}}, "'pvc:team-b'")):
        err = await rpc_error(stub.registerModel(register("team-a/x", path, key), metadata=bearer(TEAM_A), timeout=5))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED and named in (err.details() or ""), err.details()
    # Secrets in the parameters would be stored in etcd and shown in status: refused for everyone.
    err = await rpc_error(stub.registerModel(register("team-a/y", "m.joblib", {
        "storage_key": "team-a-s3", "storage_params": {"secret_access_key": "s3cr3t-value"}}),
        metadata=bearer(WRITER), timeout=5))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "is a secret" in (err.details() or "")
    assert "s3cr3t" not in (err.details() or "")
    listed = await stub.listModels(mm.ListModelsRequest(prefix="team-a/"), metadata=bearer(TEAM_A), timeout=5)
    assert {e.modelId for e in listed.models} == {"team-a/iris", "team-a/s3"}


async def test_health_checks_never_need_a_token(auth_mesh: AuthMesh) -> None:
    for endpoint in (auth_mesh.router, auth_mesh.data_plane_router.endpoint):
        async with grpc.aio.insecure_channel(endpoint) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="liveness"), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            live = await pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=5)
            assert live.live


async def test_data_plane_auth_is_optional(auth_mesh: AuthMesh, model: ModelArtifact) -> None:
    expected = model.expected["predict"]
    # off (the default): inference needs no token
    async with grpc.aio.insecure_channel(auth_mesh.router) as channel:
        np.testing.assert_array_equal(await infer(channel, "team-a/iris", model), expected)
    # on: no token is UNAUTHENTICATED, a token works, a token's prefixes bound the models
    async with grpc.aio.insecure_channel(auth_mesh.data_plane_router.endpoint) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await infer(channel, "team-a/iris", model)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        np.testing.assert_array_equal(await infer(channel, "team-a/iris", model, bearer(READER)), expected)
        np.testing.assert_array_equal(await infer(channel, "team-a/iris", model, bearer(TEAM_A)), expected)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await infer(channel, "team-b/iris", model, bearer(TEAM_A))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "'team-b/iris'" in err.value.details()
        # without a header, model_name (field 1) is the model checked, as it is the one routed to
        request = encode_request(model_name="team-b/iris", inputs={"input-0": model.sample})
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, metadata=bearer(TEAM_A), timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_cli_with_a_token_works_and_without_prints_one_line(auth_mesh: AuthMesh, tmp_path: Path) -> None:
    async def mesh_cli(*args: str, token: str | None = None) -> tuple[int, str, str]:
        env = {k: v for k, v in os.environ.items() if k != "MESH_TOKEN"}
        if token:
            env["MESH_TOKEN"] = token
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mesh", *args, "--router", auth_mesh.router, "--timeout", "10",
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        return proc.returncode or 0, out.decode(), err.decode()

    rc, out, err = await mesh_cli("model", "status", "team-a/iris", "--token", READER)
    assert rc == 0 and "team-a/iris" in out, err
    rc, out, err = await mesh_cli("model", "status", "team-a/iris", token=READER)  # env MESH_TOKEN
    assert rc == 0, err
    token_file = tmp_path / "reader-token"
    token_file.write_text(READER + "\n")
    rc, out, err = await mesh_cli("model", "status", "team-a/iris", "--token-file", str(token_file))
    assert rc == 0, err  # not in the process list
    rc, out, err = await mesh_cli("model", "status", "team-a/iris", "--token-file", str(token_file) + ".missing")
    assert rc == 2 and err.strip().count("\n") == 0 and "--token-file" in err
    rc, out, err = await mesh_cli("model", "status", "team-a/iris")
    assert rc != 0
    assert err.strip().splitlines() == ["mesh: error: UNAUTHENTICATED: missing or invalid bearer token"]
    rc, out, err = await mesh_cli("model", "unregister", "team-a/iris", "--token", READER)
    assert rc != 0 and len(err.strip().splitlines()) == 1 and "PERMISSION_DENIED" in err
    assert READER not in out + err


# --- etcd over TLS, with a user and password; and no secret in the logs ------------------------------
def etcdctl(etcd: EtcdProcess, pki: Pki, *args: str, user: str | None = None) -> None:
    binary = etcd.binary.parent / "etcdctl"
    cmd = [str(binary), f"--endpoints=https://{etcd.endpoint}", f"--cacert={pki.ca.ca_file}",
           f"--cert={pki.client.cert}", f"--key={pki.client.key}", *args]
    if user:
        cmd.append(f"--user={user}")
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)


@pytest.fixture
def secure_etcd(tmp_path: Path, pki: Pki) -> Iterator[EtcdProcess]:
    server = EtcdProcess(tmp_path / "etcd", tls=EtcdTls(pki.server.cert, pki.server.key, pki.ca.ca_file,
                                                        client_cert_auth=True))
    server.start()
    try:
        etcdctl(server, pki, "user", "add", f"root:{ETCD_PASSWORD}")
        etcdctl(server, pki, "user", "grant-role", "root", "root")
        etcdctl(server, pki, "auth", "enable")
        yield server
    finally:
        server.stop()


def registry_settings(etcd: EtcdProcess, pki: Pki, **changes: str) -> RegistrySettings:
    values = {"url": etcd.url, "ca_file": str(pki.ca.ca_file), "cert_file": str(pki.client.cert),
              "key_file": str(pki.client.key), "username": "root", "password": ETCD_PASSWORD, **changes}
    return RegistrySettings(**values)  # type: ignore[arg-type]


async def test_etcd_with_tls_and_credentials(secure_etcd: EtcdProcess, pki: Pki, tmp_path: Path) -> None:
    good = registry_settings(secure_etcd, pki)
    store, _ = open_store(good.url, timeout_s=2.0, security=etcd_security(good))
    try:
        await store.put("/t/k", b"v")
        assert (await store.get("/t/k")).value == b"v"  # type: ignore[union-attr]
    finally:
        await store.close()
    # the password from a file works the same
    (tmp_path / "pw").write_text(ETCD_PASSWORD + "\n")
    from_file = registry_settings(secure_etcd, pki, password="", password_file=str(tmp_path / "pw"))
    store, _ = open_store(from_file.url, timeout_s=2.0, security=etcd_security(from_file))
    try:
        assert (await store.get("/t/k")) is not None
    finally:
        await store.close()
    # wrong password: a clear error naming the user, not the password
    wrong = registry_settings(secure_etcd, pki, password="wrong-password-123")
    store, _ = open_store(wrong.url, timeout_s=2.0, security=etcd_security(wrong))
    try:
        with pytest.raises(InvalidArgument, match=r"refused .* for user 'root'") as err:
            await store.get("/t/k")
        assert "wrong-password-123" not in err.value.message
    finally:
        await store.close()
    # no user and password: etcd takes the client certificate's common name as the user, which
    # has no role here
    anonymous = registry_settings(secure_etcd, pki, username="", password="")
    store, _ = open_store(anonymous.url, timeout_s=2.0, security=etcd_security(anonymous))
    try:
        with pytest.raises(InvalidArgument, match=r"refused .* for the user its client certificate names"):
            await store.get("/t/k")
    finally:
        await store.close()
    # no client certificate (etcd requires one), and plaintext: unavailable
    for settings in (registry_settings(secure_etcd, pki, cert_file="", key_file=""),
                     registry_settings(secure_etcd, pki, ca_file="", cert_file="", key_file="")):
        store, _ = open_store(settings.url, timeout_s=1.0, security=etcd_security(settings))
        try:
            with pytest.raises(RegistryUnavailable):
                await store.get("/t/k")
        finally:
            await store.close()


def test_registry_url_with_credentials_is_refused_without_echoing_them() -> None:
    with pytest.raises(InvalidArgument) as err:
        open_store("etcd://root:hunter2-secret@127.0.0.1:2379")
    assert "hunter2-secret" not in err.value.message and "registry.username" in err.value.message


async def test_no_secret_in_the_logs(secure_etcd: EtcdProcess, pki: Pki, tokens_file: Path,
                                     model: ModelArtifact) -> None:
    """A whole mesh on the secured etcd, TLS, tokens on both planes, debug logs and the access log on:
    neither a token nor the etcd password nor a private key appears in anything logged."""
    buffer = io.StringIO()
    saved = structlog.get_config()
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, add_request_context, redact_secrets,
                    structlog.processors.add_log_level, structlog.processors.format_exc_info,
                    structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(10), logger_factory=structlog.PrintLoggerFactory(buffer),
        cache_logger_on_first_use=False)
    registry = {"ca_file": str(pki.ca.ca_file), "cert_file": str(pki.client.cert), "key_file": str(pki.client.key),
                "username": "root", "password": ETCD_PASSWORD}
    m = InProcessMesh(secure_etcd.url, log_overrides={"level": "debug", "access_log": True}, extra={
        "tls": tls_settings(pki), "auth": {"tokens_file": str(tokens_file), "data_plane": True},
        "registry": registry})
    try:
        await m.start(runtimes=1)
        assert m.router is not None
        channel = tls_channel(m.router.endpoint, pki, pki.client)
        try:
            stub = mm_grpc.ModelMeshStub(channel)
            await stub.registerModel(mm.RegisterModelRequest(
                modelId="team-a/iris", modelInfo=mm.ModelInfo(type="sklearn", path=str(model.path))),
                metadata=bearer(TEAM_A), timeout=10)
            np.testing.assert_array_equal(await infer(channel, "team-a/iris", model, bearer(WRITER)),
                                          model.expected["predict"])
            for token in (READER, "wrong-" + WRITER):
                with pytest.raises(grpc.aio.AioRpcError):
                    await stub.unregisterModel(mm.UnregisterModelRequest(modelId="team-a/iris"),
                                               metadata=bearer(token), timeout=5)
            with pytest.raises(grpc.aio.AioRpcError):
                await infer(channel, "team-b/iris", model, bearer(TEAM_A))
        finally:
            await channel.close()
    finally:
        await m.stop()
        structlog.configure(**saved)
    logged = buffer.getvalue()
    assert "request denied" in logged and "router serving" in logged  # the capture did capture
    for secret in (WRITER, READER, TEAM_A, ETCD_PASSWORD):
        assert secret not in logged
    for key in (pki.server.key, pki.client.key):
        body = "".join(key.read_text().strip().splitlines()[1:-1])
        assert body[:40] not in logged.replace("\\n", "")
