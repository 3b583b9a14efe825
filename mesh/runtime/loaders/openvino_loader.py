"""OpenVINO IR models (``.xml`` and its ``.bin``), run by the OpenVINO runtime on the CPU.

An IR is two files side by side with the same stem, as ``openvino.save_model`` writes them: the
graph (``model.xml``) and its weights (``model.bin``). The model path names the ``.xml``, or a
directory holding exactly one (searched like every loader's, so OpenVINO Model Server's
``<model>/1/model.xml`` works). The ``.bin`` beside it is checked like the model file: it must be a
regular file and, with model roots, lie under them by its real path. The graph is read with
OpenVINO's IR front end only: ``Core.read_model`` also reads ONNX, TensorFlow and PaddlePaddle
files whatever their name (an ONNX file renamed ``model.xml`` loads through it), and this type
promises IR. The weights are read into memory rather than mapped: a model's files may be replaced
while a copy of it serves, and the copy must not depend on them.

Inputs and outputs are the model's, by tensor name (the first, when a tensor has several); a port
with no name, or whose tensor another port already names (one tensor returned twice), is
``input__<i>`` / ``output__<i>``. Requests are matched, checked and converted by the rules every
graph format shares (``mesh.runtime.loaders.graph_inputs``): one input need not be named when the
model takes one; FP64 becomes FP32; integers that fit become the declared integer type; BYTES
holding UTF-8 become strings; anything else is refused, naming both types. Element types V2 cannot
carry (bf16, f8, int4, ...) fail the load. Every output is returned when the request names none
(OpenVINO computes all of them anyway).

Compilation, for the CPU (``ram``; OpenVINO's ``GPU`` device is an Intel GPU, not the CUDA devices
the runtime manages, so ``gpu<N>`` is refused):

* ``EXECUTION_MODE_HINT=ACCURACY``. By default the CPU plugin runs f32 models in bf16 on CPUs that
  have it (AMX, AVX512_BF16): on such a machine the tests' models answered 1e-3 away from what they
  computed where they were made. A served model must answer what its source does.
* ``NUM_STREAMS=1``, ``INFERENCE_NUM_THREADS=1``: one core computes a prediction, as for onnx: the
  runtime's parallelism comes from running many requests at once, and a large request to one model
  does not take every core from the others. Each compiled model keeps its stream's threads, about
  two per model (measured: 10 models, +19 threads), idle between requests. ``NUM_STREAMS=0`` spares
  them but is undocumented, and with it the thread limit reads 0 (unbounded).
* ``ENABLE_CPU_PINNING=false``. With pinning, every model's one stream thread is pinned to the
  same first core: two models predicting at once used 1.0 core instead of 1.8 (2 cores, measured).

Predictions: a compiled model's one stream runs one request at a time, so each model holds one
infer request, created during the load (its buffers are part of what the load measures), behind a
lock. Requests to one model wait for each other; different models run in parallel. A prediction is
``start_async`` then ``wait``, not ``infer``: in OpenVINO 2026.4 a synchronous ``infer`` on a
one-thread stream (``INFERENCE_NUM_THREADS=1``, and any process that has one CPU) does not raise
when the inputs fail the model's shape inference (a [3, 4] added to a [2, 4]) but answers the
previous request's outputs, another client's answer, and later crashed the test process; the
asynchronous path raises (measured; it costs about 15 us more per call). The model's refusal is
InvalidArgument with OpenVINO's message.

Footprint: the bytes of the model's constants (its weights, at their stored precision: FP16-
compressed weights count 2 bytes each), read from the graph before it is compiled. The CPU plugin
also holds the compiled graph, repacked or widened weights, the request's buffers and its threads'
stacks; it does not say how much, and the runtime adds the process's RSS growth during the load to
the picture.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mesh.errors import InvalidArgument, ModelLoadError
from mesh.paths import shown
from mesh.runtime.loaders.base import LoadedModel, Loader, LoadPolicy, find_model_file, held, reason
from mesh.runtime.loaders.graph_inputs import Port, feeds

# OpenVINO element types that V2 can carry: their OpenVINO name -> (numpy dtype, V2 name).
_OV_TYPES: dict[str, tuple[np.dtype[Any], str]] = {
    name: (np.dtype(dtype), v2)
    for name, dtype, v2 in (
        ("boolean", "?", "BOOL"),
        ("u8", "u1", "UINT8"),
        ("u16", "u2", "UINT16"),
        ("u32", "u4", "UINT32"),
        ("u64", "u8", "UINT64"),
        ("i8", "i1", "INT8"),
        ("i16", "i2", "INT16"),
        ("i32", "i4", "INT32"),
        ("i64", "i8", "INT64"),
        ("f16", "f2", "FP16"),
        ("f32", "f4", "FP32"),
        ("f64", "f8", "FP64"),
        ("string", "O", "BYTES"),
    )
}
# The compile properties of the module docstring ("Compilation").
_CPU_CONFIG = {
    "EXECUTION_MODE_HINT": "ACCURACY",
    "NUM_STREAMS": 1,
    "INFERENCE_NUM_THREADS": 1,
    "ENABLE_CPU_PINNING": False,
}
# OpenVINO's messages name the C++ source lines that threw and the checks that failed; an operator
# needs the rest.
_SOURCE = re.compile(r"Exception from \S+:\d+:|Check '.*?' failed at \S+:\d+:")


def _ports(ports: Any, side: str) -> list[Port]:
    """The model's inputs or outputs, each under a name of its own: the first of its tensor names,
    else (no name, or the name of an earlier port: one tensor returned twice) ``<side>__<i>``."""
    found: list[Port] = []
    for index, port in enumerate(ports):
        names = sorted(port.get_names())
        taken = {p.name for p in found}
        name = names[0] if names and names[0] not in taken else f"{side}__{index}"
        found.append(_port(port, side, name))
    return found


def _port(output: Any, side: str, name: str) -> Port:
    """One model input or output: numpy dtype and shape (-1 for dynamic dims)."""
    element = output.get_element_type().get_type_name()
    known = _OV_TYPES.get(element)
    if known is None:
        raise ModelLoadError(f"openvino: {side} {name!r} has element type {element}, which V2 tensors cannot carry")
    shape = output.get_partial_shape()
    dims = () if shape.rank.is_dynamic else tuple(d.get_length() if d.is_static else -1 for d in shape)
    return Port(name, known[0], dims, known[1])


def _ov_reason(exc: BaseException) -> str:
    """OpenVINO's message without its C++ source locations, on one line."""
    lines = [line.strip() for line in _SOURCE.sub("", str(exc)).splitlines()]
    kept = [line for line in lines if line]
    return reason(RuntimeError("; ".join(kept))) if kept else reason(exc)


