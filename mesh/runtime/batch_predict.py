"""One prediction for several requests: merge along the first dimension, predict once, split back.

``mesh.runtime.batching`` hands over the requests of one batch, which share a signature (input
names, datatypes and shapes past the first dimension, requested outputs and parameters). Each
request is decoded on its own, so a malformed one gets its own INVALID_ARGUMENT and leaves the
batch. The others' inputs are concatenated along dimension 0 and predicted in one call; every
output must then have the merged row count as its first dimension, and is split back by each
request's rows. Each answer is encoded with its own request's name, id and raw-or-typed form, as
:func:`mesh.tensors.infer_bytes` does for one request.

Two ways to predict the merged inputs, one result (:class:`Merged`):

- :func:`predict_merged`, a copy in this process: on an inference thread, ``model.predict``.
- :func:`merge_request` and :func:`split_answer`, a copy in a model worker (or any
  ``ForwardingModel``): the merged inputs travel as one raw ``ModelInferRequest`` (the worker
  decodes, predicts and encodes as for any request) and its answer is cut back per request. Both
  run on the event loop: a batch is bounded in bytes (``batching.MAX_BATCH_BYTES``), so merging
  costs less than the thread hand-off it would take to move it off the loop.

Errors stay per request. When the merged prediction fails, whatever the error (a request's
contents the model refuses, a model that raises on some rows, an answer over the message limit),
or its outputs cannot be split (a model that does not keep rows apart), no request gets that
error: each is marked to be answered alone (``None`` in ``outcomes``), and the batcher sends each
the unbatched way, concurrently, so each gets the answer or the error it would have had without
batching. The cost of a failed batch is bounded by one merged prediction on top of the unbatched
cost, and the batcher stops batching a copy whose merges fail while its requests alone do not
(``batching.Batcher``). The one error that is every request's answer is NOT_HERE (the copy was
unloaded or its worker lost: the router retries elsewhere), plus DEADLINE_EXCEEDED from a worker's
prediction timeout (the worker was ended; re-running a hanging model per request would only hang
again).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError

from mesh.errors import DeadlineExceeded, InvalidArgument, NotHere
from mesh.gen.inference import grpc_service_pb2 as pb
from mesh.tensors import decode_inputs, decode_response, encode_request, encode_response, requested_outputs

Outcome = bytes | BaseException
# Fault of a merged prediction (``Merged.fault``): it raised, or its outputs could not be split.
FAILED, ROWS = "failed", "rows"


@dataclass
class Merged:
    """A batch's result: per request its serialized answer, the exception that is its answer, or
    None (answer it alone, unbatched); ``fault`` says why requests were left to answer alone."""

    outcomes: list[Outcome | None]
    fault: str | None = None


def decode_all(requests: Sequence[pb.ModelInferRequest]) -> tuple[list[Outcome | None],
                                                                  list[tuple[int, dict[str, np.ndarray]]]]:
    """Each request's inputs, decoded on its own; a malformed one gets its own INVALID_ARGUMENT."""
    outcomes: list[Outcome | None] = [None] * len(requests)
    decoded: list[tuple[int, dict[str, np.ndarray]]] = []
    for i, request in enumerate(requests):
        try:
            decoded.append((i, decode_inputs(request)))
        except InvalidArgument as exc:
            outcomes[i] = exc
    return outcomes, decoded


def _concatenated(decoded: list[tuple[int, dict[str, np.ndarray]]]) -> tuple[dict[str, np.ndarray], list[int]]:
    names = list(decoded[0][1])
    rows = [len(next(iter(inputs.values()))) for _, inputs in decoded]
    return {name: np.concatenate([inputs[name] for _, inputs in decoded]) for name in names}, rows


def predict_merged(model: Any, model_id: str, requests: Sequence[pb.ModelInferRequest]) -> Merged:
    """The batch predicted in this process (module docstring); on an inference thread."""
    outcomes, decoded = decode_all(requests)
    if len(decoded) <= 1:
        return Merged(outcomes)  # nothing to merge: the one left goes alone, as unbatched
    merged, rows = _concatenated(decoded)
    try:
        outputs = model.predict(merged, requested_outputs(requests[decoded[0][0]]))
    except NotHere as exc:
        return Merged([exc if o is None else o for o in outcomes])
    except Exception:
        return Merged(outcomes, FAILED)
    return _answers(model_id, requests, decoded, rows, outputs, outcomes)


