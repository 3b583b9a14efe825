"""A ModelMesh model runtime for tests: the runtime SPI (``mmesh.ModelRuntime``, written against
proto/mmesh/model_runtime.proto) and the V2 inference service on one port, serving scikit-learn
models, the shape of a runtime from the modelmesh-runtime-adapter ecosystem.

    python -m tests.support.spi_server --port 0 [--host 127.0.0.1] [--load-delay-s S]
        [--fail-loads MESSAGE] [--capacity-bytes N] [--hang-loads] [--hang-unloads]

prints ``ready <port>`` once serving (tests.support.model_servers has the contract).

SPI, as ModelMesh expects of a runtime (docs/runtimes/custom_runtimes.md):

* ``runtimeStatus``: READY with the limits below, and it purges every loaded model: ModelMesh
  calls it when it (re)starts its view of the runtime, and copies it no longer knows of must go.
* ``loadModel``: ``modelType`` "sklearn" only: ``joblib.load`` of ``modelPath``, an existing regular
  file. Answers ``sizeInBytes`` measured (the process's RSS growth across the load; where that is
  not positive, 1.25 times the file's size, the multiplier of ModelMesh's adapters; at least 1) and
  ``maxConcurrency`` 0 (no limit). A model already loaded answers its recorded size again. The
  measure is rough on purpose: the allocator often serves a small model from memory it already
  holds (growth 0, so the file rule), and loads running side by side see each other's growth.
* ``unloadModel``: OK whether or not the model is loaded, as ModelMesh runtimes answer.
* ``modelSize``: the size recorded at load; ``predictModelSize``: 1.25 times the file's size.

Inference: the model is the ``mm-model-id`` (or ``mm-model-id-bin``) request header, else the
request's model name (``ModelReady`` goes by its name). A model not loaded answers NOT_FOUND
"model X is not loaded": the runtime's adapter takes NOT_FOUND for a lost copy. ``ModelInfer``
takes one FP32 or FP64 2-D input, raw or typed, and answers one output "predict" in
``raw_output_contents``: FP64 for float predictions, INT64 for integer labels (BOOL and BYTES for
the rarer boolean and string labels).

Test knobs: ``--load-delay-s`` sleeps before each load; ``--fail-loads`` answers every load INTERNAL
with that message (after the delay); ``--hang-loads`` never answers a load (the call waits until
the client gives up or the server stops).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil

from mesh.gen.inference import grpc_service_pb2 as pb
from mesh.gen.inference import grpc_service_pb2_grpc as pb_grpc
from mesh.gen.mmesh import model_runtime_pb2 as rt
from mesh.gen.mmesh import model_runtime_pb2_grpc as rt_grpc
from tests.support.model_servers import Internal, InvalidArgument, NotFound, configure_logging, rpc, serve

RUNTIME_VERSION = "spi-test-1"
SIZE_MULTIPLIER = 1.25  # modelmesh-runtime-adapter's MODELSIZE_MULTIPLIER default
MAX_LOADING_CONCURRENCY = 2
MODEL_LOADING_TIMEOUT_MS = 30_000
DEFAULT_MODEL_SIZE_BYTES = 1_000_000  # the MLServer adapter's default
OUTPUT_NAME = "predict"
_INPUT_DTYPES: dict[str, np.dtype[Any]] = {"FP32": np.dtype("<f4"), "FP64": np.dtype("<f8")}


@dataclass(frozen=True)
class Settings:
    capacity_bytes: int = 1 << 30  # advertised to ModelMesh, not enforced here
    load_delay_s: float = 0.0
    fail_loads: str | None = None
    hang_loads: bool = False
    hang_unloads: bool = False


@dataclass(frozen=True)
class LoadedModel:
    model_id: str
    estimator: Any
    size_bytes: int


# ---------------------------------------------------------------------------------------------
# the runtime, without gRPC


class SklearnRuntime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._models: dict[str, LoadedModel] = {}
        self._process = psutil.Process()

    def purge(self) -> None:
        self._models.clear()

    async def load(self, model_id: str, model_type: str, model_path: str) -> LoadedModel:
        if self.settings.hang_loads:
            await asyncio.Event().wait()  # never set: the call ends when it is cancelled
        if self.settings.load_delay_s > 0:
            await asyncio.sleep(self.settings.load_delay_s)
        if self.settings.fail_loads is not None:
            raise Internal(self.settings.fail_loads)
        if not model_id:
            raise InvalidArgument("modelId must not be empty")
        if model_type != "sklearn":
            raise InvalidArgument(f"model type '{model_type}' not supported")
        file = _model_file(model_path)
        if (loaded := self._models.get(model_id)) is not None:
            return loaded
        rss_before = self._process.memory_info().rss
        estimator = await asyncio.to_thread(_unpickle, model_id, file)
        growth = self._process.memory_info().rss - rss_before
        size = growth if growth > 0 else math.ceil(file.stat().st_size * SIZE_MULTIPLIER)
        loaded = LoadedModel(model_id, estimator, max(size, 1))
        self._models[model_id] = loaded
        return loaded

    def unload(self, model_id: str) -> None:
        self._models.pop(model_id, None)

    def get(self, model_id: str) -> LoadedModel:
        loaded = self._models.get(model_id)
        if loaded is None:
            raise NotFound(f"model {model_id} is not loaded")
        return loaded

    def is_loaded(self, model_id: str) -> bool:
        return model_id in self._models

    def predict_size(self, model_path: str) -> int:
        return max(1, math.ceil(_model_file(model_path).stat().st_size * SIZE_MULTIPLIER))

    async def predict(self, model_id: str, x: np.ndarray) -> np.ndarray:
        loaded = self.get(model_id)
        try:
            y = await asyncio.to_thread(loaded.estimator.predict, x)
        except (ValueError, TypeError, IndexError) as err:
            # What scikit-learn raises for input it cannot take (e.g. a wrong feature count).
            raise InvalidArgument(f"model {model_id} cannot predict this input: {err}") from err
        return np.asarray(y)


def _model_file(model_path: str) -> Path:
    if not model_path:
        raise InvalidArgument("modelPath must not be empty")
    path = Path(model_path)
    if not path.exists():
        raise NotFound(f"model file {model_path} does not exist")
    if not path.is_file():
        raise InvalidArgument(f"model path {model_path} is not a regular file")
    return path


def _unpickle(model_id: str, file: Path) -> Any:
    import joblib

    try:
        estimator = joblib.load(file)
    except Exception as err:
        raise InvalidArgument(f"cannot load model {model_id} from {file}: {type(err).__name__}: {err}") from err
    if not callable(getattr(estimator, "predict", None)):
        raise InvalidArgument(f"model {model_id} from {file} is a {type(estimator).__name__}, which has no predict()")
    return estimator


# ---------------------------------------------------------------------------------------------
# tensors


def decode_input(request: pb.ModelInferRequest) -> np.ndarray:
    """The one FP32/FP64 2-D input of ``request``, as an array; InvalidArgument says what is wrong."""
    if len(request.inputs) != 1:
        raise InvalidArgument(f"expected exactly 1 input, got {len(request.inputs)}")
    tensor = request.inputs[0]
    name = tensor.name
    dtype = _INPUT_DTYPES.get(tensor.datatype)
    if dtype is None:
        raise InvalidArgument(f"input '{name}': datatype '{tensor.datatype}' not supported; send FP32 or FP64")
    shape = list(tensor.shape)
    if len(shape) != 2 or min(shape) < 0:
        raise InvalidArgument(f"input '{name}': shape {shape} must be 2-D [rows, features] with no negative dimension")
    count = shape[0] * shape[1]
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise InvalidArgument(f"raw_input_contents has {len(request.raw_input_contents)} entries for 1 input")
        if tensor.HasField("contents"):
            raise InvalidArgument(f"input '{name}' sets contents while the request uses raw_input_contents")
        raw = request.raw_input_contents[0]
        if len(raw) != count * dtype.itemsize:
            raise InvalidArgument(
                f"input '{name}': raw contents hold {len(raw)} bytes; shape {shape} of {tensor.datatype} "
                f"needs {count * dtype.itemsize}"
            )
        values = np.frombuffer(raw, dtype=dtype)
    else:
        typed = tensor.contents.fp32_contents if tensor.datatype == "FP32" else tensor.contents.fp64_contents
        if len(typed) != count:
            raise InvalidArgument(
                f"input '{name}': contents hold {len(typed)} {tensor.datatype} values; shape {shape} needs {count}"
            )
        values = np.asarray(typed, dtype=dtype)
    return values.reshape(shape)


def encode_output(y: np.ndarray) -> tuple[str, bytes]:
    """``predict``'s answer as (datatype, raw little-endian bytes)."""
    if y.dtype.kind == "f":
        return "FP64", y.astype("<f8").tobytes()
    if y.dtype.kind in "iu":
        return "INT64", y.astype("<i8").tobytes()
    if y.dtype.kind == "b":
        return "BOOL", y.astype(np.bool_).tobytes()
    if y.dtype.kind in "OUS":
        parts = []
        for value in y.ravel():
            data = value if isinstance(value, bytes) else str(value).encode("utf-8")
            parts.append(len(data).to_bytes(4, "little") + data)
        return "BYTES", b"".join(parts)
    raise Internal(f"predict returned {y.dtype} values, which this server cannot encode")


