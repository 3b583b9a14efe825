"""The runtime's transport-neutral core: inference, the ModelRuntime SPI, and model lifecycle.

The servicers in ``servicer.py`` decode gRPC and call this; tests call it directly.

Which model a request is for: the ``mm-model-id`` header that the router sets (the concrete
model, after vModel resolution), else the request's ``model_name``. Whether a miss may load: yes,
unless the router marked the request hit-only (it chose this instance because it believed the
copy was loaded; if the copy was evicted meanwhile the answer is "not here" and the router retries
elsewhere, instead of this instance loading a model that is loaded elsewhere).

Model registrations come from the registry, looked up on demand (``SpecCache``); when a
registration is deleted or redefined, the copy loaded here is unloaded.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor

import structlog

from mesh import gctune
from mesh.errors import (
    FailedPrecondition,
    InvalidArgument,
    MeshError,
    ModelLoadError,
    ModelNotFound,
    NotHere,
    ResourceExhausted,
    Unavailable,
)
from mesh.gen.inference import grpc_service_pb2 as pb
from mesh.ids import check_model_id
from mesh.logging import current_request, new_request_id
from mesh.observability.metrics import RuntimeMetrics, status_name
from mesh.registry.records import GPU_REQUIRED, ModelSpec
from mesh.registry.specs import SpecCache
from mesh.runtime.batch_predict import Merged, merge_request, predict_merged, split_answer
from mesh.runtime.batching import Batcher, BatchPolicy, batchable_model
from mesh.runtime.cache import DeviceBudget, Entry, ModelCache
from mesh.runtime.failures import RememberingCache
from mesh.runtime.forwarding import CopyLost, ForwardingModel
from mesh.runtime.libraries import IMPORTS, installed
from mesh.runtime.loaders import get_loader, gpu_types, supported_types
from mesh.runtime.loaders.base import LoadedModel, LoadPolicy, file_size, resolve_path
from mesh.storage.location import locate
from mesh.tasks import Background
from mesh.tensors import infer_bytes
from mesh.transport.inflight import InflightLimit
from mesh.transport.wire import read_model_name
from placement.sizing import SizeEstimator

log = structlog.get_logger(__name__)

def parse_key(key: str) -> dict[str, object]:
    """ModelInfo.key: a JSON object by convention; empty means no parameters."""
    if not key:
        return {}
    try:
        value = json.loads(key)
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"model key is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ModelLoadError("model key must be a JSON object")
    return value


UNCONFINED = LoadPolicy()


def load_model(spec: ModelSpec, device: str, policy: LoadPolicy = UNCONFINED) -> LoadedModel:
    """Runs in a loader thread: resolve the path (confined by ``policy``) and call the type's loader."""
    loader = get_loader(spec.type)
    path = resolve_path(spec.path, policy.roots)
    return loader.load(spec.model_id, path, parse_key(spec.key), device, policy)


