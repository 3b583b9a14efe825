"""Least-privilege etcd users, one per component, as deploy/ sets them up: a real etcd with TLS and
client-certificate authentication (the certificate's common name is the user), prepared by
``python -m mesh.registry.bootstrap`` (the Job of deploy/base/etcd.yaml), then a router and a
runtime on 127.0.0.1 each with its own certificate.

The mesh works end to end; the runtime's identity cannot write a registration or a vModel, nor read
vModels; a certificate of the same CA with another name is no user at all; bootstrapping again
changes nothing.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from mesh.errors import InvalidArgument
from mesh.registry import open_store
from mesh.registry.bootstrap import main as bootstrap
from mesh.registry.etcd_server import EtcdProcess, EtcdTls
from mesh.registry.security import etcd_security
from mesh.router.app import serve_router
from mesh.runtime.app import serve_runtime
from mesh.settings import RegistrySettings, load_settings
from mesh.tensors import decode_response, encode_request
from tests.support.certs import CertAuthority
from tests.support.inprocess import start
from tests.support.models import make_model

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def test_bootstrap_then_each_component_with_its_own_user(tmp_path: Path) -> None:
    asyncio.run(_scenario(tmp_path))


async def _scenario(tmp_path: Path) -> None:
    (tmp_path / "pki").mkdir()
    ca = CertAuthority(tmp_path / "pki", "mesh")
    server = ca.issue("mesh-etcd")
    certs = {name: ca.issue(name) for name in ("root", "mesh-router", "mesh-runtime", "intruder")}
    etcd = EtcdProcess(tmp_path / "etcd", tls=EtcdTls(server.cert, server.key, ca.ca_file, client_cert_auth=True))
    etcd.start()
    try:
        args = ["--endpoints", f"https://{etcd.endpoint}", "--cacert", str(ca.ca_file),
                "--cert", str(certs["root"].cert), "--key", str(certs["root"].key), "--wait-s", "20"]
        assert await asyncio.to_thread(bootstrap, args) == 0
        assert await asyncio.to_thread(bootstrap, args) == 0  # idempotent

        def registry(name: str) -> dict[str, str]:
            return {"url": etcd.url, "ca_file": str(ca.ca_file), "cert_file": str(certs[name].cert),
                    "key_file": str(certs[name].key)}

        def settings(name: str):  # type: ignore[no-untyped-def]
            return load_settings(env={}, overrides={
                "registry": {**registry(name), "lease_ttl_s": 5}, "log": {"level": "warning"},
                "router": {"port": 0, "metrics_port": -1, "rest_port": -1}, "runtime": {"port": 0, "metrics_port": -1,
                                                                        "publish_interval_s": 0.2}})

        runtime = await start(serve_runtime, settings("mesh-runtime"))
        router = await start(serve_router, settings("mesh-router"))
        try:
            import grpc

            from mesh.gen.inference import grpc_service_pb2_grpc as pb_grpc
            from mesh.gen.mmesh import model_mesh_pb2 as mm
            from mesh.gen.mmesh import model_mesh_pb2_grpc as mm_grpc

            model = make_model("sklearn", tmp_path, seed=1)
            async with grpc.aio.insecure_channel(router.endpoint) as channel:
                await mm_grpc.ModelMeshStub(channel).registerModel(mm.RegisterModelRequest(
                    modelId="m", modelInfo=mm.ModelInfo(type="sklearn", path=str(model.path))), timeout=10)
                await mm_grpc.ModelMeshStub(channel).setVModel(mm.SetVModelRequest(
                    vModelId="v", targetModelId="m"), timeout=10)
                reply = await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                    encode_request(model_name="m", inputs={"x": model.sample}),
                    metadata=(("mm-vmodel-id", "v"),), timeout=30)
            np.testing.assert_array_equal(decode_response(reply)["predict"], model.expected["predict"])
        finally:
            await router.stop()
            await runtime.stop()

        as_runtime = etcd_security(RegistrySettings(**registry("mesh-runtime")))  # type: ignore[arg-type]
        store, prefix = open_store(etcd.url, timeout_s=5, security=as_runtime)
        try:
            assert (await store.get(f"{prefix}models/m")) is not None  # it may read registrations
            for attempt in (store.put(f"{prefix}models/evil", b"{}"), store.put(f"{prefix}vmodels/v", b"{}"),
                            store.delete(f"{prefix}models/m"), store.get(f"{prefix}vmodels/v")):
                with pytest.raises(InvalidArgument, match="refused"):
                    await attempt
        finally:
            await store.close()
        as_intruder = etcd_security(RegistrySettings(**registry("intruder")))  # type: ignore[arg-type]
        store, prefix = open_store(etcd.url, timeout_s=5, security=as_intruder)
        try:
            with pytest.raises(InvalidArgument, match="refused"):
                await store.get(f"{prefix}models/m")
        finally:
            await store.close()
    finally:
        etcd.stop()
