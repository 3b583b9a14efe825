"""The smart client (``mesh.client``) against real processes: a private etcd, runtimes and a router
started as ``mesh up`` starts them (``loadtest.cluster``), models trained here.

What is proved, each by what a user could observe:

- a request for a loaded model goes straight to the runtime: the router's ModelInfer count
  (``modelmesh_api_request_milliseconds``) does not move, the runtime's inference count does;
- a cold model and a vModel go through the router (which loads), and a copy that moves away
  (unloaded behind the client's back) still answers;
- a runtime SIGKILLed under the client's concurrent load fails no request: every answer is the
  model's own prediction;
- with ``auth.data_plane``, token prefixes hold on the route stream (it shows only the token's
  models, refuses a prefix outside them, and refuses a missing token) and on the runtime's port (a
  direct call outside the token's prefixes, or without a token, is refused by the runtime);
- with TLS, the client verifies runtimes with the CA and goes direct; runtimes that require client
  certificates (the router presents one) get no direct traffic: the stream says so;
- the router serves at most ``router.routes_max_streams`` streams.
"""

from __future__ import annotations

import asyncio
import os
import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loadtest.cluster import Cluster, Server
from loadtest.models import TrainedModel, infer_body, train_logistic
from mesh.client import SmartClient
from mesh.gen.inference import grpc_service_pb2 as pb
from mesh.gen.mmesh import model_mesh_pb2 as mm
from mesh.gen.mmesh import model_mesh_pb2_grpc as mm_grpc
from mesh.gen.mmesh import model_runtime_pb2 as spi
from mesh.gen.mmesh import model_runtime_pb2_grpc as spi_grpc
from mesh.gen.mmesh import routes_pb2 as rp
from mesh.tensors import decode_response
from tests.support.server_process import free_port
from tests.support.tokens import tokens_toml

pytestmark = pytest.mark.e2e

INFER = "/inference.GRPCInferenceService/ModelInfer"
WATCH = "/mmesh.ModelMeshRoutes/watchRoutes"
WRITER, READER, TEAM_A = "writer-token-0123456789", "reader-token-0123456789", "team-a-token-0123456789"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TrainedModel]:
    d = tmp_path_factory.mktemp("models")
    return {name: train_logistic(name, d, n_features=16, seed=i) for i, name in enumerate(("lr-a", "lr-b", "lr-c"))}


def expected(model: TrainedModel) -> np.ndarray:
    import joblib

    return joblib.load(model.path).predict(model.sample)


def check(answer: bytes, model: TrainedModel) -> None:
    got = decode_response(pb.ModelInferResponse.FromString(answer))["predict"]
    assert np.array_equal(got, expected(model)), (got, expected(model))


def md(model_id: str) -> tuple[tuple[str, str], ...]:
    return (("mm-model-id", model_id),)


def metric_count(port: int, name: str, method: str = "ModelInfer") -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == f"{name}_count" and sample.labels.get("method", "").endswith(method):
                total += sample.value
    return total


class Mesh:
    def __init__(self, cluster: Cluster, router: Server, runtimes: list[Server], router_metrics: int,
                 runtime_metrics: list[int]) -> None:
        self.cluster, self.router, self.runtimes = cluster, router, runtimes
        self.router_metrics, self.runtime_metrics = router_metrics, runtime_metrics

    def routed(self) -> float:
        return metric_count(self.router_metrics, "modelmesh_api_request_milliseconds")

    def served(self) -> float:
        return sum(metric_count(p, "modelmesh_invoke_model_milliseconds") for p in self.runtime_metrics)


