"""A stand-in for Triton Inference Server in explicit model-control mode, for tests: the V2
inference service plus Triton's model repository RPCs, serving ONNX models with onnxruntime.

There is no Triton binary on this machine (nor a container runtime to pull one), so the runtime's
Triton adapter is tested against this process instead. It answers the calls that adapter makes the
way Triton does, status codes and messages included, and nothing more.

    python -m tests.support.triton_standin --repository DIR --port 0 [--host 127.0.0.1]
        [--load-delay-s S] [--unknown-model-code {UNAVAILABLE,NOT_FOUND}]

prints ``ready <port>`` once serving (tests.support.model_servers has the contract).

Repository layout, Triton's: ``DIR/<model>/config.pbtxt`` and ``DIR/<model>/<version>/model.onnx``
(or the config's ``default_model_filename``). Of config.pbtxt only ``name``, ``platform``
("onnxruntime_onnx") or ``backend`` ("onnxruntime"), ``max_batch_size`` and
``default_model_filename`` are read; other fields are skipped. A load picks the highest numeric
version (Triton's default policy, latest 1) and creates an onnxruntime session with one thread.
Unlike Triton, a model already READY is never reloaded (Triton reloads one whose files changed),
and the index lists only directories holding a config.pbtxt (Triton lists every subdirectory).

All RPCs sit under ``inference.GRPCInferenceService``: the generated servicer serves the V2 ones;
one generic handler serves RepositoryIndex, RepositoryModelLoad and RepositoryModelUnload with the
messages of mesh.gen.inference.repository_pb2, because our generated service has no such RPCs.

Errors follow Triton's sources (triton-inference-server/core
src/model_repository_manager/model_repository_manager.cc and model_lifecycle.cc; the onnxruntime
backend for a missing file; server src/grpc for the repository_name check; status codes pass
through GrpcStatusUtil::CodeToStatus unchanged, UNSUPPORTED becoming UNIMPLEMENTED):

* a name with '/' or '..': INVALID_ARGUMENT "invalid model name '<m>', model name must not contain
  path traversal characters" (ValidateModelName, loads only);
* no such model directory, or a config.pbtxt that cannot be read: INTERNAL "failed to load '<m>',
  failed to poll from model repository";
* no version directory: INVALID_ARGUMENT "load failed for model '<m>': at least one version must
  be available under the version policy of model '<m>'";
* a version that fails (backend not onnxruntime, model file missing, onnxruntime refusing it):
  INVALID_ARGUMENT "load failed for model '<m>': version <v> is at UNAVAILABLE state: <reason>;"
  with reasons such as "Invalid argument: unable to find backend library for backend '<b>', try
  specifying runtime on the model configuration."; the index then shows UNAVAILABLE and the reason;
* unload: OK whether or not the model is loaded; the index shows UNAVAILABLE "unloaded";
* inference on a model not ready: "Request for unknown model: '<m>' is not found" (never loaded)
  or "... '<m>' has no available versions" (unloaded or failed). The code is UNAVAILABLE, as in
  the releases whose ModelRepositoryManager::GetInferenceBackend wrapped every miss so
  (triton-inference-server/server src/core/model_repository_manager.cc, 20.x); current Triton
  keeps the life cycle's code, NOT_FOUND: ``--unknown-model-code NOT_FOUND`` answers that way, so
  an adapter can be tested against both.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from mesh.gen.inference import grpc_service_pb2 as pb
from mesh.gen.inference import grpc_service_pb2_grpc as pb_grpc
from mesh.gen.inference import repository_pb2 as repo
from tests.support.model_servers import (
    Internal,
    InvalidArgument,
    ServerError,
    Unavailable,
    Unimplemented,
    configure_logging,
    rpc,
    serve,
)

log = logging.getLogger("triton_standin")

SERVICE = "inference.GRPCInferenceService"
PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"
EXTENSIONS = ("model_repository", "model_repository(unload_dependents)")
# Backends Triton derives from a config's platform when it names no backend.
_PLATFORM_BACKENDS = {
    "onnxruntime_onnx": "onnxruntime",
    "tensorflow_graphdef": "tensorflow",
    "tensorflow_savedmodel": "tensorflow",
    "pytorch_libtorch": "pytorch",
    "tensorrt_plan": "tensorrt",
}
_ORT_TYPES = {
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(int64)": "INT64",
    "tensor(int32)": "INT32",
    "tensor(int16)": "INT16",
    "tensor(int8)": "INT8",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(bool)": "BOOL",
    "tensor(float16)": "FP16",
    "tensor(string)": "BYTES",
}
# What the stand-in decodes: datatype -> (little-endian dtype, typed contents field).
_INPUTS: dict[str, tuple[np.dtype[Any], str]] = {
    "FP32": (np.dtype("<f4"), "fp32_contents"),
    "FP64": (np.dtype("<f8"), "fp64_contents"),
    "INT64": (np.dtype("<i8"), "int64_contents"),
    "INT32": (np.dtype("<i4"), "int_contents"),
}
_OUTPUTS = {"f4": "FP32", "f8": "FP64", "i8": "INT64", "i4": "INT32", "b1": "BOOL"}

READY, LOADING, UNAVAILABLE = "READY", "LOADING", "UNAVAILABLE"


# ---------------------------------------------------------------------------------------------
# config.pbtxt


class ConfigError(Exception):
    pass


@dataclass(frozen=True)
class ModelConfig:
    name: str
    backend: str
    max_batch_size: int
    default_model_filename: str


_TOKEN = re.compile(r"""\s+|\#[^\n]*|"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'|[{}\[\]<>:,;]|[^\s{}\[\]<>:,;"'\#]+""")
_OPEN, _CLOSE = "{[<", "}]>"