def merge_request(model_id: str, requests: Sequence[pb.ModelInferRequest]
                  ) -> tuple[bytes | None, list[Outcome | None], list[tuple[int, dict[str, np.ndarray]]], list[int]]:
    """The batch as one raw ``ModelInferRequest`` for a forwarded copy (None: fewer than two
    requests decoded, nothing to merge), with each request's own outcome so far, the decoded
    requests and their rows. The first request's parameters and requested outputs stand for all
    (the signature makes them equal)."""
    outcomes, decoded = decode_all(requests)
    if len(decoded) <= 1:
        return None, outcomes, decoded, []
    merged, rows = _concatenated(decoded)
    first = requests[decoded[0][0]]
    try:
        request = encode_request(model_name=model_id, inputs=merged, raw=True)
    except InvalidArgument:
        return None, [None] * len(requests), decoded, rows  # a datatype with no raw form: each alone
    for tensor, source in zip(request.inputs, first.inputs, strict=True):
        tensor.parameters.MergeFrom(source.parameters)
    request.outputs.extend(first.outputs)
    request.parameters.MergeFrom(first.parameters)
    data: bytes = request.SerializeToString()
    return data, outcomes, decoded, rows


def split_answer(model_id: str, requests: Sequence[pb.ModelInferRequest], answer: bytes | BaseException,
                 outcomes: list[Outcome | None], decoded: list[tuple[int, dict[str, np.ndarray]]],
                 rows: list[int]) -> Merged:
    """A forwarded merged request's answer (or error) cut back per request (module docstring)."""
    if isinstance(answer, NotHere | DeadlineExceeded):
        return Merged([answer if o is None else o for o in outcomes])
    if isinstance(answer, BaseException):
        return Merged(outcomes, FAILED)
    try:
        outputs = decode_response(pb.ModelInferResponse.FromString(answer))
    except (DecodeError, RuntimeError, ValueError, InvalidArgument):
        return Merged(outcomes, FAILED)  # not an answer the codec reads: the worker's fault, each alone
    return _answers(model_id, requests, decoded, rows, outputs, outcomes)


def _answers(model_id: str, requests: Sequence[pb.ModelInferRequest], decoded: list[tuple[int, dict[str, np.ndarray]]],
             rows: list[int], outputs: Mapping[str, np.ndarray], outcomes: list[Outcome | None]) -> Merged:
    parts = split_rows(outputs, rows)
    if parts is None:
        return Merged(outcomes, ROWS)
    for (i, _), part in zip(decoded, parts, strict=True):
        outcomes[i] = _encoded(model_id, requests[i], part)
    return Merged(outcomes)


def split_rows(outputs: Mapping[str, np.ndarray], rows: Sequence[int]) -> list[dict[str, np.ndarray]] | None:
    """``outputs`` cut along dimension 0 into pieces of ``rows``; None when some output does not have
    ``sum(rows)`` rows (it cannot be told apart per request). The pieces are views, no copies."""
    total = sum(rows)
    arrays = {name: np.asarray(value) for name, value in outputs.items()}
    if any(a.ndim == 0 or a.shape[0] != total for a in arrays.values()):
        return None
    parts: list[dict[str, np.ndarray]] = []
    start = 0
    for n in rows:
        parts.append({name: a[start:start + n] for name, a in arrays.items()})
        start += n
    return parts


def _encoded(model_id: str, request: pb.ModelInferRequest, outputs: Mapping[str, np.ndarray]) -> Outcome:
    try:
        response = encode_response(model_name=request.model_name or model_id, model_version="1",
                                   request_id=request.id, outputs=outputs, raw=len(request.raw_input_contents) > 0)
    except Exception as exc:  # an output with no V2 datatype: the model's fault, INTERNAL, as unbatched
        return exc
    data: bytes = response.SerializeToString()
    return data


__all__ = ["FAILED", "ROWS", "Merged", "Outcome", "decode_all", "merge_request", "predict_merged", "split_answer",
           "split_rows"]