class SizePredictor:
    """Predicted size before a load: the registration's hint, else its size on disk times what
    measured loads taught us about its type.

    The size on disk, read by :meth:`prepare` in the load's thread: the model's files (a model in
    object storage is pulled before its load is placed, so this is the storage objects' size), else
    the ``disk_size_bytes`` of its ModelMesh key (a storage model asked about before its pull, as
    ``predictModelSize`` is). Unknown (neither): ``runtime.default_model_size_bytes``.

    In RAM: size on disk x a ratio learned per type (``placement.sizing``), with no floor once the
    size is known (issue 18): a fixed 64 KiB floor reserved about ten 7 KB scikit-learn models per
    load and evicted them for it, while a prediction that turns out low costs nothing unsafe (the
    cache reserves the rest, evicting if it must, before it counts the measured size). On a GPU:
    size on disk plus an *extra* learned per type (a moving average of measured minus file size).
    Weights sit on a GPU about as they sit in the file, and what comes on top is mostly fixed per
    copy (a session's cuBLAS/cuDNN workspace, the allocator's rounding), so a ratio would be far off
    for small models (a 10 KB network with a 30 MB workspace) and too large for big ones. Until a
    type has been measured on a GPU, its extra is the default ratio's (``file x (ratio - 1)``), and
    the floor still holds there: a small model's file says nothing of the workspace that comes with
    it, and a ``gpu: preferred`` copy predicted at a few KB would take a GPU and evict for its
    workspace, where the floor sends it to RAM.

    A model loaded here before is predicted at the smallest size it measured (same model, file and
    device), as ModelMesh keeps a model's size once known: in an evicting cache most loads are
    re-loads, and a type's ratio is an average that a model of another shape misses by 2-3x either
    way. The smallest, because what makes one measurement differ from another is memory other
    threads allocated during the load, which only ever adds."""

    GPU_ALPHA = 0.2  # weight of a new observation in the extra's moving average
    MAX_KNOWN = 100_000  # models whose measured size is remembered (the oldest forgotten first)

    def __init__(self, estimator: SizeEstimator, roots: tuple[str, ...] = ()) -> None:
        self.estimator = estimator
        self.roots = roots  # runtime.model_roots: files outside them are not even measured
        self._file_sizes: dict[str, int] = {}
        self._gpu_extra: dict[str, float] = {}  # per model type: few keys
        self._known: dict[tuple[str, str, int, str], int] = {}  # (model, path, disk size, device): bytes

    def prepare(self, spec: ModelSpec) -> None:
        """Read the size of the model's files (filesystem work: in the load's thread, never on the
        event loop); ``predict`` then uses it."""
        if spec.path in self._file_sizes:
            return
        try:
            size = file_size(resolve_path(spec.path, self.roots))
        except Exception:
            size = 0  # unreadable now: the load will fail with the real reason
        if len(self._file_sizes) > 100_000:
            self._file_sizes.clear()
        self._file_sizes[spec.path] = size

    def disk_size(self, spec: ModelSpec) -> int:
        """The model's bytes on disk as known now (class docstring); 0 when unknown."""
        return self._file_sizes.get(spec.path, 0) or _key_disk_size(spec.key)

    def predict(self, spec: ModelSpec, device: str = "ram") -> int:
        if spec.size_hint_bytes:
            return spec.size_hint_bytes
        model_type, size = spec.type.lower(), self.disk_size(spec)
        if size <= 0:
            return self.estimator.floor_bytes  # nothing known of this model
        known = self._known.get((spec.model_id, spec.path, size, device))
        if known is not None:
            return known
        if device == "ram":
            return max(1, math.ceil(size * self.estimator.ratio(model_type)))
        extra = self._gpu_extra.get(model_type)
        if extra is None:  # the default ratio, and the floor: what a library adds per copy is unknown yet
            return self.estimator.predict(f"{model_type}@gpu", size)
        return max(1, int(size + extra))

    def observe(self, spec: ModelSpec, device: str, measured: int) -> None:
        size = self.disk_size(spec)
        if not size:
            return
        key = (spec.model_id, spec.path, size, device)
        before = self._known.pop(key, None)  # re-inserted last: the dict's order is the age
        self._known[key] = measured if before is None else min(before, measured)
        if len(self._known) > self.MAX_KNOWN:
            del self._known[next(iter(self._known))]
        model_type = spec.type.lower()
        if device == "ram":
            self.estimator.observe(model_type, size, measured)
            return
        extra = float(max(0, measured - size))
        known = self._gpu_extra.get(model_type)
        self._gpu_extra[model_type] = extra if known is None else known + self.GPU_ALPHA * (extra - known)