def start_mesh(runtimes: int, env: dict[str, str] | None = None, router_env: dict[str, str] | None = None,
               runtime_env: dict[str, str] | None = None) -> tuple[Cluster, Mesh]:
    """Runtimes with a direct port (runtime.direct_port = 0: a free one) unless ``runtime_env`` says
    otherwise; ``env`` goes to every process."""
    cluster = Cluster()
    cluster.__enter__()
    try:
        ports = [free_port() for _ in range(runtimes)]
        started = [cluster.start_runtime(f"runtime-{i}", capacity_bytes=128 * 2**20,
                                         extra_env={"MESH_RUNTIME_METRICS_PORT": str(p),
                                                    "MESH_RUNTIME_DIRECT_PORT": "0",
                                                    **(env or {}), **(runtime_env or {})})
                   for i, p in enumerate(ports)]
        router_port = free_port()
        router = cluster.start_router(extra_env={"MESH_ROUTER_METRICS_PORT": str(router_port), **(env or {}),
                                                 **(router_env or {})})
    except BaseException:
        cluster.close()
        raise
    return cluster, Mesh(cluster, router, started, router_port, ports)


@pytest.fixture
def one_runtime() -> Iterator[Mesh]:
    cluster, mesh = start_mesh(1)
    try:
        yield mesh
    finally:
        cluster.close()


async def _register(mesh: Mesh, models: dict[str, TrainedModel], *, token: str | None = None,
                    ids: dict[str, str] | None = None) -> None:
    auth = (("authorization", f"Bearer {token}"),) if token else None
    async with grpc.aio.insecure_channel(mesh.router.endpoint) as channel:
        stub = mm_grpc.ModelMeshStub(channel)
        for name, model in models.items():
            model_id = (ids or {}).get(name, name)
            await stub.registerModel(mm.RegisterModelRequest(
                modelId=model_id, modelInfo=mm.ModelInfo(type="sklearn", path=str(model.path))),
                metadata=auth, timeout=30)


async def test_direct_when_loaded_router_for_cold_and_vmodels_and_moved_copies(
        one_runtime: Mesh, models: dict[str, TrainedModel]) -> None:
    mesh = one_runtime
    a, b = models["lr-a"], models["lr-b"]
    await _register(mesh, {"lr-a": a, "lr-b": b})
    async with grpc.aio.insecure_channel(mesh.router.endpoint) as channel:
        await mm_grpc.ModelMeshStub(channel).setVModel(
            mm.SetVModelRequest(vModelId="v-a", targetModelId="lr-a"), timeout=30)
    async with SmartClient(mesh.router.endpoint) as client:
        assert await client.wait_synced(10)
        # Cold: no route, so the router takes it and its home loads the model.
        check(await client(infer_body(a), metadata=md("lr-a"), timeout=30), a)
        assert client.counts == {"direct": 0, "routed": 1, "not_here": 0, "direct_failed": 0}
        assert await client.wait_route("lr-a", 10)

        routed, served = mesh.routed(), mesh.served()
        for _ in range(20):
            check(await client(infer_body(a), metadata=md("lr-a"), timeout=10), a)
        assert client.counts["direct"] == 20
        assert mesh.routed() == routed  # the router forwarded none of them
        assert mesh.served() == served + 20  # the runtime answered every one

        # A vModel always goes through the router (the client keeps no vModel targets).
        check(await client(infer_body(a), metadata=(("mm-vmodel-id", "v-a"),), timeout=10), a)
        # So does a request naming its model only in the body.
        check(await client(infer_body(a), timeout=10), a)
        assert client.counts["routed"] == 3
        assert mesh.routed() == routed + 2

        # A second cold model: through the router, then direct once its copy shows up.
        check(await client(infer_body(b), metadata=md("lr-b"), timeout=30), b)
        assert await client.wait_route("lr-b", 10)
        check(await client(infer_body(b), metadata=md("lr-b"), timeout=10), b)
        assert client.counts["direct"] == 21

        # The copy moves away behind the client's back: the runtime unloads it (as an eviction
        # does). The next request still answers: "not here" from the runtime (if the route was
        # still held) sends it through the router, which loads the model again.
        async with grpc.aio.insecure_channel(mesh.runtimes[0].endpoint) as channel:
            await spi_grpc.ModelRuntimeStub(channel).unloadModel(spi.UnloadModelRequest(modelId="lr-a"), timeout=10)
        before = dict(client.counts)
        check(await client(infer_body(a), metadata=md("lr-a"), timeout=30), a)
        assert client.counts["routed"] == before["routed"] + 1  # the router answered it
        assert client.counts["not_here"] + client.counts["direct"] >= before["not_here"] + before["direct"]
        # And the reloaded copy is routed to directly again (after the model's doubt expires).
        assert await client.wait_route("lr-a", 10)
        direct = client.counts["direct"]
        check(await client(infer_body(a), metadata=md("lr-a"), timeout=10), a)
        assert client.counts["direct"] == direct + 1