def parse_config(text: str, directory_name: str) -> ModelConfig:
    """The fields the stand-in needs from a text-format ModelConfig; nested messages and lists
    (input, output, instance_group, ...) are skipped whole."""
    tokens: list[str] = []
    pos = 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise ConfigError(f"unreadable text at offset {pos}: {text[pos:pos + 20]!r}")
        token = match.group()
        if not token.isspace() and not token.startswith("#"):
            tokens.append(token)
        pos = match.end()
    fields: dict[str, str] = {}
    i = 0
    while i < len(tokens):
        key = tokens[i]
        if not re.fullmatch(r"[A-Za-z_]\w*", key):
            raise ConfigError(f"expected a field name, got {key!r}")
        i += 1
        if i < len(tokens) and tokens[i] == ":":
            i += 1
        if i >= len(tokens):
            raise ConfigError(f"field {key!r} has no value")
        if tokens[i] in _OPEN:
            i = _skip_nested(tokens, i)
        elif tokens[i] in _CLOSE or tokens[i] in ":,;":
            raise ConfigError(f"field {key!r}: unexpected {tokens[i]!r}")
        else:
            fields[key] = _unquote(tokens[i])
            i += 1
        if i < len(tokens) and tokens[i] in ",;":
            i += 1
    name = fields.get("name", directory_name)
    if name != directory_name:
        raise ConfigError(
            f"unexpected directory name '{directory_name}' for model '{name}', directory name must equal model name"
        )
    try:
        max_batch_size = int(fields.get("max_batch_size", "0"))
    except ValueError as err:
        raise ConfigError(f"max_batch_size {fields['max_batch_size']!r} is not an integer") from err
    if max_batch_size < 0:
        raise ConfigError(f"max_batch_size must be >= 0, got {max_batch_size}")
    platform = fields.get("platform", "")
    backend = fields.get("backend", "") or _PLATFORM_BACKENDS.get(platform, platform)
    if not backend:
        raise ConfigError("the configuration names neither platform nor backend")
    return ModelConfig(name, backend, max_batch_size, fields.get("default_model_filename", ""))


