"""The GPU check: GPU memory as a placement dimension, on a real GPU.

    scripts/gpu-check [--budget 3GiB] [--json FILE]     # on a GPU machine (installs .whl/ first)
    python -m loadtest.scenarios.gpu [--budget 3GiB] [--json FILE]

What it does. It starts a private etcd, one runtime and one router as separate processes (as
``mesh up`` does), the runtime with its GPU budget capped to ``--budget`` (``runtime.
gpu_capacity_bytes``) and LRU eviction, and makes its models on the spot: two TorchScript MLPs of
6 x (4096 x 4096) FP32 layers (384 MiB of weights each) and two ONNX MLPs of 4 x (4096 x 4096)
(256 MiB each), registered under several model IDs each (every ID is its own copy on the GPU), and
three scikit-learn models for RAM. Then, against the runtime's own numbers:

1. *CPU models first*: the scikit-learn models are loaded in RAM and answer right.
2. *Fill the GPU until it must evict*: GPU models (``gpu: required``) one at a time. Before and
   after each load the runtime process's GPU memory is read from NVML (its per-process figure) once
   it is steady. Each row: the copy's measured size (what the runtime charged, ``sizeBytes`` of its
   copy), its weight bytes, the NVML growth of the runtime process, the copies the load evicted and
   what NVML shows freed. A load that evicted nothing must grow NVML by its measured size; one that
   evicted must shrink NVML by what the evicted copies were charged. Every answer is checked
   against the same MLP computed with NumPy (FP64), to 1e-2 relative. Five more predictions follow
   each first answer, and the NVML growth they cause is shown beside it (memory outside every
   copy's measured size: activations the allocator keeps).
3. *The allocator agrees*: the first TorchScript file is also loaded here, in the check's own
   process, and ``torch.cuda.memory_allocated`` before and after gives the bytes the allocator
   holds for it; the runtime's measured size must be at least that and within the tolerance.
4. *gpu: preferred*: with the GPU budget full, a preferred model goes to RAM and evicts no GPU
   copy; after two GPU models are unregistered (their memory must show free in NVML), a preferred
   model goes to the GPU.
5. *Another process takes GPU memory*: a child process of the check allocates all but about half
   the budget of the device's free memory; the runtime's published GPU budget must shrink (NVML:
   total - reserve - what others hold), copies must be evicted *from the GPU only* until they fit,
   and NVML must show the runtime's memory drop. When the child exits, the budget returns.
6. *CPU models untouched*: after all of that the scikit-learn copies are the same copies (same
   load time in their placement records) and still answer right.
7. *Eviction frees the device*: every GPU model is unregistered and the runtime's NVML figure must
   return to what it was before the first GPU load, within the tolerance.

Tolerance: a size agrees when it is within max(5 %, 32 MiB) of the other (the caching allocators'
rounding and a session's workspaces; the numbers are printed, so the margin can be judged).

One table at the end, and ``--json FILE`` writes every row and check. Exit code 0 when every check
passed, 1 otherwise, 2 when the machine has no usable GPU.

The flow is written against a small :class:`Platform` (where the mesh runs, how NVML is read, how
another process takes memory), so that ``tests/integration/test_gpu_check.py`` runs the same flow
on a machine without a GPU, with stand-in GPUs and small models.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc
import numpy as np

from mesh.gen.inference import grpc_service_pb2_grpc as pb_grpc
from mesh.gen.mmesh import model_mesh_pb2 as mm
from mesh.gen.mmesh import model_mesh_pb2_grpc as mm_grpc
from mesh.tensors import decode_response, encode_request

MIB = 1024 * 1024
GIB = 1024 * MIB
LOADED = mm.ModelStatusInfo.ModelStatus.Value("LOADED")


# --- what the check runs on -------------------------------------------------------------------

class Platform(Protocol):
    router: str  # host:port of the router
    registry_url: str

    def process_bytes(self) -> int:
        """The runtime process's memory on GPU 0 now (NVML)."""

    def device(self) -> tuple[int, int]:
        """GPU 0's (total, used by every process) now (NVML)."""

    async def take(self, size: int) -> None:
        """Another process allocates ``size`` bytes on GPU 0 and holds them."""

    async def give_back(self) -> None:
        """That process frees them (exits)."""

    def allocator_bytes(self, path: Path) -> int | None:
        """Bytes ``torch.cuda.memory_allocated`` holds for this TorchScript file on GPU 0, loaded
        in this process; None where there is no CUDA here."""