async def test_not_here_falls_back_to_the_router_and_drops_the_route(
        one_runtime: Mesh, models: dict[str, TrainedModel]) -> None:
    """A route the client still holds for a copy that is gone: the runtime says "not here" and the
    router answers (the client's stream is held back from updating: staleness is what is tested)."""
    mesh = one_runtime
    a = models["lr-a"]
    await _register(mesh, {"lr-a": a})
    async with SmartClient(mesh.router.endpoint, stale_after_s=60) as client:
        check(await client(infer_body(a), metadata=md("lr-a"), timeout=30), a)
        assert await client.wait_route("lr-a", 10)
        assert client._watcher is not None
        client._watcher.cancel()  # no more updates: the client keeps its (soon stale) route
        async with grpc.aio.insecure_channel(mesh.runtimes[0].endpoint) as channel:
            await spi_grpc.ModelRuntimeStub(channel).unloadModel(spi.UnloadModelRequest(modelId="lr-a"), timeout=10)
        client.routes.synced = True  # the cancelled watcher marked the routes lost; pretend they are current
        routed = client.counts["routed"]
        check(await client(infer_body(a), metadata=md("lr-a"), timeout=30), a)
        assert client.counts["not_here"] == 1
        assert client.counts["routed"] == routed + 1
        assert "lr-a" in client.routes.stale_models  # through the router until the stream catches up


async def test_runtime_sigkilled_under_load_fails_no_request(models: dict[str, TrainedModel]) -> None:
    cluster, mesh = start_mesh(2)
    try:
        await _register(mesh, models)
        async with SmartClient(mesh.router.endpoint) as client:
            for name, model in models.items():  # load them all (spread over both runtimes by hashing)
                check(await client(infer_body(model), metadata=md(name), timeout=30), model)
            for name in models:
                assert await client.wait_route(name, 10)
            holders = {client.routes.copies[name][0][0] for name in models}  # instance IDs: <name>-<our pid>
            victim = next(r for r in mesh.runtimes if f"{r.name}-{os.getpid()}" in holders)
            names = list(models)
            answered: list[int] = []
            failures: list[str] = []
            stop = asyncio.Event()

            async def worker(k: int) -> None:
                i = k
                while not stop.is_set():
                    name = names[i % len(names)]
                    i += 1
                    try:
                        check(await client(infer_body(models[name]), metadata=md(name), timeout=30), models[name])
                        answered.append(1)
                    except grpc.aio.AioRpcError as err:
                        failures.append(f"{name}: {err.code().name}: {err.details()}")

            workers = [asyncio.create_task(worker(k)) for k in range(16)]
            await asyncio.sleep(1.5)
            before_kill = len(answered)
            os.kill(victim.pid, signal.SIGKILL)
            await asyncio.sleep(6.0)  # past the victim's lease: its copies leave the routes
            stop.set()
            await asyncio.gather(*workers)
        assert failures == []
        assert before_kill > 0 and len(answered) > before_kill
        assert client.counts["direct_failed"] > 0  # requests were in flight on the killed runtime
        print(f"\nsmart client, runtime SIGKILLed under c=16: {len(answered)} answered, 0 failed, "
              f"counts {client.counts}")
    finally:
        cluster.close()


def _write_tokens(tmp_path: Path) -> Path:
    path = tmp_path / "tokens.toml"
    path.write_text(tokens_toml(writer=WRITER, reader=READER, team_a=TEAM_A))
    return path