def _key_disk_size(key: str) -> int:
    """``disk_size_bytes`` of a ModelMesh model key (``{"storage_key": ..., "disk_size_bytes": N}``);
    0 when absent or not a non-negative integer (the key's own checks report a bad one at load)."""
    if "disk_size_bytes" not in key:
        return 0
    try:
        value = parse_key(key).get("disk_size_bytes")
    except ModelLoadError:
        return 0
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def prepare_load(spec: ModelSpec) -> None:
    """Runs in a loader thread before the measured part of a load: the first load of a type
    imports its library here (``mesh.runtime.libraries``), so that neither its memory nor its time
    is charged to the model."""
    loader = get_loader(spec.type)
    try:
        if IMPORTS.ensure(loader.type) is not None:
            gctune.refreeze()  # the library's objects join start-up's, never scanned again (mesh.gctune)
    except ImportError:
        pass  # the load itself reports the missing library with a clear reason
    except Exception as exc:  # a broken library: the load fails with this reason
        raise ModelLoadError(f"{loader.type}: its library does not import: {type(exc).__name__}: {exc}"[:1000]) \
            from None
    if loader.type == "torchscript":
        import torch

        # One thread per predict call: the runtime already runs predicts in parallel on its
        # inference threads, and torch's own pool fights the OpenMP pools of xgboost/lightgbm
        # (measured 10-30x slower with both busy on 2 cores).
        if torch.get_num_threads() != 1:
            torch.set_num_threads(1)


def _import_type(model_type: str) -> None:
    """Import ``model_type``'s library now (a model worker's start-up)."""
    IMPORTS.ensure(model_type, at_start=True)


def _gpu_ready(model_type: str, indices: list[int]) -> bool:
    """Whether ``model_type``'s library can put models on the GPUs ``indices``. For torch, also
    creates what every model on a GPU shares, once per process: the CUDA context and cuBLAS's
    handle and workspace (several hundred MiB), so that no model's measured size includes them."""
    if model_type == "torchscript":
        import torch

        if not torch.cuda.is_available() or torch.cuda.device_count() <= max(indices):
            return False
        for index in indices:
            x = torch.ones((64, 64), device=f"cuda:{index}")
            (x @ x).sum().item()
            del x
        torch.cuda.empty_cache()
        return True
    if model_type == "onnx":
        from mesh.runtime.loaders.onnx_loader import cuda_provider_available

        return cuda_provider_available()
    return False


def warm_device_thread(device: str) -> None:
    """On a GPU's prediction thread, before any prediction: create torch's per-thread cuBLAS handle
    and workspace for that device now, so that no model's first prediction pays for them (time, and
    memory appearing outside every measured copy)."""
    import torch

    x = torch.ones((64, 64), device=f"cuda:{device.removeprefix('gpu')}")
    (x @ x).sum().item()


async def warm_gpus(types: list[str], indices: list[int]) -> list[str]:
    """Of ``types``, those that this runtime can load on its GPUs ``indices`` (start-up, after
    :func:`warm_imports` and before the GPU budgets are read: see :func:`_gpu_ready`)."""
    if not indices:
        return []
    usable: list[str] = []
    # torch first: it loads the CUDA libraries (cuBLAS, cuDNN) that onnxruntime-gpu looks for too.
    for model_type in sorted((t for t in types if get_loader(t).supports_gpu), key=lambda t: t != "torchscript"):
        try:
            ready = await asyncio.to_thread(_gpu_ready, model_type, indices)
        except Exception as exc:
            log.warning("GPU unusable for a model type", model_type=model_type,
                        error=f"{type(exc).__name__}: {exc}")
            continue
        if ready:
            usable.append(model_type)
        else:
            log.warning("GPU unusable for a model type: its library sees no CUDA device here",
                        model_type=model_type)
    return usable