@dataclass(frozen=True)
class Sizes:
    width: int = 4096
    ts_layers: int = 6
    onnx_layers: int = 4
    ts_ids: int = 6  # TorchScript model IDs (over two files)
    onnx_ids: int = 4  # ONNX model IDs (over two files)
    budget: int = 3 * GIB
    reserve: int = GIB
    tolerance_bytes: int = 32 * MIB
    tolerance_ratio: float = 0.05
    settle_s: float = 0.3  # NVML is steady when two reads this far apart agree
    timeout_s: float = 60.0


@dataclass
class Row:
    model_id: str
    type: str
    device: str
    weights: int
    measured: int
    nvml_delta: int
    evicted: list[str] = field(default_factory=list)
    evicted_bytes: int = 0
    first_answer_ms: float = 0.0
    load_ms: float = 0.0
    warm_ms: float = 0.0
    predict_growth: int = 0  # NVML growth over 5 more predictions, after the first answer
    agrees: bool = True


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    def check(self, name: str, ok: bool, detail: str) -> bool:
        self.checks.append((name, ok, detail))
        print(f"  [{'ok' if ok else 'FAIL'}] {name}: {detail}", flush=True)
        return ok

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(ok for _, ok, _ in self.checks)


def agree(a: int, b: int, sizes: Sizes) -> bool:
    return abs(a - b) <= max(sizes.tolerance_bytes, sizes.tolerance_ratio * max(abs(a), abs(b)))


# --- models --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MlpFile:
    path: Path
    type: str
    weights: list[np.ndarray]  # [in, out] FP32 matrices; ReLU between layers, none after the last

    @property
    def weight_bytes(self) -> int:
        return sum(w.nbytes for w in self.weights)

    def expected(self, x: np.ndarray) -> np.ndarray:
        y = x.astype(np.float64)
        for i, w in enumerate(self.weights):
            y = y @ w.astype(np.float64)
            if i < len(self.weights) - 1:
                y = np.maximum(y, 0.0)
        return y


def _weights(width: int, layers: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    scale = np.float32(np.sqrt(2.0 / width))  # keeps activations of unit scale through ReLUs
    return [(rng.standard_normal((width, width), dtype=np.float32) * scale) for _ in range(layers)]


def make_torchscript(directory: Path, width: int, layers: int, seed: int) -> MlpFile:
    import torch

    weights = _weights(width, layers, seed)
    modules: list[torch.nn.Module] = []
    for i, w in enumerate(weights):
        linear = torch.nn.Linear(width, width, bias=False)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(np.ascontiguousarray(w.T)))  # Linear computes x @ W.T
        modules.append(linear)
        if i < layers - 1:
            modules.append(torch.nn.ReLU())
    path = directory / f"mlp-ts-{seed}.pt"
    torch.jit.save(torch.jit.script(torch.nn.Sequential(*modules).eval()), str(path))
    return MlpFile(path, "torchscript", weights)


def make_onnx(directory: Path, width: int, layers: int, seed: int) -> MlpFile:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = _weights(width, layers, seed)
    nodes, inits, current = [], [], "x"
    for i, w in enumerate(weights):
        last = i == len(weights) - 1
        inits.append(numpy_helper.from_array(w, name=f"w{i}"))
        product = "y" if last else f"m{i}"
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [product]))
        if not last:
            current = f"h{i}"
            nodes.append(helper.make_node("Relu", [product], [current]))
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", width])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what every onnxruntime of the last years reads
    path = directory / f"mlp-onnx-{seed}.onnx"
    onnx.save(model, str(path))
    return MlpFile(path, "onnx", weights)


@dataclass(frozen=True)
class CpuModel:
    model_id: str
    path: Path
    sample: np.ndarray
    expected: np.ndarray


def make_sklearn(directory: Path, seed: int) -> CpuModel:
    import joblib
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((200, 8)).astype(np.float32)
    y = (x @ rng.standard_normal(8) > 0).astype(np.int64)
    model = LogisticRegression(max_iter=200).fit(x, y)
    path = directory / f"cpu-{seed}.joblib"
    joblib.dump(model, path)
    return CpuModel(f"cpu-{seed}", path, x[:4].copy(), model.predict(x[:4]))