def _skip_nested(tokens: list[str], i: int) -> int:
    depth = 0
    while i < len(tokens):
        if tokens[i] in _OPEN:
            depth += 1
        elif tokens[i] in _CLOSE:
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise ConfigError("unbalanced brackets")


def _unquote(token: str) -> str:
    if token[:1] in "\"'":
        return re.sub(r"\\(.)", r"\1", token[1:-1])
    return token


# ---------------------------------------------------------------------------------------------
# the repository and its models, without gRPC


@dataclass
class ModelRecord:
    """One model's life cycle, as the index shows it."""

    version: int
    state: str = LOADING  # LOADING, READY or UNAVAILABLE (a model never loaded has no record)
    reason: str = ""
    session: Any = None
    max_batch_size: int = 0
    generation: int = 0  # bumped by every load and unload: a load that finds it moved is stale


class _VersionFailed(Exception):
    """A version that did not load; the message is the state reason, "<Code>: <message>"."""


class Repository:
    def __init__(self, root: Path, load_delay_s: float = 0.0, unknown_model_code: str = "UNAVAILABLE") -> None:
        self.root = root
        self.load_delay_s = load_delay_s
        self.unknown_model_code = unknown_model_code
        self._records: dict[str, ModelRecord] = {}
        # One load at a time per model: a second request waits for the first's outcome, as
        # Triton's conflicting loads do. Loads run on even when their caller gives up.
        self._loads: dict[str, asyncio.Task[None]] = {}

    def index(self, ready_only: bool) -> list[repo.RepositoryIndexResponse.ModelIndex]:
        entries = []
        for directory in sorted(self.root.iterdir()):
            if not (directory / "config.pbtxt").is_file():
                continue
            record = self._records.get(directory.name)
            if record is None:
                if not ready_only:
                    entries.append(repo.RepositoryIndexResponse.ModelIndex(name=directory.name))
            elif not ready_only or record.state == READY:
                entries.append(
                    repo.RepositoryIndexResponse.ModelIndex(
                        name=directory.name, version=str(record.version), state=record.state, reason=record.reason
                    )
                )
        return entries

    async def load(self, name: str) -> None:
        if not name:
            raise InvalidArgument("model name must not be empty")
        if ".." in name or "/" in name:
            raise InvalidArgument(f"invalid model name '{name}', model name must not contain path traversal characters")
        task = self._loads.get(name)
        if task is None or task.done():
            task = asyncio.create_task(self._load(name), name=f"load {name}")
            task.add_done_callback(_retrieve)
            self._loads[name] = task
        await asyncio.shield(task)

    async def _load(self, name: str) -> None:
        record = self._records.get(name)
        if record is not None and record.state == READY:
            return
        config, version = self._poll(name)
        record = self._records.setdefault(name, ModelRecord(version))
        record.generation += 1
        generation = record.generation
        record.version, record.state, record.reason, record.session = version, LOADING, "", None
        log.info("loading: %s:%d", name, version)
        try:
            if self.load_delay_s > 0:
                await asyncio.sleep(self.load_delay_s)
            session = await asyncio.to_thread(self._create_session, name, config, version)
        except _VersionFailed as failed:
            log.error("failed to load '%s' version %d: %s", name, version, failed)
            if record.generation == generation:
                record.state, record.reason = UNAVAILABLE, str(failed)
            raise InvalidArgument(
                f"load failed for model '{name}': version {version} is at UNAVAILABLE state: {failed};\n"
            ) from None
        except BaseException:  # a bug, or the server stopping: the version must not stay LOADING
            if record.generation == generation:
                record.state, record.reason = UNAVAILABLE, "the load did not finish"
            raise
        if record.generation != generation:
            raise InvalidArgument(
                f"load failed for model '{name}': Newer operation has been applied to the model lifecycle, "
                "current load operation is out-dated.\n"
            )
        record.state, record.session, record.max_batch_size = READY, session, config.max_batch_size
        log.info("successfully loaded '%s' version %d", name, version)

    def _poll(self, name: str) -> tuple[ModelConfig, int]:
        directory = self.root / name
        failed = Internal(f"failed to load '{name}', failed to poll from model repository")
        if not directory.is_dir():
            log.error("failed to poll model '%s': model not found in any model repository.", name)
            raise failed
        try:
            config = parse_config((directory / "config.pbtxt").read_text(encoding="utf-8"), name)
        except (OSError, UnicodeDecodeError, ConfigError) as err:
            log.error("Poll failed for model directory '%s': %s", name, err)
            raise failed from None
        versions = [int(d.name) for d in directory.iterdir() if d.is_dir() and re.fullmatch(r"[0-9]+", d.name)]
        if not versions:
            raise InvalidArgument(
                f"load failed for model '{name}': at least one version must be available under the version "
                f"policy of model '{name}'\n"
            )
        return config, max(versions)

    def _create_session(self, name: str, config: ModelConfig, version: int) -> Any:
        if config.backend != BACKEND:
            raise _VersionFailed(
                f"Invalid argument: unable to find backend library for backend '{config.backend}', "
                "try specifying runtime on the model configuration."
            )
        file = self.root / name / str(version) / (config.default_model_filename or "model.onnx")
        if file.is_dir():  # the onnxruntime backend takes a directory's model.onnx
            file = file / "model.onnx"
        if not file.is_file():
            raise _VersionFailed(f"Unavailable: unable to find '{file}' for model instance '{name}_0_0'")
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        try:
            return onnxruntime.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
        except Exception as err:
            raise _VersionFailed(f"Internal: onnx runtime error: {err}") from err

    def unload(self, name: str) -> None:
        record = self._records.get(name)
        if record is None:
            return
        record.generation += 1  # a load in flight finds its work stale
        if record.state in (READY, LOADING):
            record.state, record.reason, record.session = UNAVAILABLE, "unloaded", None
            log.info("successfully unloaded '%s' version %s", name, record.version)

    def is_ready(self, name: str, version: str) -> bool:
        record = self._records.get(name)
        return record is not None and record.state == READY and (not version or version == str(record.version))

    def ready_record(self, name: str, version: str) -> ModelRecord:
        """The model's READY record, or Triton's 'Request for unknown model' error."""
        record = self._records.get(name)
        if record is None:
            raise self._unknown(f"'{name}' is not found")
        if version:
            if not re.fullmatch(r"-?[0-9]+", version):
                raise InvalidArgument(f"failed to get model version from specified version string '{version}'")
            if int(version) != record.version:
                raise self._unknown(f"'{name}' version {version} is not found")
            if record.state != READY:
                raise Unavailable(f"Request for unknown model: '{name}' version {version} is not at ready state")
        elif record.state != READY:
            raise self._unknown(f"'{name}' has no available versions")
        return record

    def _unknown(self, detail: str) -> ServerError:
        return ServerError(f"Request for unknown model: {detail}", code=self.unknown_model_code)