async def warm_imports(types: list[str], timeout_s: float, preload: list[str] | None = None) -> list[str]:
    """Of ``types``, those this runtime can load (start-up, before the instance is ready): a type
    whose library is not installed is left out, with a log line, decided without importing it
    (``mesh.runtime.libraries.installed``). The libraries of ``preload`` (None: every type; the
    setting ``runtime.preload_types``) are imported now, so that their first load neither waits for
    the import nor is charged the library's memory; a preloaded type whose library fails to import
    is left out, and one still importing after ``timeout_s`` stays (its import goes on in its
    thread and the first load waits for it). The others are imported at their first load."""
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    wanted = set(types if preload is None else preload)
    usable: list[str] = []
    for model_type in types:
        if not installed(model_type):
            log.warning("model type disabled: its library is not installed", model_type=model_type)
            continue
        if model_type not in wanted:
            usable.append(model_type)
            continue
        remaining = timeout_s - (time.perf_counter() - started)
        try:
            await asyncio.wait_for(loop.run_in_executor(None, _import_type, model_type), max(remaining, 0.001))
        except TimeoutError:
            log.warning("loader library still importing at start-up", model_type=model_type,
                        timeout_s=timeout_s)
        except Exception as exc:
            log.warning("model type disabled: its library does not import", model_type=model_type,
                        error=f"{type(exc).__name__}: {exc}")
            continue
        usable.append(model_type)
    return usable


def choose_device(spec: ModelSpec, budgets: dict[str, DeviceBudget],
                  predict: Callable[[ModelSpec, str], int]) -> str:
    """The device a copy loads on.

    ``gpu: required``: the GPU with the most free budget among those large enough for its
    predicted size (it evicts there if it must), or
    FAILED_PRECONDITION when this instance has none or the type cannot run on one (routers send
    such models only to instances that can; this answers a direct SPI call). ``gpu: preferred``:
    that GPU if the predicted size fits in its free budget now, without evicting anything, else
    RAM (so a preferred model never pushes a GPU model out). Otherwise RAM."""
    mode = spec.gpu_mode
    if not mode:
        return "ram"
    gpus = [b for d, b in budgets.items() if d != "ram"]
    capable = get_loader(spec.type).supports_gpu
    if mode == GPU_REQUIRED:
        if not capable:
            raise FailedPrecondition(f"model {spec.model_id!r} requires a GPU, but type {spec.type!r} "
                                     f"runs in RAM only (GPU types: {', '.join(gpu_types())})")
        if not gpus:
            raise FailedPrecondition(f"model {spec.model_id!r} requires a GPU and this instance has none")
    if not capable or not gpus:
        return "ram"
    size = predict(spec, gpus[0].device)  # the same on every GPU (learned per kind of device)

    def free(b: DeviceBudget) -> int:
        return b.capacity_bytes - b.used_bytes

    if mode == GPU_REQUIRED:  # the freest GPU that can hold it at all
        return max([b for b in gpus if b.capacity_bytes >= size] or gpus, key=free).device
    best = max(gpus, key=free)
    return best.device if free(best) >= size else "ram"