# --- the flow ----------------------------------------------------------------------------------

class Mesh:
    """The management and inference calls the check makes through the router."""

    def __init__(self, endpoint: str) -> None:
        self.channel = grpc.aio.insecure_channel(endpoint)
        self.mm = mm_grpc.ModelMeshStub(self.channel)
        self.v2 = pb_grpc.GRPCInferenceServiceStub(self.channel)

    async def register(self, model_id: str, model_type: str, path: Path, gpu: str = "") -> None:
        await self.mm.registerModel(mm.RegisterModelRequest(
            modelId=model_id, modelInfo=mm.ModelInfo(type=model_type, path=str(path), gpu=gpu)), timeout=30)

    async def unregister(self, model_id: str) -> None:
        await self.mm.unregisterModel(mm.UnregisterModelRequest(modelId=model_id), timeout=30)

    async def infer(self, model_id: str, x: np.ndarray, timeout: float) -> dict[str, np.ndarray]:
        request = encode_request(model_name=model_id, inputs={"x": x}, raw=True)
        reply = await self.v2.ModelInfer(request, metadata=(("mm-model-id", model_id),), timeout=timeout)
        return decode_response(reply)

    async def copies(self, model_id: str) -> list[mm.ModelStatusInfo.ModelCopyInfo]:
        status = await self.mm.getModelStatus(mm.GetStatusRequest(modelId=model_id), timeout=10)
        return [c for c in status.modelCopyInfos if c.copyStatus == LOADED]

    async def close(self) -> None:
        await self.channel.close()