def _retrieve(task: asyncio.Task[None]) -> None:
    # The caller may have gone (the load runs on): fetch the outcome so asyncio does not log it
    # as never retrieved; the load has logged its own failure.
    if not task.cancelled():
        task.exception()


# ---------------------------------------------------------------------------------------------
# inference


async def infer(name: str, record: ModelRecord, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
    session = record.session
    rid = f"[request id: {request.id or '<id_unknown>'}] "
    specs = {spec.name: spec for spec in session.get_inputs()}
    if len(request.inputs) != len(specs):
        raise InvalidArgument(
            f"{rid}expected {len(specs)} inputs but got {len(request.inputs)} inputs for model '{name}'"
        )
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(f"{rid}raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs")
    feeds: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        spec = specs.get(tensor.name)
        if spec is None or tensor.name in feeds:
            raise InvalidArgument(f"{rid}unexpected inference input '{tensor.name}' for model '{name}'")
        expected = _ORT_TYPES.get(spec.type, spec.type)
        if tensor.datatype != expected:
            raise InvalidArgument(
                f"{rid}inference input '{tensor.name}' data-type is '{tensor.datatype}', but model '{name}' "
                f"expects '{expected}'"
            )
        if expected not in _INPUTS:
            raise InvalidArgument(f"{rid}input '{tensor.name}': the stand-in does not decode {expected} tensors")
        dtype, field = _INPUTS[expected]
        shape = list(tensor.shape)
        dims = [d if isinstance(d, int) and d >= 0 else -1 for d in spec.shape]
        if len(shape) != len(dims) or any(s < 0 or (d >= 0 and s != d) for s, d in zip(shape, dims, strict=True)):
            raise InvalidArgument(
                f"{rid}unexpected shape for input '{tensor.name}' for model '{name}'. Expected {dims}, got {shape}"
            )
        if record.max_batch_size > 0 and shape and shape[0] > record.max_batch_size:
            raise InvalidArgument(f"{rid}inference request batch-size must be <= {record.max_batch_size} for '{name}'")
        count = math.prod(shape)
        if raw:
            if tensor.HasField("contents"):
                raise InvalidArgument(
                    f"{rid}contents field must not be specified when using raw_input_contents for "
                    f"'{tensor.name}' for model '{name}'"
                )
            if len(raw[i]) != count * dtype.itemsize:
                raise InvalidArgument(
                    f"{rid}unexpected total byte size {len(raw[i])} for input '{tensor.name}', expecting "
                    f"{count * dtype.itemsize}"
                )
            values = np.frombuffer(raw[i], dtype=dtype)
        else:
            typed = getattr(tensor.contents, field)
            if len(typed) != count:
                raise InvalidArgument(
                    f"{rid}unexpected number of {expected} elements {len(typed)} in contents for input "
                    f"'{tensor.name}', expecting {count}"
                )
            values = np.asarray(typed, dtype=dtype)
        feeds[tensor.name] = values.reshape(shape)
    known = [spec.name for spec in session.get_outputs()]
    wanted = [output.name for output in request.outputs]
    for output in wanted:
        if output not in known:
            raise InvalidArgument(f"{rid}unexpected inference output '{output}' for model '{name}'")
    names = wanted or known
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument as OrtInvalidArgument

    try:
        results = await asyncio.to_thread(session.run, names, feeds)
    except OrtInvalidArgument as err:
        raise InvalidArgument(f"{rid}onnx runtime error: {err}") from err
    response = pb.ModelInferResponse(model_name=name, model_version=str(record.version), id=request.id)
    for output, value in zip(names, results, strict=True):
        array = np.asarray(value)
        datatype = _OUTPUTS.get(f"{array.dtype.kind}{array.dtype.itemsize}")
        if datatype is None:
            raise Internal(f"output '{output}' holds {array.dtype} values, which the stand-in cannot send")
        response.outputs.add(name=output, datatype=datatype, shape=list(array.shape))
        response.raw_output_contents.append(array.astype(array.dtype.newbyteorder("<")).tobytes())
    return response


# ---------------------------------------------------------------------------------------------
# gRPC


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, repository: Repository) -> None:
        self._repository = repository

    @rpc
    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @rpc
    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    @rpc
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="triton", version="2.x-standin", extensions=EXTENSIONS)

    @rpc
    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self._repository.is_ready(request.name, request.version))

    @rpc
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        record = self._repository.ready_record(request.name, request.version)
        tensor = pb.ModelMetadataResponse.TensorMetadata

        def describe(specs: list[Any]) -> list[pb.ModelMetadataResponse.TensorMetadata]:
            return [
                tensor(
                    name=spec.name,
                    datatype=_ORT_TYPES.get(spec.type, spec.type),
                    shape=[d if isinstance(d, int) and d >= 0 else -1 for d in spec.shape],
                )
                for spec in specs
            ]

        return pb.ModelMetadataResponse(
            name=request.name,
            versions=[str(record.version)],
            platform=PLATFORM,
            inputs=describe(record.session.get_inputs()),
            outputs=describe(record.session.get_outputs()),
        )

    @rpc
    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        record = self._repository.ready_record(request.model_name, request.model_version)
        return await infer(request.model_name, record, request)


