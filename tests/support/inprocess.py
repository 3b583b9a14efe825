"""A mesh inside the test's event loop: real gRPC servers on 127.0.0.1 (a router and N runtimes)
sharing one ``memory://`` registry, or a real etcd when the test passes its URL."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from mesh.gen.inference import grpc_service_pb2 as pb
from mesh.gen.inference import grpc_service_pb2_grpc as pb_grpc
from mesh.gen.mmesh import model_mesh_pb2 as mm
from mesh.gen.mmesh import model_mesh_pb2_grpc as mm_grpc
from mesh.router.app import serve_router
from mesh.runtime.app import serve_runtime
from mesh.settings import Settings, load_settings
from mesh.tasks import RootTasks


@dataclass
class Component:
    endpoint: str
    roots: RootTasks
    task: asyncio.Task[None]

    async def stop(self) -> None:
        self.roots.stop()
        await asyncio.wait_for(self.task, 30)


async def start(serve: Callable[..., Awaitable[None]], settings: Settings, **serve_kwargs: Any) -> Component:
    roots = RootTasks()
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def on_ready(endpoint: str) -> None:
        ready.set_result(endpoint)

    task = asyncio.create_task(serve(settings, roots, on_ready, **serve_kwargs))
    done, _ = await asyncio.wait({ready, task}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()  # raises the start-up error
        raise RuntimeError("component ended during start-up")
    if ready not in done:
        raise TimeoutError("component not ready within 30 s")
    return Component(ready.result(), roots, task)


@dataclass
class InProcessMesh:
    registry_url: str
    runtime_overrides: dict[str, Any] = field(default_factory=dict)
    router_overrides: dict[str, Any] = field(default_factory=dict)
    log_overrides: dict[str, Any] = field(default_factory=dict)
    # Further settings by group (tls, auth, registry security), merged over the ones above.
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)
    router: Component | None = None
    rest_url: str = ""  # the router's REST front end, e.g. http://127.0.0.1:40123
    runtimes: list[Component] = field(default_factory=list)
    channel: grpc.aio.Channel | None = None

    def settings(self, **runtime: Any) -> Settings:
        overrides: dict[str, dict[str, Any]] = {
            "registry": {"url": self.registry_url, "lease_ttl_s": 2, "failure_ttl_s": 30},
            "router": {"port": 0, "metrics_port": 0, "rest_port": 0, "default_timeout_s": 20.0,
                       **self.router_overrides},
            "runtime": {"port": 0, "metrics_port": 0, "publish_interval_s": 0.2, **self.runtime_overrides,
                        **runtime},
            "log": {"level": "warning", **self.log_overrides},
        }
        for group, values in self.extra.items():
            overrides[group] = {**overrides.get(group, {}), **values}
        return load_settings(env={}, overrides=overrides)

    async def add_runtime(self, *, serve_kwargs: dict[str, Any] | None = None, **overrides: Any) -> Component:
        """A runtime with these runtime settings; ``serve_kwargs`` go to ``serve_runtime`` (stand-ins)."""
        component = await start(serve_runtime, self.settings(**overrides), **(serve_kwargs or {}))
        self.runtimes.append(component)
        return component

    async def start(self, runtimes: int = 1) -> InProcessMesh:
        for _ in range(runtimes):
            await self.add_runtime()
        self.router = await start(serve_router, self.settings(), on_rest=self._on_rest)
        self.channel = grpc.aio.insecure_channel(self.router.endpoint)
        return self

    def _on_rest(self, url: str) -> None:
        self.rest_url = url

    @property
    def mesh(self) -> mm_grpc.ModelMeshStub:
        assert self.channel is not None
        return mm_grpc.ModelMeshStub(self.channel)

    @property
    def v2(self) -> pb_grpc.GRPCInferenceServiceStub:
        assert self.channel is not None
        return pb_grpc.GRPCInferenceServiceStub(self.channel)

    async def register(self, model_id: str, model_type: str, path: str, **info: Any) -> mm.ModelStatusInfo:
        return await self.mesh.registerModel(mm.RegisterModelRequest(
            modelId=model_id, modelInfo=mm.ModelInfo(type=model_type, path=path, **info)), timeout=10)

    async def infer(self, model_id: str, request: pb.ModelInferRequest, *, header: str = "mm-model-id",
                    timeout: float = 30) -> pb.ModelInferResponse:
        metadata = ((header, model_id),) if header else ()
        return await self.v2.ModelInfer(request, metadata=metadata, timeout=timeout)

    async def wait_for(self, predicate: Callable[[], Awaitable[bool]], timeout: float = 10) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not await predicate():
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError("condition not met in time")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self.channel is not None:
            await self.channel.close()
        if self.router is not None:
            await self.router.stop()
        for runtime in self.runtimes:
            if not runtime.task.done():
                await runtime.stop()


def memory_url() -> str:
    return f"memory://test-{uuid.uuid4().hex[:8]}"
