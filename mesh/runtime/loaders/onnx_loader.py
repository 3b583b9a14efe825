"""ONNX models (``.onnx``), run by onnxruntime.

Inputs are matched **by name** with the session's inputs, checked against their rank and fixed
dimensions, and converted to the element type the model declares when that is safe or plainly
intended, by the rules every graph format shares (``mesh.runtime.loaders.graph_inputs``): one input
need not be named when the model takes one; FP64 becomes FP32; integers that fit become the
declared integer type; BYTES holding UTF-8 become strings; anything else is refused with a message
naming both types.

Outputs: every tensor output of the session under its own name (skl2onnx classifiers give
``label`` and ``probabilities``); all of them are returned when the request names none. Non-tensor
outputs (skl2onnx's ZipMap, a sequence of maps) have no V2 form, so such a model fails to load with
a hint to convert it with ``options={"zipmap": False}``.

Device: ``ram`` uses the CPUExecutionProvider; ``gpu<N>`` uses the CUDAExecutionProvider on device N
and fails the load when onnxruntime cannot provide it, rather than silently running on the CPU
while the runtime accounts the model to GPU memory. The CUDA libraries onnxruntime-gpu needs
(cuBLAS, cuDNN...) are found the way its own ``preload_dlls`` finds them: in the ``nvidia-*`` wheels
of the environment, or already loaded by torch. On a GPU the session's memory arena grows by what
is requested (``kSameAsRequested``), not by powers of two: the runtime measures each session's
growth on the device as the model's size, and a doubling arena would charge a model up to twice its
weights. A GPU copy is warmed up with one prediction on zeros (``warm_up``: when every input is
numeric; symbolic dimensions set to 1) on the thread that will run its predictions: onnxruntime
creates a cuBLAS/cuDNN context per session *and thread* at the first run, and the arena keeps the
first activations, so this memory is part of what the load measured rather than appearing later as
memory of no model; a model that refuses zeros loads anyway.

Threads: each session gets ``intra_op_num_threads=1`` and ``inter_op_num_threads=1``. onnxruntime
gives every session its own thread pools, sized to the machine by default; with hundreds of models
per runtime that is thousands of threads, and the runtime already runs many requests at once. Large
batches on one model lose some speed; multi-model serving sees mostly small ones.

Thread safety: ``InferenceSession.run`` is thread-safe (onnxruntime documents it), so no lock.

Footprint: the bytes of the model's weights, read with the ``onnx`` package: its initializers
(element count x element size; sparse ones and subgraphs included) plus the tensors and number
lists in node attributes, where the ``ai.onnx.ml`` operators of converted scikit-learn models keep
their coefficients and trees. The file size when ``onnx`` is not installed or cannot parse the
file, or when the model declares no weights at all. onnxruntime itself does not expose
what it allocated; the runtime adds the process's RSS growth during the load to the picture.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mesh.errors import InvalidArgument, ModelLoadError
from mesh.runtime.loaders.base import LoadedModel, Loader, LoadPolicy, file_size, gpu_index, held, reason
from mesh.runtime.loaders.graph_inputs import Port, feeds

# ONNX element types that V2 can carry, as onnxruntime names them.
_ONNX_TYPES: dict[str, np.dtype[Any]] = {
    f"tensor({name})": np.dtype(dtype)
    for name, dtype in (
        ("bool", "?"),
        ("uint8", "u1"),
        ("uint16", "u2"),
        ("uint32", "u4"),
        ("uint64", "u8"),
        ("int8", "i1"),
        ("int16", "i2"),
        ("int32", "i4"),
        ("int64", "i8"),
        ("float16", "f2"),
        ("float", "f4"),
        ("double", "f8"),
        ("string", "O"),
    )
}


def _port(arg: Any, side: str) -> Port:
    """One session input or output: name, numpy dtype, shape with -1 for symbolic dims."""
    dtype = _ONNX_TYPES.get(arg.type)
    if dtype is None:
        hint = (
            "; convert the model with the option zipmap=False"
            if side == "output" and not arg.type.startswith("tensor(")
            else ""
        )
        raise ModelLoadError(f"onnx: {side} {arg.name!r} has type {arg.type}, which V2 tensors cannot carry{hint}")
    dims = arg.shape if isinstance(arg.shape, list) else []
    return Port(arg.name, dtype, tuple(d if isinstance(d, int) and d >= 0 else -1 for d in dims), arg.type)


class OnnxModel(LoadedModel):
    platform = "onnxruntime_onnx"

    def __init__(
        self, model_id: str, session: Any, device: str, footprint: int, ort_invalid: type[Exception]
    ) -> None:
        self._in = [_port(a, "input") for a in session.get_inputs()]
        self._out = [_port(a, "output") for a in session.get_outputs()]
        super().__init__(
            model_id=model_id,
            type="onnx",
            device=device,
            inputs=[p.spec() for p in self._in],
            outputs=[p.spec() for p in self._out],
        )
        self._session: Any = session
        self._footprint = footprint
        self._ort_invalid = ort_invalid

    def _predict(self, inputs: Mapping[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        session = held(self._session, self.model_id)
        try:
            results = session.run(names, feeds(inputs, self._in))
        except self._ort_invalid as exc:
            raise InvalidArgument(f"onnx: the model refused the input: {reason(exc)}") from exc
        return dict(zip(names, results, strict=True))

    def footprint_bytes(self) -> int:
        return self._footprint

    def warm_up(self) -> None:
        if self.device != "ram" and self._session is not None:
            _warm_up(self._session)

    def _release(self) -> None:
        self._session = None


def weight_bytes(file: Path) -> int:
    """The bytes of the model's weights, or the file size when the ``onnx`` package cannot tell.

    Weights are the initializers (neural networks) and the tensors and number lists held in node
    attributes: the ``ai.onnx.ml`` operators that skl2onnx emits (TreeEnsemble, LinearClassifier,
    Scaler) keep their whole model there.
    """
    try:
        import onnx
        from onnx import helper

        model = onnx.load(str(file), load_external_data=False)
    except Exception:  # no onnx package, or a file only onnxruntime understands
        return file_size(file)

    def tensor_bytes(t: Any) -> int:
        if t.data_type == onnx.TensorProto.STRING:
            return sum(len(s) for s in t.string_data)
        try:
            itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        except Exception:  # element types numpy lacks (bfloat16, float8): count their raw bytes
            return len(t.raw_data)
        return int(math.prod(t.dims)) * itemsize

    total = 0
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        total += sum(tensor_bytes(t) for t in graph.initializer)
        total += sum(tensor_bytes(s.values) for s in graph.sparse_initializer)
        for node in graph.node:
            for attr in node.attribute:
                # Floats are held as float32 and ints as int64 by the operators that read them.
                total += 4 * len(attr.floats) + 8 * len(attr.ints) + sum(len(s) for s in attr.strings)
                if attr.HasField("t"):
                    total += tensor_bytes(attr.t)
                total += sum(tensor_bytes(t) for t in attr.tensors)
                if attr.HasField("g"):
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)
    return total or file_size(file)


_cuda_preloaded = False


def cuda_provider_available() -> bool:
    """Whether this onnxruntime can run sessions on CUDA (onnxruntime-gpu with its libraries)."""
    import onnxruntime as ort

    _preload_cuda(ort)
    return "CUDAExecutionProvider" in ort.get_available_providers()


def _preload_cuda(ort: Any) -> None:
    global _cuda_preloaded
    if _cuda_preloaded or not hasattr(ort, "preload_dlls"):
        return
    _cuda_preloaded = True
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return  # a CPU build: nothing to preload (and preload_dlls would print a warning)
    try:
        ort.preload_dlls()  # CUDA and cuDNN from the nvidia-* wheels, when they are installed
    except Exception:  # nothing to preload (CPU build) or not found: the session says what is missing
        pass


def _warm_up(session: Any) -> None:
    """One prediction on zeros (module docstring, "Device"); skipped for non-numeric inputs."""
    feeds: dict[str, np.ndarray] = {}
    for arg in session.get_inputs():
        dtype = _ONNX_TYPES.get(arg.type)
        if dtype is None or dtype.kind == "O":
            return
        dims = arg.shape if isinstance(arg.shape, list) else []
        feeds[arg.name] = np.zeros([d if isinstance(d, int) and d > 0 else 1 for d in dims], dtype=dtype)
    try:
        session.run(None, feeds)
    except Exception:
        pass  # the model's own checks refused zeros: its workspaces are created by its first request


class OnnxLoader(Loader):
    type = "onnx"
    extensions = (".onnx",)
    supports_gpu = True

    def _load(self, model_id: str, file: Path, key: Mapping[str, Any], device: str,
              policy: LoadPolicy) -> LoadedModel:
        import onnxruntime as ort
        from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument as OrtInvalidArgument

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # see the module docstring
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: warnings per model flood a busy runtime's log
        index = gpu_index(device)
        providers: list[Any] = ["CPUExecutionProvider"]
        if index is not None:
            _preload_cuda(ort)
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ModelLoadError(
                    f"onnx: {device} requested but this onnxruntime has no CUDAExecutionProvider "
                    f"(available: {', '.join(ort.get_available_providers())})"
                )
            providers = [("CUDAExecutionProvider", {"device_id": index, "arena_extend_strategy": "kSameAsRequested"}),
                         "CPUExecutionProvider"]
        session = ort.InferenceSession(str(file), sess_options=options, providers=providers)
        if index is not None and "CUDAExecutionProvider" not in session.get_providers():
            # onnxruntime falls back to the CPU when CUDA fails to initialise; say so instead.
            raise ModelLoadError(f"onnx: CUDAExecutionProvider failed to start on {device}")
        return OnnxModel(model_id, session, device, weight_bytes(file), OrtInvalidArgument)