class RuntimeService:
    def __init__(
        self,
        *,
        instance_id: str,
        cache: ModelCache,
        specs: SpecCache,
        infer_executor: Executor,
        sizer: SizePredictor,
        types: list[str] | None = None,
        inline_predict_ms: float = 0.0,
        metrics: RuntimeMetrics | None = None,
        limit: InflightLimit | None = None,
        device_executors: Mapping[str, Executor] | None = None,
        batching: BatchPolicy | None = None,
    ) -> None:
        self.instance_id = instance_id
        self.metrics = metrics or RuntimeMetrics()
        self.limit = limit or InflightLimit(max_bytes=1 << 30, max_requests=20_000)
        self.cache = cache
        self.specs = specs
        self.sizer = sizer
        self.inline_predict_ms = inline_predict_ms
        self.ready = False  # ServerReady: set once registered and serving, cleared when draining
        self._executor = infer_executor
        # GPU copies predict on their device's own thread(s) (RuntimeSettings.gpu_inference_threads).
        self._device_executors = device_executors or {}
        self.types = [t.lower() for t in (types or supported_types())]
        self.requests = 0
        self.inflight = 0  # inferences running now, for the drain on shutdown
        self.last_started = 0.0  # perf_counter of the last inference's arrival, ditto
        self.leaving = False  # shutting down: loads asked of this instance are refused
        self._background = Background("runtime-service")  # unloads after registration changes
        # Dynamic batching (mesh.runtime.batching): the runtime's defaults, and a batcher per
        # in-process copy that batches (None: it does not), dropped when the copy goes.
        self.batching = batching or BatchPolicy()
        self._batchers: dict[str, tuple[Entry, Batcher | None]] = {}
        cache.add_listener(self)
        specs.subscribe(self._registration_changed, self._registrations_reset)

    # --- inference ----------------------------------------------------------------------------
    async def _spec(self, model_id: str) -> ModelSpec:
        spec = await self.specs.get(model_id)
        if spec is None:
            raise ModelNotFound(model_id)
        return spec

    async def _loadable_spec(self, model_id: str) -> ModelSpec:
        spec = await self._spec(model_id)
        if spec.type.lower() not in self.types:
            raise InvalidArgument(f"model {model_id!r} has type {spec.type!r}, which this runtime "
                                  f"does not load (it loads: {', '.join(self.types)})")
        return spec

    async def _entry(self, model_id: str, allow_load: bool) -> Entry:
        entry = self.cache.loaded(model_id)
        if entry is None:
            entry = await self.cache.acquire(await self._loadable_spec(model_id), allow_load=allow_load)
        return entry

    async def _miss(self, model_id: str, allow_load: bool) -> Entry:
        """The copy for an inference whose model was not loaded at its arrival, counted as a miss
        with its reason: ``routed_elsewhere`` (not here and not ours to load), ``load_failed``,
        else ``evicted`` (loaded here before) or ``cold``. Requests for unregistered models, or of
        a type this runtime does not load, are no cache requests at all."""
        spec = await self._loadable_spec(model_id)
        entry = self.cache.loaded(model_id)
        if entry is not None:  # loaded while the registration was read
            self.metrics.hit(model_id)
            return entry
        reason = self.metrics.miss_reason(model_id)
        waited_since = time.perf_counter()
        try:
            entry = await self.cache.acquire(spec, allow_load=allow_load)
        except NotHere:
            self.metrics.miss(model_id, "routed_elsewhere")
            raise
        except Exception:
            self.metrics.miss(model_id, "load_failed")
            raise
        self.metrics.miss(model_id, reason, waited_since)
        return entry

    async def infer(self, model_id: str | None, body: bytes, *, allow_load: bool = True) -> bytes:
        """One inference: a serialized ModelInferRequest in, a serialized response out.

        Decoding, the prediction and encoding all run on an inference thread, so the event loop
        only routes bytes. ``model_id`` None means: the request's ``model_name``."""
        started = self.last_started = time.perf_counter()
        self.requests += 1
        code = "OK"
        size = len(body)
        try:
            self.limit.enter(size)  # ResourceExhausted past router.max_inflight_* (mesh.transport.inflight)
        except ResourceExhausted:
            self.metrics.invoked("RESOURCE_EXHAUSTED", started, model_id)
            raise
        self.inflight += 1
        try:
            if model_id is None:
                model_id = read_model_name(body)
            entry = self.cache.loaded(check_model_id(model_id))
            if entry is None:
                entry = await self._miss(model_id, allow_load)
            else:
                self.metrics.hit(model_id)
            if isinstance(entry.model, ForwardingModel):
                try:
                    return await self._forward_or_batch(entry, body)
                except CopyLost as exc:
                    if not allow_load:
                        raise
                    # The worker or server holding it died or forgot it (mesh.runtime.forwarding):
                    # load it again and answer this request from there rather than fail it.
                    if self.cache.get(model_id) is entry:
                        await self.cache.unload(model_id, reason=exc.message[:200])
                    entry = await self._miss(model_id, allow_load)
                    if isinstance(entry.model, ForwardingModel):
                        return await self._forward_or_batch(entry, body)
            batcher = self._batcher(entry)
            admitted = batcher.admit(body) if batcher is not None else None
            if batcher is not None and admitted is not None:
                return await batcher.submit(body=body, request=admitted[0], rows=admitted[1], key=admitted[2])
            if 0 <= entry.predict_ms < self.inline_predict_ms and len(body) <= INLINE_MAX_BODY:
                # Small and known to be quick: no thread hand-off (the copy cannot be evicted and
                # closed in between, since nothing awaits before the work is done).
                return _run_inference(entry, body)
            return await self._predict(entry, body)
        except BaseException as exc:
            code = status_name(exc)
            if isinstance(exc, MeshError) and isinstance(exc.__cause__, Exception) \
                    and "\n" in str(exc.__cause__).strip():
                _log_model_traceback(exc)
            raise
        finally:
            self.inflight -= 1
            self.limit.leave(size, None)
            self.metrics.invoked(code, started, model_id)

    async def _forward(self, entry: Entry, body: bytes) -> bytes:
        """A copy in a worker or an external server: its bytes go there from the event loop."""
        model = entry.model
        assert isinstance(model, ForwardingModel)
        self.cache.begin_use(entry)
        started = time.perf_counter()
        try:
            return await model.forward(body)
        finally:
            self.cache.end_use(entry)
            elapsed_ms = (time.perf_counter() - started) * 1000
            previous = entry.predict_ms
            entry.predict_ms = elapsed_ms if previous < 0 else previous + _EWMA * (elapsed_ms - previous)

    async def _predict(self, entry: Entry, body: bytes) -> bytes:
        self.cache.begin_use(entry)
        try:
            executor = self._executor if entry.device == "ram" else \
                self._device_executors.get(entry.device, self._executor)
            return await asyncio.get_running_loop().run_in_executor(executor, _run_inference, entry, body)
        finally:
            self.cache.end_use(entry)

    async def _forward_or_batch(self, entry: Entry, body: bytes) -> bytes:
        """A forwarded copy's request: through its batcher when it batches, else forwarded alone."""
        batcher = self._batcher(entry)
        admitted = batcher.admit(body) if batcher is not None else None
        if batcher is not None and admitted is not None:
            return await batcher.submit(body=body, request=admitted[0], rows=admitted[1], key=admitted[2])
        return await self._forward(entry, body)

    # --- dynamic batching ---------------------------------------------------------------------
    def _batcher(self, entry: Entry) -> Batcher | None:
        known = self._batchers.get(entry.model_id)
        if known is not None and known[0] is entry:
            return known[1]
        policy = self.batching.for_model(_key_or_empty(entry.spec.key), entry.model_id, entry.spec.type)
        batcher = None
        forwarded = isinstance(entry.model, ForwardingModel)
        mergeable = not forwarded or getattr(entry.model, "mergeable", False)
        if policy.enabled and mergeable and batchable_model(entry.model):
            async def execute(requests: list[pb.ModelInferRequest]) -> Merged:
                if forwarded:
                    return await self._forward_batch(entry, requests)
                return await self._predict_batch(entry, requests)

            async def alone(body: bytes) -> bytes:
                return await (self._forward(entry, body) if forwarded else self._predict(entry, body))

            batcher = Batcher(policy, execute, alone, model_id=entry.model_id,
                              inputs=getattr(entry.model, "inputs", ()), on_batch=self.metrics.batched)
        self._batchers[entry.model_id] = (entry, batcher)
        return batcher

    async def _predict_batch(self, entry: Entry, requests: list[pb.ModelInferRequest]) -> Merged:
        self.cache.begin_use(entry)
        try:
            executor = self._executor if entry.device == "ram" else \
                self._device_executors.get(entry.device, self._executor)
            return await asyncio.get_running_loop().run_in_executor(executor, _run_batch, entry, requests)
        finally:
            self.cache.end_use(entry)

    async def _forward_batch(self, entry: Entry, requests: list[pb.ModelInferRequest]) -> Merged:
        """A forwarded copy's batch (mesh.runtime.batch_predict): merged on the event loop into one
        request, forwarded to its worker or server as one, and its answer split back here."""
        body, outcomes, decoded, rows = merge_request(entry.model_id, requests)
        if body is None:
            return Merged(outcomes)
        answer: bytes | BaseException
        try:
            answer = await self._forward(entry, body)
        except Exception as exc:
            answer = exc
        return split_answer(entry.model_id, requests, answer, outcomes, decoded, rows)

    def on_change(self, entry: Entry, event: str) -> None:
        """A cache listener: a copy that goes takes its batcher along (requests still waiting in
        it are answered by its flush: NOT_HERE from the closed model, as unbatched)."""
        if event in ("evicted", "unloaded", "failed"):
            known = self._batchers.get(entry.model_id)
            if known is not None and known[0] is entry:
                del self._batchers[entry.model_id]

    async def model_ready(self, model_id: str) -> bool:
        entry = self.cache.get(check_model_id(model_id))
        if entry is not None:
            return entry.state == "loaded"
        await self._spec(model_id)  # NOT_FOUND for unknown models, like a V2 server
        return False

    async def model_metadata(self, model_id: str, *, allow_load: bool = True) -> pb.ModelMetadataResponse:
        entry = await self._entry(check_model_id(model_id), allow_load)
        model = entry.model
        assert model is not None
        response = pb.ModelMetadataResponse(name=model_id, versions=["1"], platform=model.platform)
        for spec, target in ((model.inputs, response.inputs), (model.outputs, response.outputs)):
            for t in spec:
                target.add(name=t.name, datatype=t.datatype, shape=list(t.shape))
        return response

    # --- the ModelRuntime SPI -----------------------------------------------------------------
    async def spec_for(self, model_id: str, model_type: str, path: str, key: str) -> ModelSpec:
        """The registered spec: what an SPI call may load is what the registry holds, never a type
        and path of the caller's choosing (the port may be reachable by more than the routers)."""
        check_model_id(model_id)
        spec = await self.specs.get(model_id)
        if spec is None:
            raise ModelNotFound(model_id)
        return spec

    async def load(self, spec: ModelSpec, *, last_used: float | None = None) -> Entry:
        if self.leaving:
            # Another runtime re-homing its models must not put them on one that leaves too.
            raise Unavailable(f"instance {self.instance_id} is shutting down; load {spec.model_id!r} elsewhere")
        if spec.type.lower() not in self.types:
            raise InvalidArgument(f"model type {spec.type!r} is not supported here "
                                  f"(supported: {', '.join(self.types)})")
        return await self.cache.acquire(spec, last_used=last_used, reason="loadModel")

    async def unload(self, model_id: str) -> bool:
        return await self.cache.unload(model_id, reason="unloadModel")

    async def check_source(self, spec: ModelSpec) -> None:
        """That the model could be read here, without loading it (`mesh model register` asks it
        through the router): its type is loaded here, its local file exists inside the model roots,
        or its storage key is configured. ModelLoadError (InvalidArgument for a type) saying why."""
        if spec.type.lower() not in self.types:
            raise InvalidArgument(f"model type {spec.type!r} is not supported here "
                                  f"(supported: {', '.join(self.types)})")
        fetch = self.cache.fetch

        def check() -> None:
            if fetch is not None:
                fetch.check(spec)  # a storage key, or a local path that is not in storage's folders
            if locate(spec.path, spec.key) is None:
                resolve_path(spec.path, self.sizer.roots)

        await asyncio.to_thread(check)

    def forget_failure(self, model_id: str) -> None:
        """Try the model's next load here again, even within its remembered failure's TTL (the
        cache remembers failures when it is a ``RememberingCache``: ``mesh.runtime.failures``)."""
        if isinstance(self.cache, RememberingCache):
            self.cache.failures.forget(model_id)

    async def predict_size(self, spec: ModelSpec) -> int:
        await asyncio.to_thread(self.sizer.prepare, spec)  # reads files: off the event loop
        return self.sizer.predict(spec)

    def model_size(self, model_id: str) -> int:
        entry = self.cache.get(model_id)
        if entry is None or entry.state != "loaded":
            raise ModelNotFound(model_id, what="loaded model")
        return entry.reserved_bytes

    # --- registration changes -----------------------------------------------------------------
    def _registration_changed(self, model_id: str, spec: ModelSpec | None) -> None:
        entry = self.cache.get(model_id)
        if entry is None or (spec is not None and spec.same_definition(entry.spec)):
            return
        why = "unregistered" if spec is None else "redefined"
        # The cache logs the unload, with this reason: one line per unload.
        self._background.spawn(self.cache.unload(model_id, reason=why), f"unload-{why}:{model_id[:100]}")

    def _registrations_reset(self) -> None:
        """After a watch reset, re-check every local copy against the registry."""
        async def recheck() -> None:
            for entry in self.cache.entries():
                try:
                    spec = await self.specs.get(entry.model_id)
                except Exception:
                    log.warning("re-check after a watch reset failed", model_id=entry.model_id)
                    continue
                self._registration_changed(entry.model_id, spec)

        self._background.spawn(recheck(), "recheck-registrations")