async def _stream_error(endpoint: str, request: rp.WatchRoutesRequest, token: str | None) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(endpoint) as channel:
        watch = channel.stream_stream(WATCH, request_serializer=rp.WatchRoutesRequest.SerializeToString,
                                      response_deserializer=rp.RoutesUpdate.FromString)
        call = watch(iter([request]), metadata=(("authorization", f"Bearer {token}"),) if token else None, timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in call:
                pass
        return info.value.code()


async def test_token_prefixes_hold_on_the_stream_and_on_the_runtime(
        tmp_path: Path, models: dict[str, TrainedModel]) -> None:
    tokens = _write_tokens(tmp_path)
    env = {"MESH_AUTH_TOKENS_FILE": str(tokens), "MESH_AUTH_DATA_PLANE": "true"}
    cluster, mesh = start_mesh(1, env)
    try:
        a, b = models["lr-a"], models["lr-b"]
        await _register(mesh, {"lr-a": a, "lr-b": b}, token=WRITER, ids={"lr-a": "team-a/m", "lr-b": "team-b/m"})
        async with SmartClient(mesh.router.endpoint, token=WRITER) as admin:
            check(await admin(infer_body(a), metadata=md("team-a/m"), timeout=30), a)
            check(await admin(infer_body(b), metadata=md("team-b/m"), timeout=30), b)
            assert await admin.wait_route("team-a/m", 10) and await admin.wait_route("team-b/m", 10)
            # Direct with the admin token works on the runtime too (the runtime checks it).
            check(await admin(infer_body(b), metadata=md("team-b/m"), timeout=10), b)
            assert admin.counts["direct"] == 1

        async with SmartClient(mesh.router.endpoint, token=TEAM_A) as client:
            assert await client.wait_route("team-a/m", 10)
            assert set(client.routes.copies) == {"team-a/m"}  # the stream shows the token's models only
            check(await client(infer_body(a), metadata=md("team-a/m"), timeout=10), a)
            assert client.counts["direct"] == 1
            with pytest.raises(grpc.aio.AioRpcError) as info:  # no route, so the router refuses it
                await client(infer_body(b), metadata=md("team-b/m"), timeout=10)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED

        # Straight to the runtime's direct port (the endpoint the stream gives): the router's rules,
        # applied by the runtime.
        runtime = client.routes.copies["team-a/m"][0][1]
        assert runtime != mesh.runtimes[0].endpoint  # never the internal port
        async with grpc.aio.insecure_channel(runtime) as channel:
            call = channel.unary_unary(INFER)
            team_a = (("authorization", f"Bearer {TEAM_A}"),)
            check(await call(infer_body(a), metadata=(*md("team-a/m"), *team_a), timeout=10), a)
            for metadata, code in [((*md("team-b/m"), *team_a), grpc.StatusCode.PERMISSION_DENIED),
                                   (md("team-a/m"), grpc.StatusCode.UNAUTHENTICATED),
                                   ((*md("team-a/m"), ("authorization", "Bearer wrong-token-0123456789")),
                                    grpc.StatusCode.UNAUTHENTICATED)]:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call(infer_body(b), metadata=metadata, timeout=10)
                assert info.value.code() == code, info.value.details()

        # The stream itself: a token is needed; a prefix outside the token's is refused.
        endpoint = mesh.router.endpoint
        assert await _stream_error(endpoint, rp.WatchRoutesRequest(), None) == grpc.StatusCode.UNAUTHENTICATED
        assert await _stream_error(endpoint, rp.WatchRoutesRequest(modelIdPrefix="team-b/"), TEAM_A) \
            == grpc.StatusCode.PERMISSION_DENIED
        assert await _stream_error(endpoint, rp.WatchRoutesRequest(modelIdPrefix="x" * 300), READER) \
            == grpc.StatusCode.INVALID_ARGUMENT
        # A read token may watch (role read suffices).
        async with SmartClient(endpoint, token=READER) as reader:
            assert await reader.wait_route("team-b/m", 10)
    finally:
        cluster.close()


async def test_direct_port_serves_inference_only_and_the_stream_never_names_the_internal_port(
        tmp_path: Path, models: dict[str, TrainedModel]) -> None:
    """The attacker review's first finding: a tenant learned the runtime's address from its route
    stream and unloaded, loaded and inferred other tenants' models there without a token (the SPI
    and the multiplexed stream). Now the stream names the direct port, which serves V2 inference
    only, checks tokens, and never loads; a runtime without a direct port gets no direct traffic."""
    from mesh.transport.multiplex import MultiplexPool

    tokens = _write_tokens(tmp_path)
    env = {"MESH_AUTH_TOKENS_FILE": str(tokens), "MESH_AUTH_DATA_PLANE": "true"}
    cluster, mesh = start_mesh(1, env)
    try:
        a, b, c = models["lr-a"], models["lr-b"], models["lr-c"]
        await _register(mesh, {"lr-a": a, "lr-b": b, "lr-c": c}, token=WRITER,
                        ids={"lr-a": "team-a/m", "lr-b": "team-b/secret", "lr-c": "team-b/cold"})
        writer = (("authorization", f"Bearer {WRITER}"),)
        async with grpc.aio.insecure_channel(mesh.router.endpoint) as channel:
            for model_id, model in (("team-a/m", a), ("team-b/secret", b)):
                check(await channel.unary_unary(INFER)(infer_body(model), metadata=(*md(model_id), *writer),
                                                       timeout=30), model)
        async with SmartClient(mesh.router.endpoint, token=TEAM_A) as client:
            assert await client.wait_route("team-a/m", 10)
            endpoint = client.routes.copies["team-a/m"][0][1]
        internal = mesh.runtimes[0].endpoint
        assert endpoint != internal

        async with grpc.aio.insecure_channel(endpoint) as channel:
            # The SPI is not served on the direct port, whatever the token.
            stub = spi_grpc.ModelRuntimeStub(channel)
            for call, request in ((stub.unloadModel, spi.UnloadModelRequest(modelId="team-b/secret")),
                                  (stub.loadModel, spi.LoadModelRequest(modelId="team-b/cold")),
                                  (stub.runtimeStatus, spi.RuntimeStatusRequest())):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call(request, metadata=writer, timeout=10)
                assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
            # Nor is the routers' multiplexed stream.
            pool = MultiplexPool(1, 16 << 20)
            try:
                with pytest.raises(Exception):  # noqa: B017  # the stream is refused: any failure, never an answer
                    await pool.call(endpoint, channel, "team-b/secret", True, (), infer_body(b), 10)
            finally:
                pool.close()
            infer = channel.unary_unary(INFER)
            # V2 without a token, or outside the token's prefixes: refused.
            for metadata, code in [(md("team-b/secret"), grpc.StatusCode.UNAUTHENTICATED),
                                   ((*md("team-b/secret"), ("authorization", f"Bearer {TEAM_A}")),
                                    grpc.StatusCode.PERMISSION_DENIED)]:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await infer(infer_body(b), metadata=metadata, timeout=10)
                assert info.value.code() == code, info.value.details()
            # A cold model is never loaded from the direct port, even when the caller asks to load.
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await infer(infer_body(c), metadata=(*md("team-b/cold"), ("mesh-load", "allow"), *writer), timeout=10)
            assert any(k == "mesh-not-here" for k, _ in info.value.trailing_metadata() or ()), info.value.details()
            # The probes stay open; a permitted inference answers.
            live = await channel.unary_unary("/inference.GRPCInferenceService/ServerLive")(
                pb.ServerLiveRequest().SerializeToString(), timeout=10)
            assert pb.ServerLiveResponse.FromString(live).live
            check(await infer(infer_body(b), metadata=(*md("team-b/secret"), *writer), timeout=10), b)
        async with grpc.aio.insecure_channel(mesh.router.endpoint) as channel:
            status = await mm_grpc.ModelMeshStub(channel).getModelStatus(
                mm.GetStatusRequest(modelId="team-b/cold"), metadata=writer, timeout=10)
            assert status.status == mm.ModelStatusInfo.NOT_LOADED
    finally:
        cluster.close()


async def test_runtimes_without_a_direct_port_get_no_direct_traffic(models: dict[str, TrainedModel]) -> None:
    cluster, mesh = start_mesh(1, runtime_env={"MESH_RUNTIME_DIRECT_PORT": "-1"})
    try:
        a = models["lr-a"]
        await _register(mesh, {"lr-a": a})
        async with SmartClient(mesh.router.endpoint) as client:
            assert await client.wait_synced(10)
            for _ in range(3):
                check(await client(infer_body(a), metadata=md("lr-a"), timeout=30), a)
            await asyncio.sleep(0.5)  # time for a route to show up, were there one
            assert client.routes.copies == {} and client.counts["direct"] == 0
    finally:
        cluster.close()


async def test_max_streams(models: dict[str, TrainedModel]) -> None:
    cluster, mesh = start_mesh(1, router_env={"MESH_ROUTER_ROUTES_MAX_STREAMS": "2"})
    try:
        clients = [SmartClient(mesh.router.endpoint) for _ in range(2)]
        for c in clients:
            await c.start()
            assert await c.wait_synced(10)
        assert await _stream_error(mesh.router.endpoint, rp.WatchRoutesRequest(), None) \
            == grpc.StatusCode.RESOURCE_EXHAUSTED
        # A client refused a stream still answers, through the router.
        a = models["lr-a"]
        await _register(mesh, {"lr-a": a})
        async with SmartClient(mesh.router.endpoint) as third:
            check(await third(infer_body(a), metadata=md("lr-a"), timeout=30), a)
            assert third.counts["routed"] == 1
        await clients[0].close()  # a stream leaves: room for a new one
        async with SmartClient(mesh.router.endpoint) as fourth:
            assert await fourth.wait_synced(10)
        await clients[1].close()
    finally:
        cluster.close()


async def test_tls_direct_to_runtimes_also_when_their_internal_port_requires_client_certificates(
        tmp_path: Path, models: dict[str, TrainedModel]) -> None:
    """Runtimes serving TLS: the client verifies their direct port with the CA and goes direct. When
    their internal port requires client certificates and admits the routers only (mTLS with
    tls.allowed_peers), the direct port still serves clients without a certificate, and the
    internal port still refuses them."""
    from tests.support.certs import CertAuthority

    ca = CertAuthority(tmp_path, "mesh")
    server, router_client, outsider = ca.issue("server"), ca.issue("router"), ca.issue("outsider")
    tls = {"MESH_TLS_CERT_FILE": str(server.cert), "MESH_TLS_KEY_FILE": str(server.key),
           "MESH_TLS_RUNTIME_CA_FILE": str(ca.ca_file)}
    a = models["lr-a"]
    ca_pem = ca.ca_file.read_bytes()

    cluster, mesh = start_mesh(1, tls)
    try:
        async with grpc.aio.secure_channel(mesh.router.endpoint, grpc.ssl_channel_credentials(ca_pem)) as channel:
            await mm_grpc.ModelMeshStub(channel).registerModel(mm.RegisterModelRequest(
                modelId="lr-a", modelInfo=mm.ModelInfo(type="sklearn", path=str(a.path))), timeout=30)
        async with SmartClient(mesh.router.endpoint, root_certificates=ca_pem) as client:
            check(await client(infer_body(a), metadata=md("lr-a"), timeout=30), a)
            assert await client.wait_route("lr-a", 10)
            check(await client(infer_body(a), metadata=md("lr-a"), timeout=10), a)
            assert client.counts["direct"] == 1 and client.counts["direct_failed"] == 0
    finally:
        cluster.close()

    mtls = {**tls, "MESH_TLS_CLIENT_CA_FILE": str(ca.ca_file), "MESH_TLS_CLIENT_AUTH": "require",
            "MESH_TLS_RUNTIME_CERT_FILE": str(router_client.cert), "MESH_TLS_RUNTIME_KEY_FILE": str(router_client.key)}
    cluster, mesh = start_mesh(1, mtls, runtime_env={"MESH_TLS_ALLOWED_PEERS": "router"})
    try:
        creds = {"root_certificates": ca_pem, "private_key": router_client.key.read_bytes(),
                 "certificate_chain": router_client.cert.read_bytes()}
        async with grpc.aio.secure_channel(mesh.router.endpoint, grpc.ssl_channel_credentials(**creds)) as channel:
            await mm_grpc.ModelMeshStub(channel).registerModel(mm.RegisterModelRequest(
                modelId="lr-a", modelInfo=mm.ModelInfo(type="sklearn", path=str(a.path))), timeout=30)
        async with SmartClient(mesh.router.endpoint, **creds) as client:
            check(await client(infer_body(a), metadata=md("lr-a"), timeout=30), a)
            assert await client.wait_route("lr-a", 10)
            assert client.routes.direct
            for _ in range(3):
                check(await client(infer_body(a), metadata=md("lr-a"), timeout=10), a)
            assert client.counts["direct"] == 3 and client.counts["routed"] == 1
            direct_endpoint = client.routes.copies["lr-a"][0][1]
        # The direct port needs no client certificate ...
        async with grpc.aio.secure_channel(direct_endpoint, grpc.ssl_channel_credentials(ca_pem),
                                           options=[("grpc.ssl_target_name_override", "localhost")]) as channel:
            check(await channel.unary_unary(INFER)(infer_body(a), metadata=md("lr-a"), timeout=10), a)
        # ... while the internal port admits the routers only: another certificate of the same CA is refused.
        outsider_creds = grpc.ssl_channel_credentials(ca_pem, outsider.key.read_bytes(), outsider.cert.read_bytes())
        async with grpc.aio.secure_channel(mesh.runtimes[0].endpoint, outsider_creds,
                                           options=[("grpc.ssl_target_name_override", "localhost")]) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await spi_grpc.ModelRuntimeStub(channel).unloadModel(spi.UnloadModelRequest(modelId="lr-a"), timeout=10)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        cluster.close()


async def test_a_client_speaking_tls_to_the_router_never_goes_direct_in_plaintext(
        tmp_path: Path, models: dict[str, TrainedModel]) -> None:
    """The attacker review's TLS downgrade: the router serves TLS, runtimes plaintext. The router
    offers no direct routing (its clients' tokens and data would cross the network in clear)."""
    from tests.support.certs import CertAuthority

    ca = CertAuthority(tmp_path, "mesh")
    server = ca.issue("server")
    ca_pem = ca.ca_file.read_bytes()
    a = models["lr-a"]
    cluster, mesh = start_mesh(1, router_env={"MESH_TLS_CERT_FILE": str(server.cert),
                                              "MESH_TLS_KEY_FILE": str(server.key)})
    try:
        async with grpc.aio.secure_channel(mesh.router.endpoint, grpc.ssl_channel_credentials(ca_pem)) as channel:
            await mm_grpc.ModelMeshStub(channel).registerModel(mm.RegisterModelRequest(
                modelId="lr-a", modelInfo=mm.ModelInfo(type="sklearn", path=str(a.path))), timeout=30)
        async with SmartClient(mesh.router.endpoint, root_certificates=ca_pem, allow_plaintext_runtimes=True) as client:
            check(await client(infer_body(a), metadata=md("lr-a"), timeout=30), a)
            assert await client.wait_for(lambda: client.routes.synced and "lr-a" in client.routes.copies, 10)
            assert not client.routes.direct  # the router says no, whatever the client would allow
            check(await client(infer_body(a), metadata=md("lr-a"), timeout=10), a)
            assert client.counts["direct"] == 0 and client.counts["routed"] == 2
    finally:
        cluster.close()
