"""gRPC server reflection on the router, as grpcurl uses it: a client with no .proto file lists the
router's services, builds ModelInfer's request from the reflected descriptors and gets a real
model's answer; ``router.reflection = false`` turns it off (UNIMPLEMENTED)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from tests.support.inprocess import InProcessMesh, memory_url
from tests.support.models import make_model

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _reflect_and_infer(endpoint: str, model_id: str, rows: list[list[float]]) -> tuple[list[str], list[int]]:
    """What grpcurl does: list the services, then call ModelInfer built only from reflection."""
    with grpc.insecure_channel(endpoint) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = sorted(database.get_services())
        pool = descriptor_pool.DescriptorPool(database)
        method = pool.FindServiceByName("inference.GRPCInferenceService").methods_by_name["ModelInfer"]
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        request = request_class(model_name=model_id)
        tensor = request.inputs.add(name="input", datatype="FP64", shape=[len(rows), len(rows[0])])
        tensor.contents.fp64_contents.extend(v for row in rows for v in row)
        call = channel.unary_unary(f"/{method.containing_service.full_name}/{method.name}",
                                   request_serializer=lambda m: m.SerializeToString(),
                                   response_deserializer=response_class.FromString)
        answer = call(request, timeout=30)
        return services, list(answer.outputs[0].contents.int64_contents)


async def test_a_client_with_no_protos_lists_and_calls_the_router(tmp_path: Path) -> None:
    model = make_model("sklearn", tmp_path, seed=2)
    mesh = await InProcessMesh(memory_url()).start(runtimes=1)
    try:
        await mesh.register("iris", "sklearn", str(model.path))
        rows = model.sample[:3].astype(float).tolist()
        services, predictions = await asyncio.to_thread(_reflect_and_infer, mesh.router.endpoint,  # type: ignore[union-attr]
                                                        "iris", rows)
        assert services == ["grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                            "inference.GRPCInferenceService", "mmesh.ModelMesh", "mmesh.ModelMeshGraphs",
                            "mmesh.ModelMeshRoutes", "mmesh.ModelMeshStatus"]
        assert predictions == model.expected["predict"][:3].tolist()
    finally:
        await mesh.stop()


async def test_reflection_can_be_turned_off() -> None:
    mesh = await InProcessMesh(memory_url(), router_overrides={"reflection": False}).start(runtimes=1)
    try:
        def list_services() -> list[str]:
            with grpc.insecure_channel(mesh.router.endpoint) as channel:  # type: ignore[union-attr]
                return list(ProtoReflectionDescriptorDatabase(channel).get_services())

        with pytest.raises(grpc.RpcError) as caught:
            await asyncio.to_thread(list_services)
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]
    finally:
        await mesh.stop()
