"""TorchScript models (``.pt`` / ``.pth``): a module saved with ``torch.jit.save`` (scripted or traced).

Conventions follow Triton's PyTorch backend, which V2 clients of TorchScript models already know:

* **Inputs are positional.** The request's inputs are passed to ``forward`` in request order; their
  names are free. The count must lie between ``forward``'s required Tensor arguments and all of
  its Tensor arguments. Metadata names the inputs after ``forward``'s arguments with datatype FP32
  and shape [-1]: TorchScript declares neither element types nor ranks, FP32 is the common case,
  and any numeric datatype is accepted (the module decides what it can take).
* **Outputs are ``output__0``, ``output__1``, ...** in the order ``forward`` returns them: a Tensor
  gives ``output__0``, a tuple of Tensors one output per element. Other return types (lists,
  dicts) have no fixed output names, and such a module fails to load with that reason.

Inputs are read-only views of the request (see ``mesh.tensors``); they are copied before
``torch.from_numpy`` because a module may write into its input, which must not reach the request.
A ``RuntimeError`` from ``forward`` (a shape or dtype mismatch: the module checks its own inputs)
becomes InvalidArgument with torch's message; CUDA out-of-memory becomes RESOURCE_EXHAUSTED.
BF16 outputs are widened to FP32, which V2 can carry and numpy can hold.

Device: ``ram`` loads with ``map_location="cpu"``; ``gpu<N>`` with ``cuda:N``, failing the load
when CUDA or that device is missing. Predictions run under ``torch.inference_mode()``.

Threads: torch's intra-op thread count is process-wide; setting it (``torch.set_num_threads``) is
the runtime's decision, not a loader's, so nothing here touches it. Calling one scripted module from
several threads is safe for inference, so no lock.

Footprint: the bytes of the module's parameters and buffers (each tensor counted once).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mesh.errors import InvalidArgument, MeshError, ModelLoadError, ResourceExhausted
from mesh.runtime.loaders.base import LoadedModel, Loader, LoadPolicy, gpu_index, held, reason
from mesh.tensors import TensorSpec


class TorchScriptModel(LoadedModel):
    platform = "pytorch_libtorch"

    def __init__(self, model_id: str, module: Any, device: str, torch_device: str, torch: Any) -> None:
        schema = module.forward.schema
        args = list(schema.arguments[1:])  # [0] is self
        tensor_args = []
        for a in args:
            if not isinstance(a.type, torch.TensorType):
                if not a.has_default_value():
                    raise ModelLoadError(
                        f"torchscript: forward's argument {a.name!r} is a {a.type}, not a Tensor; "
                        f"V2 requests can only pass Tensors"
                    )
                break  # later arguments can only be reached by keyword; V2 inputs are positional
            tensor_args.append(a)
        self._max_inputs = len(tensor_args)
        self._min_inputs = sum(1 for a in tensor_args if not a.has_default_value())
        n_outputs = _output_count(schema, torch)
        super().__init__(
            model_id=model_id,
            type="torchscript",
            device=device,
            inputs=[TensorSpec(a.name, "FP32", (-1,)) for a in tensor_args],
            outputs=[TensorSpec(f"output__{i}", "FP32", (-1,)) for i in range(n_outputs)],
        )
        self._module: Any = module
        self._torch = torch
        self._torch_device = torch_device
        seen: set[int] = set()
        total = 0
        for t in [*module.parameters(), *module.buffers()]:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        self._footprint = total

    def _predict(self, inputs: Mapping[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        module = held(self._module, self.model_id)
        torch = self._torch
        if not self._min_inputs <= len(inputs) <= self._max_inputs:
            wanted = ", ".join(s.name for s in self.inputs)
            raise InvalidArgument(
                f"torchscript: forward({wanted}) takes {self._min_inputs} to {self._max_inputs} "
                f"inputs in order, the request has {len(inputs)}"
            )
        tensors = []
        for name, arr in inputs.items():
            if arr.dtype.kind not in "biuf":
                raise InvalidArgument(f"input {name!r}: torchscript models take numbers, not {arr.dtype}")
            # A copy: the request's arrays are read-only, and the module may write into its input.
            t = torch.from_numpy(np.array(arr, copy=True))
            tensors.append(t.to(self._torch_device) if self._torch_device != "cpu" else t)
        try:
            with torch.inference_mode():
                result = module(*tensors)
        except torch.cuda.OutOfMemoryError as exc:
            raise ResourceExhausted(
                f"torchscript: out of GPU memory on {self.device}: {reason(exc)}"
            ) from exc
        except RuntimeError as exc:
            raise InvalidArgument(f"torchscript: forward failed: {reason(exc)}") from exc
        values = list(result) if isinstance(result, tuple) else [result]
        if len(values) != len(self.outputs):
            raise MeshError(
                f"torchscript: forward returned {len(values)} values, its schema declares {len(self.outputs)}"
            )
        out: dict[str, np.ndarray] = {}
        for i, value in enumerate(values):
            if not isinstance(value, torch.Tensor):
                raise MeshError(f"torchscript: output__{i} is a {type(value).__name__}, not a Tensor")
            value = value.detach()
            if value.dtype == torch.bfloat16:
                value = value.float()  # numpy has no bfloat16; widening is exact
            out[f"output__{i}"] = value.cpu().numpy()
        return out

    def footprint_bytes(self) -> int:
        return self._footprint

    def _release(self) -> None:
        self._module = None
        if self._torch_device != "cpu":
            self._torch.cuda.empty_cache()  # hand the cached blocks back so that NVML sees them free


def _output_count(schema: Any, torch: Any) -> int:
    returns = schema.returns
    if len(returns) == 1:
        t = returns[0].type
        if isinstance(t, torch.TensorType):
            return 1
        if isinstance(t, torch.TupleType) and all(isinstance(e, torch.TensorType) for e in t.elements()):
            return len(t.elements())
    kinds = ", ".join(str(r.type) for r in returns)
    raise ModelLoadError(
        f"torchscript: forward returns {kinds}; only a Tensor or a tuple of Tensors can be served "
        f"(as output__0, output__1, ...)"
    )


class TorchScriptLoader(Loader):
    type = "torchscript"
    extensions = (".pt", ".pth")
    supports_gpu = True
    code_extensions = (".pt", ".pth")  # a TorchScript graph can read files (torch.from_file)
    safe_format_hint = "; export the model to ONNX instead"

    def _load(self, model_id: str, file: Path, key: Mapping[str, Any], device: str,
              policy: LoadPolicy) -> LoadedModel:
        import torch

        index = gpu_index(device)
        torch_device = "cpu"
        if index is not None:
            if not torch.cuda.is_available() or index >= torch.cuda.device_count():
                raise ModelLoadError(
                    f"torchscript: {device} requested but torch sees "
                    f"{torch.cuda.device_count()} CUDA device(s)"
                )
            torch_device = f"cuda:{index}"
        module: Any = torch.jit.load(str(file), map_location=torch_device)  # type: ignore[no-untyped-call]
        module.eval()
        return TorchScriptModel(model_id, module, device, torch_device, torch)