# ---------------------------------------------------------------------------------------------
# gRPC


def _model_id(context: grpc.aio.ServicerContext, fallback: str) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "mm-model-id":
            return str(value)
        if key == "mm-model-id-bin":  # grpc has already base64-decoded a -bin header's value
            return value.decode("utf-8") if isinstance(value, bytes) else str(value)
    return fallback


class RuntimeServicer(rt_grpc.ModelRuntimeServicer):
    def __init__(self, runtime: SklearnRuntime) -> None:
        self._runtime = runtime

    @rpc
    async def runtimeStatus(self, request: rt.RuntimeStatusRequest, context: Any) -> rt.RuntimeStatusResponse:
        self._runtime.purge()
        return rt.RuntimeStatusResponse(
            status=rt.RuntimeStatusResponse.READY,
            capacityInBytes=self._runtime.settings.capacity_bytes,
            maxLoadingConcurrency=MAX_LOADING_CONCURRENCY,
            modelLoadingTimeoutMs=MODEL_LOADING_TIMEOUT_MS,
            defaultModelSizeInBytes=DEFAULT_MODEL_SIZE_BYTES,
            runtimeVersion=RUNTIME_VERSION,
        )

    @rpc
    async def loadModel(self, request: rt.LoadModelRequest, context: Any) -> rt.LoadModelResponse:
        loaded = await self._runtime.load(request.modelId, request.modelType, request.modelPath)
        return rt.LoadModelResponse(sizeInBytes=loaded.size_bytes, maxConcurrency=0)

    @rpc
    async def unloadModel(self, request: rt.UnloadModelRequest, context: Any) -> rt.UnloadModelResponse:
        if self._runtime.settings.hang_unloads:
            await asyncio.Event().wait()  # never set: the call ends when it is cancelled
        self._runtime.unload(request.modelId)
        return rt.UnloadModelResponse()

    @rpc
    async def modelSize(self, request: rt.ModelSizeRequest, context: Any) -> rt.ModelSizeResponse:
        return rt.ModelSizeResponse(sizeInBytes=self._runtime.get(request.modelId).size_bytes)

    @rpc
    async def predictModelSize(
        self, request: rt.PredictModelSizeRequest, context: Any
    ) -> rt.PredictModelSizeResponse:
        return rt.PredictModelSizeResponse(sizeInBytes=self._runtime.predict_size(request.modelPath))


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, runtime: SklearnRuntime) -> None:
        self._runtime = runtime

    @rpc
    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @rpc
    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    @rpc
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="spi-test", version=RUNTIME_VERSION)

    @rpc
    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self._runtime.is_loaded(request.name))

    @rpc
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        model_id = _model_id(context, request.name)
        estimator = self._runtime.get(model_id).estimator
        n_features = getattr(estimator, "n_features_in_", -1)
        classes = getattr(estimator, "classes_", None)
        output = "FP64" if classes is None else encode_output(np.asarray(classes)[:0])[0]
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=model_id,
            platform="sklearn",
            inputs=[tensor(name="input-0", datatype="FP32", shape=[-1, int(n_features)])],
            outputs=[tensor(name=OUTPUT_NAME, datatype=output, shape=[-1])],
        )

    @rpc
    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        model_id = _model_id(context, request.model_name)
        self._runtime.get(model_id)  # NOT_FOUND before any complaint about the input
        for wanted in request.outputs:
            if wanted.name != OUTPUT_NAME:
                raise InvalidArgument(f"model {model_id} has no output '{wanted.name}'; its one output is 'predict'")
        y = await self._runtime.predict(model_id, decode_input(request))
        datatype, raw = encode_output(y)
        out = pb.ModelInferResponse.InferOutputTensor(name=OUTPUT_NAME, datatype=datatype, shape=list(y.shape))
        return pb.ModelInferResponse(model_name=model_id, id=request.id, outputs=[out], raw_output_contents=[raw])


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.support.spi_server", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="0 picks a free port")
    parser.add_argument("--load-delay-s", type=float, default=0.0, help="sleep this long before each load")
    parser.add_argument("--fail-loads", metavar="MESSAGE", help="answer every load INTERNAL with MESSAGE")
    parser.add_argument("--capacity-bytes", type=int, default=1 << 30, help="capacityInBytes to advertise")
    parser.add_argument("--hang-loads", action="store_true", help="never answer a load")
    parser.add_argument("--hang-unloads", action="store_true", help="never answer an unload")
    args = parser.parse_args(argv)
    configure_logging()
    # Import what the tests' models unpickle before serving, so that a load's RSS growth is the
    # model's and not scikit-learn's own (about 90 MB for the first model otherwise).
    for module in ("joblib", "sklearn.pipeline", "sklearn.linear_model", "sklearn.tree", "sklearn.ensemble"):
        importlib.import_module(module)
    runtime = SklearnRuntime(Settings(args.capacity_bytes, args.load_delay_s, args.fail_loads, args.hang_loads,
                                       args.hang_unloads))
    server = grpc.aio.server()
    rt_grpc.add_ModelRuntimeServicer_to_server(RuntimeServicer(runtime), server)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(runtime), server)
    await serve(server, args.host, args.port)


if __name__ == "__main__":
    asyncio.run(main())
