"""Dynamic batching: requests for one loaded copy, merged into one prediction (issue 17).

A :class:`Batcher` per copy (``RuntimeService`` keeps one per loaded entry) queues the requests
that can be merged: same input names, datatypes and shapes except the first dimension, same
requested outputs, same parameters (:func:`signature`). Requests of one signature form an open
batch, which is flushed when its rows reach ``max_size``, its bodies ``MAX_BATCH_BYTES``, or
``max_wait_ms`` after its first request, whichever comes first; several signatures have several
open batches, so a request incompatible with one never waits behind it. A flushed batch of two or
more is predicted once (``mesh.runtime.batch_predict``: merge, predict, split back); a batch of
one goes the unbatched way, exactly as without batching.

Where the copy runs. In this process, the merged prediction runs on an inference thread. In a
model worker (``runtime.workers``), the runtime merges the batch into one raw request on the event
loop, forwards it as one (one round trip to the worker, one predict there) and splits the answer
back: the worker runs any request unchanged, so nothing of batching lives in the worker and its
protocol is untouched. External servers' copies are not batched (``ForwardingModel.mergeable``):
they batch on their own (MLServer's adaptive batching, Triton's dynamic batcher).

Errors stay per request. A merged prediction that fails (any error but NOT_HERE and a worker's
DEADLINE_EXCEEDED, which are every request's answer) leaves each request of the batch to be
answered alone, the unbatched way, concurrently (each on its own inference thread or worker
connection, so a failed batch is never serialized behind one thread): each gets the answer or
the error it would have had without batching, at the cost of one merged prediction more than
unbatched. A copy whose merges fail while every request alone succeeds (a model that declares a
batch dimension it cannot take), ``MAX_STRIKES`` batches in a row, or whose merged outputs do not
keep the rows apart (once), stops batching, with a warning: from then on it costs nothing extra.
A request that the copy's declared inputs refuse (another trailing shape or rank, an input name it
does not have) is not batched at all: it would fail any batch it joined, and alone it gets its own
error at the cost of one request.

What is not batched goes the unbatched way, unchanged: requests the event loop cannot cheaply read
(over ``MAX_BODY``, malformed, an input with no first dimension, inputs disagreeing on it),
requests the declared inputs refuse, external servers' copies, models that declare a fixed first
dimension (they take no batch), and everything when ``max_size`` is 0 or 1. The runtime-wide
``runtime.batch_max_size`` applies to :data:`ROW_WISE` types only (scikit-learn, XGBoost,
LightGBM); an ONNX or TorchScript model batches only when its own key sets ``batch_max_size``,
since a graph may mix rows and a merged batch would then answer one client from another's inputs.

Waiting is bounded three ways: ``max_wait_ms``; the request's own deadline (the transports cancel
a request at its deadline and answer DEADLINE_EXCEEDED; a cancelled request leaves its open batch
at once, and a batch left empty is never predicted); and ``max_queue`` requests waiting per copy,
past which a request is refused with RESOURCE_EXHAUSTED rather than queued without bound. A copy
evicted or unloaded while requests wait answers them as the unbatched path would: the flushed
prediction finds the model closed and each request gets NOT_HERE, which the router retries
elsewhere.

Where the per-model setting lives: in the registration's ``ModelInfo.key`` JSON, as
``{"batch_max_size": 16, "batch_max_wait_ms": 2}`` next to modelmesh-serving's ``storage_key``
and friends (``mesh model register --batch-max-size/--batch-max-wait-ms`` writes them there). The
key already travels unchanged from ModelInfo to the registry's ModelSpec to the runtime, so no
proto field, generated code, router mapping or record field changes, and clients built against
ModelMesh's proto can set it. modelmesh-serving's own adapters read only the members they know
from this JSON, so the extra ones are harmless there. A changed key is a redefinition
(``ModelSpec.same_definition``): the copy reloads and takes the new setting. A value that is not
a number in range is ignored with a warning (the runtime defaults apply); the load does not fail
over a tuning knob.

Time is injected (``schedule``): the tests drive the max wait with a fake timer.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Protocol

import structlog
from google.protobuf.message import DecodeError

from mesh.errors import ResourceExhausted
from mesh.gen.inference import grpc_service_pb2 as pb
from mesh.runtime.batch_predict import ROWS, Merged
from mesh.tasks import Background
from mesh.tensors import TensorSpec

log = structlog.get_logger(__name__)

# Requests larger than this are not batched: the event loop parses a request to read its
# signature, and a large one is a batch on its own anyway (the codec's inline limit, 64 KiB).
MAX_BODY = 64 * 1024
# Model types whose prediction of a row depends on that row alone, by construction (tree
# ensembles, scikit-learn estimators): the runtime-wide runtime.batch_max_size applies to them.
# A TorchScript or ONNX graph may mix rows (a batch statistic, attention across the batch), and
# then a merged batch would give one client's answer from another's inputs: those batch only when
# their registration's key sets batch_max_size, an explicit statement that rows are independent.
ROW_WISE = frozenset({"sklearn", "xgboost", "lightgbm"})
MAX_BATCH_SIZE = 4096
# A batch is flushed before its bodies pass this many bytes: it bounds what one merged request
# holds (a forwarded copy's batch is merged and split on the event loop) and its answer's size.
MAX_BATCH_BYTES = 1 << 20
# Signatures whose fit to the declared inputs is remembered per copy (a client sending ever new
# shapes costs a check per request past this, not memory).
MAX_SIGNATURES = 256
# Merges in a row that fail while each of their requests alone succeeds: the copy stops batching.
MAX_STRIKES = 3
MAX_WAIT_MS = 1000.0


@dataclass(frozen=True)
class BatchPolicy:
    """``max_size``: rows (first-dimension elements) per batch, 0 or 1 = no batching; ``max_wait_ms``:
    the longest a batch stays open after its first request; ``max_queue``: requests waiting per copy."""

    max_size: int = 0
    max_wait_ms: float = 0.0
    max_queue: int = 1024

    @property
    def enabled(self) -> bool:
        return self.max_size > 1

    def for_model(self, key: Mapping[str, object], model_id: str = "", model_type: str = "") -> BatchPolicy:
        """This policy with the registration key's ``batch_max_size`` / ``batch_max_wait_ms``
        (module docstring); values out of range are ignored with a warning. The runtime's own
        ``max_size`` applies only to :data:`ROW_WISE` types; others batch only when their key asks."""
        changes: dict[str, Any] = {}
        if model_type.lower() not in ROW_WISE and "batch_max_size" not in key:
            return replace(self, max_size=0)
        for name, attr, limit in (("batch_max_size", "max_size", MAX_BATCH_SIZE),
                                  ("batch_max_wait_ms", "max_wait_ms", MAX_WAIT_MS)):
            if name not in key:
                continue
            value = key[name]
            whole = attr == "max_size"
            if (isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
                    or (whole and value != int(value)) or not 0 <= value <= limit):
                log.warning("batching setting in the model key ignored", model_id=model_id, setting=name,
                            value=str(value)[:40], limit=limit)
                continue
            changes[attr] = int(value) if whole else float(value)
        return replace(self, **changes) if changes else self


def signature(request: pb.ModelInferRequest) -> tuple[int, tuple[Any, ...]] | None:
    """(rows, what must be equal for two requests to merge), or None when the request cannot be
    batched: no inputs, an input without a first dimension, inputs disagreeing on it."""
    if not request.inputs:
        return None
    rows = -1
    inputs = []
    for tensor in request.inputs:
        shape = tuple(tensor.shape)
        if not shape or min(shape) < 0 or (rows >= 0 and shape[0] != rows):
            return None  # (a negative dimension is the model's to refuse, alone: never a row count)
        rows = shape[0]
        inputs.append((tensor.name, tensor.datatype, shape[1:], _params(tensor.parameters)))
    outputs = tuple((o.name, _params(o.parameters)) for o in request.outputs)
    return rows, (tuple(inputs), outputs, _params(request.parameters))


def _params(parameters: Any) -> tuple[tuple[str, bytes], ...]:
    if not parameters:
        return ()
    return tuple(sorted((k, v.SerializeToString(deterministic=True)) for k, v in parameters.items()))


def batchable_model(model: Any) -> bool:
    """Whether a loaded model takes a batch dimension: no input declares a fixed first dimension."""
    return all(spec.shape and spec.shape[0] == -1 for spec in getattr(model, "inputs", ()))


class Handle(Protocol):
    def cancel(self) -> None: ...


Schedule = Callable[[float, Callable[[], None]], Handle]
# The merged prediction of a batch's requests (mesh.runtime.batch_predict), and one request's
# unbatched answer (the serialized response; its error raised).
Execute = Callable[[list[pb.ModelInferRequest]], Awaitable[Merged]]
Alone = Callable[[bytes], Awaitable[bytes]]


@dataclass(eq=False)
class _Waiting:
    request: pb.ModelInferRequest
    body: bytes
    rows: int
    future: asyncio.Future[bytes]


@dataclass(eq=False)
class _Batch:
    key: tuple[Any, ...]
    waiting: list[_Waiting] = field(default_factory=list)
    rows: int = 0
    size: int = 0  # bytes of the bodies
    timer: Handle | None = None


class Batcher:
    """The open batches of one loaded copy (module docstring). ``execute`` predicts a flushed
    batch of two or more requests; ``alone`` answers one request the unbatched way (a batch of
    one, and the requests of a failed merge); ``inputs`` are the copy's declared inputs (requests
    they refuse are not batched); ``on_batch`` is told each batch's request count (a metric)."""

    def __init__(self, policy: BatchPolicy, execute: Execute, alone: Alone, *, model_id: str = "",
                 inputs: Sequence[TensorSpec] = (), schedule: Schedule | None = None,
                 on_batch: Callable[[int], None] | None = None) -> None:
        self.policy = policy
        self.model_id = model_id
        self.enabled = True  # False once merging is known not to work for this copy
        self._execute = execute
        self._alone = alone
        self._inputs = {spec.name: spec for spec in inputs}
        self._only_input = inputs[0] if len(inputs) == 1 else None
        self._schedule = schedule
        self._on_batch = on_batch
        self._open: dict[tuple[Any, ...], _Batch] = {}
        self._fits: dict[tuple[Any, ...], bool] = {}  # signature -> the declared inputs take it
        self.strikes = 0  # merges in a row that failed while every request alone succeeded
        self.waiting = 0  # requests in open batches
        self._running = Background(f"batcher:{model_id[:100]}")

    def admit(self, body: bytes) -> tuple[pb.ModelInferRequest, int, tuple[Any, ...]] | None:
        """The parsed request, its rows and its signature; None: serve it unbatched (too large, not
        parsed, no batch dimension, or shapes that the copy's declared inputs refuse)."""
        if not self.enabled or len(body) > MAX_BODY:
            return None
        try:
            request = pb.ModelInferRequest.FromString(body)
        except (DecodeError, RuntimeError, ValueError):
            return None  # the unbatched path answers it with the codec's message
        sig = signature(request)
        if sig is None:
            return None
        fits = self._fits.get(sig[1])
        if fits is None:
            fits = self._declared_fit(sig[1][0])
            if len(self._fits) < MAX_SIGNATURES:
                self._fits[sig[1]] = fits
        return (request, sig[0], sig[1]) if fits else None

    def _declared_fit(self, inputs: tuple[tuple[Any, ...], ...]) -> bool:
        """Whether the declared inputs take these (name, datatype, shape past dim 0, parameters):
        by name, or the one input of a one-input model whatever its name (tabular models take any
        name). A request they refuse would fail any batch it joins; alone, it gets its own error
        at the cost of one request. Datatypes are not compared: loaders convert numbers."""
        for name, _datatype, rest, _params in inputs:
            spec = self._inputs.get(name) or (self._only_input if len(inputs) == 1 else None)
            if spec is None:
                return not self._inputs  # a model that declares nothing is not second-guessed
            declared = tuple(spec.shape[1:])
            if len(declared) != len(rest) or any(d >= 0 and d != r for d, r in zip(declared, rest, strict=True)):
                return False
        return True

    async def submit(self, request: pb.ModelInferRequest, body: bytes, rows: int, key: tuple[Any, ...]) -> bytes:
        """Queue the request in the open batch of its signature and wait for its answer."""
        if self.waiting >= self.policy.max_queue:
            raise ResourceExhausted(f"model {self.model_id!r}: {self.waiting} requests wait for a batch; "
                                    f"the limit is {self.policy.max_queue} (runtime.batch_max_queue)")
        batch = self._open.get(key)
        if batch is not None and (batch.rows + rows > self.policy.max_size
                                  or batch.size + len(body) > MAX_BATCH_BYTES):
            self._flush(batch)  # it would overflow: it leaves now, this request opens the next
            batch = None
        if batch is None:
            batch = self._open[key] = _Batch(key)
            schedule = self._schedule or asyncio.get_running_loop().call_later
            batch.timer = schedule(self.policy.max_wait_ms / 1000, partial(self._flush, batch))
        waiting = _Waiting(request, body, rows, asyncio.get_running_loop().create_future())
        batch.waiting.append(waiting)
        batch.rows += rows
        batch.size += len(body)
        self.waiting += 1
        if batch.rows >= self.policy.max_size:
            self._flush(batch)
        try:
            return await waiting.future
        except asyncio.CancelledError:
            # Its deadline passed or its caller left: it leaves the batch if still waiting.
            if self._open.get(key) is batch and waiting in batch.waiting:
                batch.waiting.remove(waiting)
                batch.rows -= rows
                batch.size -= len(body)
                self.waiting -= 1
                if not batch.waiting:
                    self._close(batch)
            raise

    def _close(self, batch: _Batch) -> None:
        if self._open.get(batch.key) is batch:
            del self._open[batch.key]
        if batch.timer is not None:
            batch.timer.cancel()

    def _flush(self, batch: _Batch) -> None:
        if self._open.get(batch.key) is not batch:
            return  # already flushed (by size, then its timer fired)
        self._close(batch)
        self.waiting -= len(batch.waiting)
        waiting = [w for w in batch.waiting if not w.future.done()]
        if not waiting:
            return
        if self._on_batch is not None:
            self._on_batch(len(waiting))
        self._running.spawn(self._run(waiting), "predict")

    async def _run(self, waiting: Sequence[_Waiting]) -> None:
        if len(waiting) == 1:  # nothing to merge: exactly the unbatched way
            await self._answer_alone(waiting)
            return
        try:
            merged = await self._execute([w.request for w in waiting])
        except Exception as exc:  # the executor itself failed (shutting down): every request's answer
            merged = Merged([exc] * len(waiting))
        alone = []
        for w, outcome in zip(waiting, merged.outcomes, strict=True):
            if outcome is None:
                if not w.future.done():  # (a request that left meanwhile is not predicted again)
                    alone.append(w)
            elif not w.future.done():  # (done: cancelled after the flush, nobody waits for it)
                if isinstance(outcome, BaseException):
                    w.future.set_exception(outcome)
                else:
                    w.future.set_result(outcome)
        if alone:
            failures = await self._answer_alone(alone)
            self._judge(merged.fault, failures)
        elif merged.fault is None:
            self.strikes = 0

    async def _answer_alone(self, waiting: Sequence[_Waiting]) -> int:
        """Each request the unbatched way, concurrently (each on its own inference thread or worker
        connection, as without batching); the number that failed."""
        results = await asyncio.gather(*(self._alone(w.body) for w in waiting), return_exceptions=True)
        failed = 0
        for w, result in zip(waiting, results, strict=True):
            failed += isinstance(result, BaseException)
            if w.future.done():
                continue
            if isinstance(result, BaseException):
                w.future.set_exception(result)
            else:
                w.future.set_result(result)
        return failed

    def _judge(self, fault: str | None, failures: int) -> None:
        """A merge that failed while every request alone succeeded is the merge's fault (the model
        does not take batches); one whose outputs could not be split will never split. Such a copy
        stops batching (a request that fails alone too is the request's fault, not the merge's)."""
        if fault is None:
            return
        if failures:
            self.strikes = 0
            return
        self.strikes += 1
        if fault == ROWS or self.strikes >= MAX_STRIKES:
            self.enabled = False
            self._fits.clear()
            log.warning("batching stopped for this copy: its merged predictions fail where single requests do not",
                        model_id=self.model_id, fault=fault, strikes=self.strikes)

    def flush_all(self) -> None:
        """Flush every open batch now (tests; a copy going away)."""
        for batch in list(self._open.values()):
            self._flush(batch)


__all__ = ["MAX_BATCH_BYTES", "MAX_BODY", "BatchPolicy", "Batcher", "batchable_model", "signature"]