async def eventually(predicate: Callable[[], Awaitable[bool]], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def wait_until(predicate: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
    if not await eventually(predicate, timeout_s):
        raise TimeoutError(f"not within {timeout_s:g} s: {what}")


async def steady(platform: Platform, sizes: Sizes) -> int:
    """The runtime's NVML figure once two reads ``settle_s`` apart agree to 1 MiB."""
    last = platform.process_bytes()
    deadline = time.monotonic() + sizes.timeout_s
    while time.monotonic() < deadline:
        await asyncio.sleep(sizes.settle_s)
        now = platform.process_bytes()
        if abs(now - last) <= MIB:
            return now
        last = now
    return last


async def gpu_instance(platform: Platform) -> Any:
    from loadtest.management import instances

    found = [r for r in await instances(platform.registry_url) if r.gpu_types]
    return found[0] if found else None


async def gpu0_budget(platform: Platform) -> int:
    record = await gpu_instance(platform)
    usage = record.device("gpu0") if record is not None else None
    return usage.capacity_bytes if usage is not None else 0


async def run_check(platform: Platform, sizes: Sizes, workdir: Path) -> Report:
    report = Report()
    mesh = Mesh(platform.router)
    try:
        await _flow(platform, sizes, workdir, mesh, report)
    finally:
        await mesh.close()
    return report


async def _flow(platform: Platform, sizes: Sizes, workdir: Path, mesh: Mesh, report: Report) -> None:
    from loadtest.management import placements

    x = np.random.default_rng(7).standard_normal((4, sizes.width)).astype(np.float32)
    print("making models...", flush=True)
    started = time.monotonic()
    files = [make_torchscript(workdir, sizes.width, sizes.ts_layers, 1),
             make_onnx(workdir, sizes.width, sizes.onnx_layers, 2),
             make_torchscript(workdir, sizes.width, sizes.ts_layers, 3),
             make_onnx(workdir, sizes.width, sizes.onnx_layers, 4)]
    cpu = [make_sklearn(workdir, seed) for seed in (11, 12, 13)]
    report.facts["models_made_s"] = round(time.monotonic() - started, 1)

    record = await gpu_instance(platform)
    if not report.check("the runtime has a GPU budget", record is not None,
                        f"gpu_types {list(record.gpu_types) if record else []}, budget "
                        f"{(await gpu0_budget(platform)) / GIB:.2f} GiB"):
        return
    report.facts["gpu_types"] = list(record.gpu_types)

    # 1. CPU models in RAM.
    for m in cpu:
        await mesh.register(m.model_id, "sklearn", m.path)
        out = await mesh.infer(m.model_id, m.sample, sizes.timeout_s)
        report.check(f"{m.model_id} answers right in RAM", bool(np.array_equal(out["predict"], m.expected)),
                     f"devices {[c.device for c in await mesh.copies(m.model_id)]}")
    cpu_loaded = {m.model_id: await _copies_of(platform, m.model_id) for m in cpu}

    # 2. Fill the GPU until it must evict.
    gpu_types = set(record.gpu_types)
    plan: list[tuple[str, MlpFile]] = []
    ts_files = [f for f in files if f.type == "torchscript"]
    onnx_files = [f for f in files if f.type == "onnx"]
    for i in range(max(sizes.ts_ids, sizes.onnx_ids)):
        if i < sizes.ts_ids and "torchscript" in gpu_types:
            plan.append((f"ts-{i}", ts_files[i % 2]))
        if i < sizes.onnx_ids and "onnx" in gpu_types:
            plan.append((f"onnx-{i}", onnx_files[i % 2]))
    report.check("both model types can use the GPU", gpu_types >= {"torchscript", "onnx"},
                 f"this runtime loads {sorted(gpu_types)} on its GPU")
    baseline = await steady(platform, sizes)
    report.facts["runtime_gpu_bytes_before_models"] = baseline
    charged: dict[str, int] = {}
    for model_id, f in plan:
        before = await steady(platform, sizes)
        resident_before = {m for m in charged if await mesh.copies(m)}
        await mesh.register(model_id, f.type, f.path, gpu="required")
        t0 = time.perf_counter()
        out = await mesh.infer(model_id, x, sizes.timeout_s)
        first_ms = (time.perf_counter() - t0) * 1000
        name = next(iter(out))
        right = bool(np.allclose(out[name], f.expected(x), rtol=1e-2, atol=1e-2))
        await wait_until(lambda m=model_id: _has_copy(mesh, m), sizes.timeout_s, f"{model_id} loaded")
        copy = (await mesh.copies(model_id))[0]
        after = await steady(platform, sizes)  # also time for the evictions to reach the router's view
        warm = []
        for _ in range(5):
            t0 = time.perf_counter()
            await mesh.infer(model_id, x, sizes.timeout_s)
            warm.append((time.perf_counter() - t0) * 1000)
        predicted = await steady(platform, sizes)
        evicted = sorted([m for m in resident_before if not await mesh.copies(m)])
        freed = sum(charged[m] for m in evicted)
        charged[model_id] = copy.sizeBytes
        placement = [p for p in await placements(platform.registry_url, model_id) if p.state == "loaded"]
        row = Row(model_id, f.type, copy.device, f.weight_bytes, copy.sizeBytes, after - before, evicted, freed,
                  round(first_ms, 1), round(placement[0].load_ms if placement else 0.0, 1),
                  round(statistics.median(warm), 2), predicted - after)
        row.agrees = agree(row.nvml_delta, row.measured - freed, sizes)
        report.rows.append(row)
        report.check(f"{model_id} on {copy.device}, answers right", right and copy.device == "gpu0",
                     f"measured {copy.sizeBytes / MIB:.1f} MiB, weights {f.weight_bytes / MIB:.1f} MiB, "
                     f"NVML {row.nvml_delta / MIB:+.1f} MiB, evicted {evicted or 'none'} "
                     f"({freed / MIB:.1f} MiB charged)")
    report.check("the GPU had to evict", any(r.evicted for r in report.rows),
                 f"{sum(len(r.evicted) for r in report.rows)} evictions over {len(report.rows)} loads")
    grown = [r for r in report.rows if not r.evicted]
    report.check("measured size = NVML growth (loads that evicted nothing)", all(r.agrees for r in grown),
                 ", ".join(f"{r.model_id} {r.measured / MIB:.1f}/{r.nvml_delta / MIB:.1f}" for r in grown))
    shrunk = [r for r in report.rows if r.evicted]
    report.check("eviction frees what the evicted copies were charged (NVML)", all(r.agrees for r in shrunk),
                 ", ".join(f"{r.model_id} freed {r.evicted_bytes / MIB:.1f} net {r.nvml_delta / MIB:+.1f}"
                           for r in shrunk) or "none")

    # 3. The allocator agrees.
    if "torchscript" in gpu_types:
        reference = platform.allocator_bytes(ts_files[0].path)
        measured = [r.measured for r in report.rows if r.type == "torchscript"]
        if reference is not None and measured:
            report.facts["torch_memory_allocated"] = reference
            report.check("TorchScript measured size agrees with torch.cuda.memory_allocated",
                         all(m >= reference and agree(m, reference, sizes) for m in measured),
                         f"allocator {reference / MIB:.1f} MiB, measured "
                         f"{', '.join(f'{m / MIB:.1f}' for m in measured)} MiB")

    # 4. gpu: preferred. First make sure that the GPU has no room for one more copy of ``small``.
    small = onnx_files[0] if "onnx" in gpu_types else ts_files[0]
    small_size = max(r.measured for r in report.rows if r.type == small.type)
    for extra in range(8):
        resident = {m for m in charged if await mesh.copies(m)}
        if sizes.budget - sum(charged[m] for m in resident) < small_size:
            break
        await mesh.register(f"fill-{extra}", small.type, small.path, gpu="required")
        await mesh.infer(f"fill-{extra}", x, sizes.timeout_s)
        await wait_until(lambda e=extra: _has_copy(mesh, f"fill-{e}"), sizes.timeout_s, "filler loaded")
        charged[f"fill-{extra}"] = (await mesh.copies(f"fill-{extra}"))[0].sizeBytes
    await steady(platform, sizes)
    resident = {m for m in charged if await mesh.copies(m)}
    await mesh.register("preferred-full", small.type, small.path, gpu="preferred")
    out = await mesh.infer("preferred-full", x, sizes.timeout_s)
    await wait_until(lambda: _has_copy(mesh, "preferred-full"), sizes.timeout_s, "preferred-full loaded")
    device = (await mesh.copies("preferred-full"))[0].device
    kept = {m for m in resident if await mesh.copies(m)}
    report.check("gpu: preferred on a full GPU runs in RAM and evicts no GPU copy",
                 device == "ram" and kept == resident and bool(np.allclose(
                     out[next(iter(out))], small.expected(x), rtol=1e-2, atol=1e-2)),
                 f"device {device}, GPU copies kept {len(kept)}/{len(resident)}")
    before = await steady(platform, sizes)
    dropped = sorted(resident)[:2]
    freed = sum(charged.pop(m) for m in dropped)
    for m in dropped:
        await mesh.unregister(m)
    await wait_until(lambda: _gone(mesh, dropped), sizes.timeout_s, "unregistered copies gone")
    after = await steady(platform, sizes)
    report.check("unregistering frees the device (NVML)", agree(before - after, freed, sizes),
                 f"NVML {-(before - after) / MIB:+.1f} MiB for {freed / MIB:.1f} MiB charged")
    await mesh.register("preferred-room", small.type, small.path, gpu="preferred")
    await mesh.infer("preferred-room", x, sizes.timeout_s)
    await wait_until(lambda: _has_copy(mesh, "preferred-room"), sizes.timeout_s, "preferred-room loaded")
    device = (await mesh.copies("preferred-room"))[0].device
    report.check("gpu: preferred with room runs on the GPU", device == "gpu0", f"device {device}")
    charged["preferred-room"] = (await mesh.copies("preferred-room"))[0].sizeBytes

    # 5. Another process takes GPU memory.
    budget = await gpu0_budget(platform)
    total, used = platform.device()
    ours = await steady(platform, sizes)
    resident = {m for m in charged if await mesh.copies(m)}
    held = sum(charged[m] for m in resident)
    target = max(held // 2, 1)  # the budget we aim the other process at: half of what is held now
    outside = used - held
    take = total - sizes.reserve - outside - target
    report.facts["other_process_bytes"] = take
    await platform.take(take)
    try:
        async def budget_shrunk() -> bool:
            return await gpu0_budget(platform) <= target + sizes.tolerance_bytes

        await wait_until(budget_shrunk, sizes.timeout_s, "the GPU budget shrinks")
        shrunk_to = await gpu0_budget(platform)

        async def fits() -> bool:
            return sum([charged[m] for m in resident if await mesh.copies(m)]) <= shrunk_to

        await wait_until(fits, sizes.timeout_s, "copies evicted to fit")
        left = await steady(platform, sizes)
        kept = {m for m in resident if await mesh.copies(m)}
        gone = sum(charged[m] for m in resident - kept)
        report.check("another process took GPU memory: the budget shrank and the GPU evicted to fit",
                     shrunk_to <= target + sizes.tolerance_bytes and bool(resident - kept)
                     and agree(ours - left, gone, sizes),
                     f"budget {budget / MIB:.0f} -> {shrunk_to / MIB:.0f} MiB with {take / GIB:.1f} GiB taken, "
                     f"{len(resident - kept)} copies evicted, NVML {-(ours - left) / MIB:+.1f} MiB for "
                     f"{gone / MIB:.1f} MiB charged")
    finally:
        await platform.give_back()

    async def budget_back() -> bool:
        return abs(await gpu0_budget(platform) - budget) <= sizes.tolerance_bytes

    back = await eventually(budget_back, sizes.timeout_s)
    report.check("the budget returns when the other process exits", back,
                 f"{(await gpu0_budget(platform)) / MIB:.0f} MiB, was {budget / MIB:.0f} MiB")

    # 6. CPU models untouched.
    same = {m.model_id: await _copies_of(platform, m.model_id) for m in cpu} == cpu_loaded
    answers = [bool(np.array_equal((await mesh.infer(m.model_id, m.sample, sizes.timeout_s))["predict"], m.expected))
               for m in cpu]
    report.check("CPU models untouched by GPU evictions (same copies, right answers)", same and all(answers),
                 f"{len(cpu)} copies kept, answers {answers}")

    # 7. Everything on the GPU unregistered: the runtime's device memory returns to its baseline.
    gpu_models = [m for m in charged]
    for m in gpu_models:
        await mesh.unregister(m)
    await wait_until(lambda: _gone(mesh, gpu_models), sizes.timeout_s, "all GPU copies gone")
    end = await steady(platform, sizes)
    report.facts["runtime_gpu_bytes_after_unregistering"] = end
    report.check("eviction frees the device: NVML back to the runtime's baseline", agree(end, baseline, sizes),
                 f"{baseline / MIB:.1f} MiB before the first GPU load, {end / MIB:.1f} MiB after")


async def _copies_of(platform: Platform, model_id: str) -> list[tuple[str, str, int]]:
    """Where the model's copies are, and when each was loaded (a reloaded copy has a new time)."""
    from loadtest.management import placements

    return sorted((p.instance_id, p.device, p.loaded_ms) for p in await placements(platform.registry_url, model_id))


async def _has_copy(mesh: Mesh, model_id: str) -> bool:
    return bool(await mesh.copies(model_id))


async def _gone(mesh: Mesh, models: list[str]) -> bool:
    for m in models:
        try:
            if await mesh.copies(m):
                return False
        except grpc.aio.AioRpcError:
            continue  # NOT_FOUND once unregistered
    return True


# --- the table ----------------------------------------------------------------------------------

def table(report: Report) -> str:
    lines = ["| model | type | device | weights MiB | measured MiB | NVML growth MiB | evicted (charged MiB) "
             "| first answer ms | load ms | warm p50 ms | growth over 5 predictions MiB | agrees |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report.rows:
        evicted = f"{', '.join(r.evicted)} ({r.evicted_bytes / MIB:.1f})" if r.evicted else "-"
        lines.append(f"| {r.model_id} | {r.type} | {r.device} | {r.weights / MIB:.1f} | {r.measured / MIB:.1f} | "
                     f"{r.nvml_delta / MIB:+.1f} | {evicted} | {r.first_answer_ms:.0f} | {r.load_ms:.0f} | "
                     f"{r.warm_ms:.2f} | {r.predict_growth / MIB:+.1f} | {'yes' if r.agrees else 'NO'} |")
    lines.append("")
    lines += [f"- [{'ok' if ok else 'FAIL'}] {name}: {detail}" for name, ok, detail in report.checks]
    return "\n".join(lines)


# --- on a real GPU --------------------------------------------------------------------------------

_HOLD = """
import sys, torch
x = torch.empty(int(sys.argv[1]), dtype=torch.uint8, device="cuda:0")
torch.cuda.synchronize()
print("held", flush=True)
sys.stdin.read()
"""


class RealGpu:
    """etcd, a runtime and a router as processes (``loadtest.cluster``); NVML through the runtime's
    own reader; another process is a child Python holding a CUDA allocation."""

    def __init__(self, cluster: Any, runtime_pid: int, router: str) -> None:
        from mesh.runtime.gpu import nvml_reader

        self.cluster, self.runtime_pid, self.router = cluster, runtime_pid, router
        self.registry_url = cluster.registry_url
        self.reader = nvml_reader()
        self._hog: asyncio.subprocess.Process | None = None

    def process_bytes(self) -> int:
        own = self.reader.process_used(0, self.runtime_pid)
        return own if own is not None else self.device()[1]

    def device(self) -> tuple[int, int]:
        info = self.reader.devices()[0]
        return info.total_bytes, info.used_bytes

    async def take(self, size: int) -> None:
        self._hog = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _HOLD, str(size), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self._hog.stdout is not None
        line = await asyncio.wait_for(self._hog.stdout.readline(), 120)
        if line.strip() != b"held":
            raise RuntimeError(f"the other process could not allocate {size} bytes on the GPU")

    async def give_back(self) -> None:
        if self._hog is not None and self._hog.stdin is not None:
            self._hog.stdin.close()  # it reads stdin to its end, then exits and frees its memory
            await asyncio.wait_for(self._hog.wait(), 30)
            self._hog = None

    def allocator_bytes(self, path: Path) -> int | None:
        import torch

        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(0)
        module = torch.jit.load(str(path), map_location="cuda:0")
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated(0) - before
        del module
        torch.cuda.empty_cache()
        return int(held)


def environment() -> dict[str, Any]:
    facts: dict[str, Any] = {"python": sys.version.split()[0]}
    try:
        import torch

        facts["torch"] = torch.__version__
        facts["cuda"] = torch.version.cuda
        facts["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        facts["torch"] = None
    try:
        import onnxruntime

        from mesh.runtime.loaders.onnx_loader import cuda_provider_available

        facts["onnxruntime"] = onnxruntime.__version__
        facts["onnxruntime_cuda"] = cuda_provider_available()
    except ImportError:
        facts["onnxruntime"] = None
    from mesh.runtime.gpu import nvml_reader

    devices = nvml_reader().devices()
    facts["nvml_devices"] = [(d.name, d.total_bytes) for d in devices]
    return facts


def main(argv: list[str] | None = None) -> int:
    from loadtest.cluster import Cluster, prepare_benchmark_process
    from mesh.settings import parse_bytes

    parser = argparse.ArgumentParser(prog="python -m loadtest.scenarios.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", default="3GiB", help="the runtime's GPU budget (runtime.gpu_capacity_bytes)")
    parser.add_argument("--width", type=int, default=Sizes.width, help="width of the MLPs' square layers")
    parser.add_argument("--json", dest="json_path", help="write the rows and checks to this file")
    args = parser.parse_args(argv)
    prepare_benchmark_process()
    facts = environment()
    print(json.dumps(facts), flush=True)
    if not facts.get("nvml_devices"):
        print("no GPU: NVML sees no device here", file=sys.stderr)
        return 2
    sizes = Sizes(width=args.width, budget=parse_bytes(args.budget))
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mesh-gpu-check-") as tmp, Cluster() as cluster:
        runtime = cluster.start_runtime(capacity_bytes=2 * GIB, extra_env={
            "MESH_RUNTIME_GPU_CAPACITY_BYTES": str(sizes.budget), "MESH_RUNTIME_GPU_RESERVE_BYTES": str(sizes.reserve),
            "MESH_RUNTIME_GPU_REFRESH_S": "0.5", "MESH_RUNTIME_EVICTION_POLICY": "lru",
            "MESH_RUNTIME_SUPPORTED_TYPES": "sklearn,onnx,torchscript"})
        router = cluster.start_router()
        platform = RealGpu(cluster, runtime.pid, router.endpoint)
        try:
            report = asyncio.run(run_check(platform, sizes, Path(tmp)))
        except Exception as exc:
            print(f"check stopped: {type(exc).__name__}: {exc}\nruntime log:\n{runtime.log_tail(40)}", file=sys.stderr)
            return 1
        report.facts.update(facts)
        report.facts["seconds"] = round(time.monotonic() - started, 1)
        loads = [e for e in runtime.events("model loaded") if e.get("device", "").startswith("gpu")]
        report.facts["runtime_gpu_loads"] = len(loads)
    print()
    print(table(report))
    print(f"\n{'PASSED' if report.passed else 'FAILED'} in {report.facts['seconds']} s on {facts.get('gpu')}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"facts": report.facts, "rows": [asdict(r) for r in report.rows],
                                                    "checks": report.checks}, indent=2))
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