class RepositoryServicer:
    """Triton's repository RPCs; served through :func:`repository_handler`."""

    def __init__(self, repository: Repository) -> None:
        self._repository = repository

    @rpc
    async def RepositoryIndex(self, request: repo.RepositoryIndexRequest, context: Any) -> repo.RepositoryIndexResponse:
        _no_repository_name(request.repository_name)
        return repo.RepositoryIndexResponse(models=self._repository.index(request.ready))

    @rpc
    async def RepositoryModelLoad(
        self, request: repo.RepositoryModelLoadRequest, context: Any
    ) -> repo.RepositoryModelLoadResponse:
        _no_repository_name(request.repository_name)
        if request.parameters:
            raise Unimplemented(
                f"the Triton stand-in takes no load parameters (got {sorted(request.parameters)}): "
                "no config override, no model files in the request"
            )
        await self._repository.load(request.model_name)
        return repo.RepositoryModelLoadResponse()

    @rpc
    async def RepositoryModelUnload(
        self, request: repo.RepositoryModelUnloadRequest, context: Any
    ) -> repo.RepositoryModelUnloadResponse:
        _no_repository_name(request.repository_name)
        # "unload_dependents" needs no handling: the stand-in has no ensembles.
        self._repository.unload(request.model_name)
        return repo.RepositoryModelUnloadResponse()


