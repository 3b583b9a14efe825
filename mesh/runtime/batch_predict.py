"""One prediction for several requests: merge along the first dimension, predict once, split back.

Runs on an inference thread (``mesh.runtime.batching`` hands it the requests of one batch, which
share a signature: input names, datatypes and shapes past the first dimension, requested outputs
and parameters). Each request is decoded on its own, so a malformed one gets its own
INVALID_ARGUMENT and leaves the batch. The others' inputs are concatenated along dimension 0 and
predicted in one call; every output must then have the merged row count as its first dimension,
and is split back by each request's rows. Each answer is encoded with its own request's name, id
and raw-or-typed form, as :func:`mesh.tensors.infer_bytes` does for one request.

Errors stay per request: when the merged prediction raises INVALID_ARGUMENT (one request's
contents the model refuses, such as a wrong feature count) or its outputs cannot be split (a model
that does not keep rows apart), every request of the batch is predicted alone, so each gets the
answer or the error it would have had without batching. Any other error (the model failed, the copy
was unloaded: NOT_HERE, which the router retries elsewhere) is every request's answer, as it would
have been for each of them alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mesh.errors import InvalidArgument
from mesh.gen.inference import grpc_service_pb2 as pb
from mesh.tensors import decode_inputs, encode_response, infer_bytes, requested_outputs

Outcome = bytes | BaseException


def predict_batch(model: Any, model_id: str, requests: Sequence[pb.ModelInferRequest],
                  bodies: Sequence[bytes]) -> list[Outcome]:
    """Each request's serialized response, or the exception that is its answer (module docstring);
    ``bodies`` are the requests as they arrived (a request predicted alone is decoded from them)."""
    outcomes: list[Outcome | None] = [None] * len(requests)
    decoded: list[tuple[int, dict[str, np.ndarray]]] = []
    for i, request in enumerate(requests):
        try:
            decoded.append((i, decode_inputs(request)))
        except InvalidArgument as exc:
            outcomes[i] = exc
    if len(decoded) == 1:
        i = decoded[0][0]
        outcomes[i] = _alone(model, model_id, bodies[i])
    elif decoded:
        _merged(model, model_id, requests, bodies, decoded, outcomes)
    return [o if o is not None else InvalidArgument("request left unanswered") for o in outcomes]


def _merged(model: Any, model_id: str, requests: Sequence[pb.ModelInferRequest], bodies: Sequence[bytes],
            decoded: list[tuple[int, dict[str, np.ndarray]]], outcomes: list[Outcome | None]) -> None:
    names = list(decoded[0][1])
    rows = [len(next(iter(inputs.values()))) for _, inputs in decoded]
    merged = {name: np.concatenate([inputs[name] for _, inputs in decoded]) for name in names}
    first = requests[decoded[0][0]]
    try:
        outputs = model.predict(merged, requested_outputs(first))
    except InvalidArgument:
        outputs = None  # some request's contents were refused: find out whose, one by one
    except Exception as exc:
        for i, _ in decoded:
            outcomes[i] = exc
        return
    parts = split_rows(outputs, rows) if outputs is not None else None
    if parts is None:
        for i, _ in decoded:
            outcomes[i] = _alone(model, model_id, bodies[i])
        return
    for (i, _), part in zip(decoded, parts, strict=True):
        outcomes[i] = _encoded(model_id, requests[i], part)


def split_rows(outputs: Mapping[str, np.ndarray], rows: Sequence[int]) -> list[dict[str, np.ndarray]] | None:
    """``outputs`` cut along dimension 0 into pieces of ``rows``; None when some output does not have
    ``sum(rows)`` rows (it cannot be told apart per request)."""
    total = sum(rows)
    arrays = {name: np.asarray(value) for name, value in outputs.items()}
    if any(a.ndim == 0 or a.shape[0] != total for a in arrays.values()):
        return None
    cuts = np.cumsum(rows)[:-1]
    pieces = {name: np.split(a, cuts) for name, a in arrays.items()}
    return [{name: pieces[name][k] for name in arrays} for k in range(len(rows))]


def _alone(model: Any, model_id: str, body: bytes) -> Outcome:
    try:
        return infer_bytes(model, model_id, body)
    except Exception as exc:
        return exc


def _encoded(model_id: str, request: pb.ModelInferRequest, outputs: Mapping[str, np.ndarray]) -> Outcome:
    try:
        response = encode_response(model_name=request.model_name or model_id, model_version="1",
                                   request_id=request.id, outputs=outputs, raw=len(request.raw_input_contents) > 0)
    except Exception as exc:  # an output with no V2 datatype: the model's fault, INTERNAL, as unbatched
        return exc
    data: bytes = response.SerializeToString()
    return data


__all__ = ["Outcome", "predict_batch", "split_rows"]