MAX_LOGGED_TRACEBACK = 16 * 1024  # a model's own error text, logged whole up to this
INLINE_MAX_BODY = 64 * 1024  # larger requests always go to a thread: decoding them takes time
_EWMA = 0.2



def _log_model_traceback(exc: MeshError) -> None:
    """The model's own error was several lines (TorchScript's interpreter stack): the client got its
    last line (``mesh.runtime.loaders.base.reason``); the whole text goes to this runtime's log,
    under the request's ID, and the client's message says which ID to look for."""
    request = current_request()
    request_id = request.request_id if request is not None else new_request_id()
    log.warning("model error", request_id=request_id, error=str(exc.__cause__)[:MAX_LOGGED_TRACEBACK])
    exc.message = f"{exc.message} (the whole error is in the runtime's log, request id {request_id})"
    exc.args = (exc.message,)

def _run_inference(entry: Entry, body: bytes) -> bytes:
    """Decode, predict, encode; usually on an inference thread (see ``infer``)."""
    started = time.perf_counter()
    response = _infer(entry, body)
    elapsed_ms = (time.perf_counter() - started) * 1000
    previous = entry.predict_ms
    entry.predict_ms = elapsed_ms if previous < 0 else previous + _EWMA * (elapsed_ms - previous)
    return response


def _run_batch(entry: Entry, requests: list[pb.ModelInferRequest]) -> Merged:
    """A batch's prediction (mesh.runtime.batch_predict) on an inference thread, timed like one."""
    started = time.perf_counter()
    model = entry.model
    if model is None:
        return Merged([NotHere(f"model {entry.model_id!r} was unloaded from this instance")] * len(requests))
    merged = predict_merged(model, entry.model_id, requests)
    elapsed_ms = (time.perf_counter() - started) * 1000
    previous = entry.predict_ms
    entry.predict_ms = elapsed_ms if previous < 0 else previous + _EWMA * (elapsed_ms - previous)
    return merged


def _key_or_empty(key: str) -> dict[str, object]:
    try:
        return parse_key(key)
    except ModelLoadError:
        return {}


def _infer(entry: Entry, body: bytes) -> bytes:
    model = entry.model
    if model is None:  # cannot happen while in_use > 0, but never predict on a released model
        raise ModelLoadError(f"model {entry.model_id!r} is not loaded")
    return infer_bytes(model, entry.model_id, body)


__all__ = ["RuntimeService", "SizePredictor", "choose_device", "load_model", "warm_device_thread", "warm_gpus",
           "warm_imports"]
