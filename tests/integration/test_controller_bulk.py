"""The controller registers many objects through the bulk ``registerModels`` (real router and
runtime on 127.0.0.1, the controller process assembly, the fake Kubernetes API server): when many
Predictors arrive at once the router gets a few calls of many items, not one setVModel each, and
each Predictor's status is still written from its own item's result (one refused by the router
says so, the others are Loaded). A router without the RPC is sent setVModel, one per object."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest

from mesh.controller.router_client import Coalescer, RouterUnreachable
from mesh.gen.mmesh import model_mesh_pb2 as mm
from mesh.router.servicer import ModelMeshServicer
from tests.integration.test_controller import NS, OWNER, Env, models, spec_for, up_to_date, wait_for
from tests.support.fake_kube import FakeKubeApiServer
from tests.support.inprocess import InProcessMesh, memory_url
from tests.support.models import ModelArtifact

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
__all__ = ["models"]  # the module-scoped fixture, shared with test_controller

COUNT = 40


def counting(monkeypatch: pytest.MonkeyPatch, calls: Counter[str], items: Counter[str], sizes: list[int]) -> None:
    """Count the management calls the router serves (the servicer is built at router start)."""
    for name in ("registerModels", "setVModel"):
        inner = getattr(ModelMeshServicer, name)

        def wrap(inner: Callable[..., Awaitable[Any]], name: str) -> Callable[..., Awaitable[Any]]:
            async def counted(self: ModelMeshServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
                calls[name] += 1
                items[name] += len(request.items) if name == "registerModels" else 1
                if name == "registerModels":
                    sizes.append(len(request.items))
                return await inner(self, request, context)
            return counted

        monkeypatch.setattr(ModelMeshServicer, name, wrap(inner, name))


async def test_many_predictors_at_once_go_through_few_bulk_calls(
        monkeypatch: pytest.MonkeyPatch, models: tuple[ModelArtifact, ...]) -> None:
    calls: Counter[str] = Counter()
    items: Counter[str] = Counter()
    sizes: list[int] = []
    counting(monkeypatch, calls, items, sizes)
    mesh = await InProcessMesh(memory_url()).start(runtimes=1)
    kube = FakeKubeApiServer(bookmark_interval_s=0.5).start()
    env = Env(mesh, kube)
    try:
        # A vModel of another owner: the Predictor of that name is refused, in its own status only.
        await mesh.register("someone-elses", "sklearn", str(models[0].path))
        await mesh.mesh.setVModel(mm.SetVModelRequest(vModelId="taken", targetModelId="someone-elses",
                                                      owner="another-tool"), timeout=10)
        calls.clear()
        names = [f"p-{i:02d}" for i in range(COUNT)] + ["taken"]
        for name in names:
            env.apply(name, spec_for(models[0]))
        await env.start_controller(workers=16)
        for name in names[:-1]:
            await wait_for(up_to_date(env, name), timeout=60, what=f"{name} Loaded")
        await wait_for(lambda: env.status("taken").get("lastFailureInfo"), what="taken refused")
        failure = env.status("taken")["lastFailureInfo"]
        assert failure["reason"] == "InvalidPredictorSpec" and "taken in the mesh" in failure["message"]
        info = await mesh.mesh.getVModelStatus(mm.GetVModelStatusRequest(vModelId="p-07"), timeout=5)
        assert info.owner == f"{OWNER}/{NS}" and info.activeModelId.startswith("p-07__")
        # One item per Predictor (the refused one may be tried again), in far fewer calls: the
        # first holds every worker's registration; later ones what the workers issue together.
        assert calls["setVModel"] == 0, calls
        assert items["registerModels"] >= len(names)
        assert max(sizes) >= 8 and calls["registerModels"] <= len(names) // 2, sizes
    finally:
        if env.controller is not None:
            await env.controller.stop()
        kube.stop()
        await mesh.stop()


async def test_a_router_without_the_rpc_gets_setvmodel(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[int] = []

    async def unimplemented(request: mm.RegisterModelsRequest) -> mm.RegisterModelsResponse:
        sent.append(len(request.items))
        raise RouterUnreachable("router x: UNIMPLEMENTED: Method not found!")

    coalescer = Coalescer(unimplemented, linger_s=0.01)
    results = await asyncio.gather(*(coalescer.submit(mm.RegisterModelsItem(modelId=f"m{i}", vModelId=f"v{i}"))
                                     for i in range(5)), return_exceptions=True)
    assert sent == [5] and all(isinstance(r, RouterUnreachable) for r in results)
    # The same vModel twice in one window: the second waits for the next call.
    answered: list[list[str]] = []

    async def ok(request: mm.RegisterModelsRequest) -> mm.RegisterModelsResponse:
        answered.append([it.vModelId for it in request.items])
        return mm.RegisterModelsResponse(results=[mm.RegisterModelsResult(index=i, modelId=it.modelId, code="OK")
                                                  for i, it in enumerate(request.items)])

    coalescer = Coalescer(ok, linger_s=0.01)
    await asyncio.gather(coalescer.submit(mm.RegisterModelsItem(modelId="a", vModelId="v")),
                         coalescer.submit(mm.RegisterModelsItem(modelId="b", vModelId="v")),
                         coalescer.submit(mm.RegisterModelsItem(modelId="c", vModelId="w")))
    assert answered == [["v", "w"], ["v"]]