def _no_repository_name(repository_name: str) -> None:
    if repository_name:
        raise Unimplemented("'repository_name' specification is not supported")


def repository_handler(servicer: RepositoryServicer) -> grpc.GenericRpcHandler:
    def unary(method: Any, request: Any, response: Any) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(
            method, request_deserializer=request.FromString, response_serializer=response.SerializeToString
        )

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "RepositoryIndex": unary(
                servicer.RepositoryIndex, repo.RepositoryIndexRequest, repo.RepositoryIndexResponse
            ),
            "RepositoryModelLoad": unary(
                servicer.RepositoryModelLoad, repo.RepositoryModelLoadRequest, repo.RepositoryModelLoadResponse
            ),
            "RepositoryModelUnload": unary(
                servicer.RepositoryModelUnload, repo.RepositoryModelUnloadRequest, repo.RepositoryModelUnloadResponse
            ),
        },
    )


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.support.triton_standin", description=__doc__.split("\n")[0])
    parser.add_argument("--repository", type=Path, required=True, help="the model repository directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="0 picks a free port")
    parser.add_argument("--load-delay-s", type=float, default=0.0, help="sleep this long in each load (state LOADING)")
    parser.add_argument(
        "--unknown-model-code",
        choices=("UNAVAILABLE", "NOT_FOUND"),
        default="UNAVAILABLE",
        help="status of 'Request for unknown model': UNAVAILABLE (Triton 20.x) or NOT_FOUND (current Triton)",
    )
    args = parser.parse_args(argv)
    if not args.repository.is_dir():
        parser.error(f"--repository {args.repository} is not a directory")
    configure_logging()
    repository = Repository(args.repository.resolve(), args.load_delay_s, args.unknown_model_code)
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(repository), server)
    server.add_generic_rpc_handlers((repository_handler(RepositoryServicer(repository)),))
    await serve(server, args.host, args.port)


if __name__ == "__main__":
    asyncio.run(main())
