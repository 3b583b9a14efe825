"""``mesh model metadata`` and the inputs of ``mesh infer``, named and typed by the model's metadata.

``mesh model metadata M`` asks the router for the model's V2 ModelMetadata (loading the model if
no copy is loaded, as an inference would): its platform, and each input and output with its
datatype and shape (-1: any size).

``mesh infer`` asks for the same metadata once before its request, unless nothing is left to
take from it (every input named and ``--datatype`` given) or it targets a graph (a graph has no
metadata of its own). Then each input given without a name takes the name of the model's input
at its position, and each input given without ``--datatype`` takes the datatype the model declares
for it: a TorchScript model declaring FP32 gets FP32, where the JSON's numbers alone would have
made FP64 (which it refuses). What the user says still wins: ``NAME=JSON`` names an input,
``--datatype`` types them all. A model that declares no inputs (or a server without ModelMetadata:
UNIMPLEMENTED) keeps the old defaults: ``input-<i>``, and INT64 or FP64 from the JSON. So does a
metadata call that fails for another reason (the model is not registered, its load failed, the
name is a graph's): the inference is sent as before and reports its own error; only an unreachable
router or a spent deadline stops the command there. The model is named as the inference names it
(``model_name``, or ``mm-vmodel-id`` with ``--vmodel``). The cost is one more round trip per
``mesh infer``, which a command line can afford; the metadata call loads the model if needed, so
the inference that follows finds it loaded (a hit, in the runtimes' counters).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np
from google.protobuf.json_format import MessageToDict

from mesh.cli.client import CliError, RouterClient, parse_input
from mesh.cli.errors import printable
from mesh.errors import InvalidArgument
from mesh.gen.inference import grpc_service_pb2 as pb


def model_metadata(client: RouterClient, model: str, *, vmodel: bool) -> pb.ModelMetadataResponse:
    # Named as `mesh infer` names it: by name (the router resolves a vModel, else a model), or with
    # mm-vmodel-id for --vmodel.
    header = (("mm-vmodel-id", model),) if vmodel else ()
    response: pb.ModelMetadataResponse = client.call(client.infer_stub.ModelMetadata,
                                                     pb.ModelMetadataRequest(name=model), metadata=header)
    return response


def _shape(dims: Any) -> str:
    return "[" + ", ".join(str(d) for d in dims) + "]"


def metadata_text(m: pb.ModelMetadataResponse, model: str) -> str:
    lines = [f"{model}: platform {m.platform or '-'}" + (f", versions {', '.join(m.versions)}" if m.versions else "")]
    for title, tensors in (("inputs", m.inputs), ("outputs", m.outputs)):
        if not tensors:
            lines.append(f"{title}: none declared")
            continue
        width = max(4, *(len(t.name) for t in tensors))
        lines.append(f"{title}:")
        lines += [f"  {t.name:<{width}}  {t.datatype:<6} {_shape(t.shape)}" for t in tensors]
    return "\n".join(lines)


def metadata_command(args: argparse.Namespace, client: RouterClient) -> int:
    meta = model_metadata(client, args.model_id, vmodel=args.vmodel)
    if args.json:
        print(json.dumps(MessageToDict(meta, always_print_fields_with_no_presence=True), indent=2, sort_keys=True))
    else:
        print(printable(metadata_text(meta, args.model_id)))
    return 0


def _split(text: str) -> tuple[str | None, str]:
    """``NAME=JSON`` -> (NAME, JSON); a bare JSON value -> (None, JSON)."""
    name, sep, rest = text.partition("=")
    if sep and not name.lstrip().startswith(("[", "{", '"')) and name.strip():
        return name.strip(), rest
    return None, text


def infer_inputs(args: argparse.Namespace, client: RouterClient) -> dict[str, np.ndarray]:
    """The request's inputs from ``--input`` options, named and typed as the module docstring says."""
    given = [_split(text) for text in args.input]
    # Read every input first: a malformed one is reported before any call (which might load the model).
    try:
        parsed = [parse_input(text, args.datatype) for _, text in given]
    except (ValueError, TypeError) as exc:  # numbers that do not fit --datatype
        raise InvalidArgument(f"--input cannot be sent as {args.datatype}: {str(exc)[:200]}") from None
    declared: list[pb.ModelMetadataResponse.TensorMetadata] = []
    needs = any(name is None for name, _ in given) or not args.datatype
    if needs and not getattr(args, "graph", False):
        try:
            declared = list(model_metadata(client, args.model, vmodel=args.vmodel).inputs)
        except CliError as exc:
            # No router, or no time left: the inference would meet the same. Any other answer
            # (no such model, a graph's name, a load that failed, no ModelMetadata): the request
            # goes as it would have without metadata, and its own error, if any, is reported.
            if exc.exit_code == 2 or str(exc).startswith("DEADLINE_EXCEEDED"):
                raise
    types = {t.name: t.datatype for t in declared}
    inputs: dict[str, np.ndarray] = {}
    for i, (name, text) in enumerate(given):
        if name is None:
            name = declared[i].name if i < len(declared) else f"input-{i}"
        datatype = None if args.datatype else types.get(name)
        if datatype is None:
            inputs[name] = parsed[i]
            continue
        try:
            inputs[name] = parse_input(text, datatype)
        except (ValueError, TypeError) as exc:  # numbers that do not fit the declared datatype
            raise InvalidArgument(f"--input {name}: cannot be sent as {datatype} (the model's declared datatype; "
                                  f"choose another with --datatype): {str(exc)[:200]}") from None
    return inputs


__all__ = ["infer_inputs", "metadata_command", "metadata_text", "model_metadata"]