class OpenVinoModel(LoadedModel):
    platform = "openvino"

    def __init__(self, model_id: str, compiled: Any, inputs: list[Port], outputs: list[Port], footprint: int) -> None:
        super().__init__(
            model_id=model_id,
            type="openvino",
            device="ram",
            inputs=[p.spec() for p in inputs],
            outputs=[p.spec() for p in outputs],
        )
        self._in = inputs
        self._in_index = {p.name: i for i, p in enumerate(inputs)}
        self._out_index = {p.name: i for i, p in enumerate(outputs)}
        self._compiled: Any = compiled
        self._request: Any = compiled.create_infer_request()
        self._lock = threading.Lock()
        self._footprint = footprint

    def _predict(self, inputs: Mapping[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        request = held(self._request, self.model_id)
        given = {self._in_index[name]: _for_openvino(arr) for name, arr in feeds(inputs, self._in).items()}
        with self._lock:
            try:
                # start_async + wait, not infer (module docstring, "Predictions"). The inputs are
                # copied in (they are read-only views of the request's bytes), the outputs out (the
                # request is reused).
                request.start_async(given, share_inputs=False)
                request.wait()
            except RuntimeError as exc:
                raise InvalidArgument(f"openvino: the model refused the input: {_ov_reason(exc)}") from exc
            results = request.results
            return {name: np.array(results[self._out_index[name]], copy=True) for name in names}

    def footprint_bytes(self) -> int:
        return self._footprint

    def _release(self) -> None:
        self._request = None  # a prediction in flight holds its own reference and finishes
        self._compiled = None


def _for_openvino(arr: np.ndarray) -> np.ndarray:
    # OpenVINO fills string tensors from numpy str arrays only, not from arrays of Python objects.
    return arr.astype(np.str_) if arr.dtype.kind == "O" else arr


def constant_bytes(model: Any) -> int:
    """The bytes of an ``openvino.Model``'s constants: its weights, as stored."""
    return sum(op.get_byte_size() for op in model.get_ordered_ops() if op.get_type_name() == "Constant")


_core: Any = None
_core_lock = threading.Lock()


def _shared_core() -> Any:
    """The process's one ``openvino.Core``, created at the first load: OpenVINO recommends one per
    application, as each Core creates its own instances of the plugins. Loader threads compile on
    it at once (tests/integration/test_loaders.py tries six), once :func:`_first_use` has run."""
    global _core
    with _core_lock:
        if _core is None:
            import openvino

            core = openvino.Core()
            _first_use(openvino, core)
            _core = core
        return _core


def _first_use(openvino: Any, core: Any) -> None:
    """One load and prediction of a tiny model, in one thread, before any other.

    OpenVINO's Python binding initialises some of its state (numpy's C API among it) at its first
    use, under a lock of its own that it takes while holding the GIL in one thread and waits for
    the GIL under in another: two threads loading or predicting for the first time at once
    deadlocked the process (measured: about 1 run in 8 with six threads). This walks the same
    paths (compile with the loader's properties, numbers and strings in and out) while no other
    thread can, so that the first real loads and predictions find that state made.
    """
    from openvino import opset13 as ops

    numbers = ops.parameter([-1], openvino.Type.f32, name="numbers")
    text = ops.parameter([-1], openvino.Type.string, name="text")
    model = openvino.Model([ops.result(ops.convert(numbers, "i64")), ops.result(text)], [numbers, text], "first_use")
    request = core.compile_model(model, "CPU", _CPU_CONFIG).create_infer_request()
    request.start_async({0: np.ones(2, np.float32), 1: np.array(["a", "b"])}, share_inputs=False)
    request.wait()
    results = request.results
    for index in range(2):
        np.array(results[index], copy=True)


class OpenVinoLoader(Loader):
    type = "openvino"
    extensions = (".xml",)

    def _load(self, model_id: str, file: Path, key: Mapping[str, Any], device: str,
              policy: LoadPolicy) -> LoadedModel:
        from openvino.frontend import FrontEndManager

        weights = file.with_suffix(".bin")
        if not weights.exists():
            raise ModelLoadError(f"openvino: cannot load {file}: its weights file {shown(weights.name)} is missing "
                                 "(an IR is the .xml and the .bin of the same name beside it)")
        if weights.is_dir():  # find_model_file would look for a .bin inside it
            raise ModelLoadError(f"openvino: cannot load {file}: its weights {shown(str(weights))} are a directory, "
                                 "not a file")
        find_model_file(weights, (".bin",), self.type, policy.roots)  # a regular file, under the roots
        front_end = FrontEndManager().load_by_framework("ir")
        if not front_end.supported(str(file)):
            raise ModelLoadError(f"openvino: cannot load {file}: not an OpenVINO IR graph (an XML document whose "
                                 "root element is <net>)")
        try:
            model = front_end.convert(front_end.load(str(file), enable_mmap=False))
            inputs = _ports(model.inputs, "input")
            outputs = _ports(model.outputs, "output")
            if not outputs:
                raise ModelLoadError(f"openvino: cannot load {file}: the model has no outputs")
            footprint = constant_bytes(model)
            compiled = _shared_core().compile_model(model, "CPU", _CPU_CONFIG)
            return OpenVinoModel(model_id, compiled, inputs, outputs, footprint)
        except RuntimeError as exc:
            raise ModelLoadError(f"openvino: cannot load {file}: {_ov_reason(exc)}") from exc
