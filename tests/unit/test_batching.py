"""Dynamic batching (mesh.runtime.batching, batch_predict): merge/split, compatibility, errors per
request, deadlines and the max wait on a fake timer, the per-model setting. Real models of every
built-in format check that batched answers equal unbatched ones."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mesh.errors import DeadlineExceeded, InvalidArgument, MeshError, NotHere, ResourceExhausted
from mesh.gen.inference import grpc_service_pb2 as pb
from mesh.runtime.batch_predict import FAILED, ROWS, Outcome, merge_request, predict_merged, split_answer, split_rows
from mesh.runtime.batching import MAX_STRIKES, Batcher, BatchPolicy, batchable_model, signature
from mesh.runtime.loaders import get_loader
from mesh.runtime.loaders.base import LoadedModel
from mesh.tensors import TensorSpec, decode_response, encode_request, infer_bytes
from tests.support.models import assert_outputs_match, make_model


class Echo(LoadedModel):
    """Returns every input doubled (numbers) or as is (BYTES, BOOL) under ``out_<name>``; counts calls."""

    def __init__(self, names: Sequence[str] = ("x",), fail: BaseException | None = None) -> None:
        super().__init__(model_id="echo", type="test", device="ram",
                         inputs=[TensorSpec(n, "FP32", (-1, -1)) for n in names],
                         outputs=[TensorSpec(f"out_{n}", "FP32", (-1, -1)) for n in names])
        self.calls: list[int] = []
        self.fail = fail

    def _predict(self, inputs: Mapping[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        self.calls.append(len(next(iter(inputs.values()))))
        if self.fail is not None:
            raise self.fail
        for value in inputs.values():
            if value.dtype.kind == "f" and np.isnan(value).any():
                raise InvalidArgument("NaN refused")
        return {f"out_{k}": v if v.dtype.kind in "Ob" else v * 2 for k, v in inputs.items()}

    def footprint_bytes(self) -> int:
        return 0

    def _release(self) -> None:
        pass


def request(inputs: Mapping[str, np.ndarray], raw: bool = True, rid: str = "", **kw: Any) -> pb.ModelInferRequest:
    return encode_request(model_name="m", inputs=inputs, raw=raw, request_id=rid, **kw)


def run(model: Any, requests: Sequence[pb.ModelInferRequest]) -> list[Outcome]:
    """The merged prediction, then the requests it left to answer alone answered alone (what the
    Batcher does, concurrently, on the event loop)."""
    merged = predict_merged(model, "m", requests)
    return [o if o is not None else answer_alone(model, r) for o, r in zip(merged.outcomes, requests, strict=True)]


def alone(model: Any, req: pb.ModelInferRequest) -> bytes:
    return infer_bytes(model, "m", req.SerializeToString())


def answer_alone(model: Any, req: pb.ModelInferRequest) -> Outcome:
    try:
        return alone(model, req)
    except Exception as exc:
        return exc


TYPED_ARRAYS: dict[str, Callable[[int], np.ndarray]] = {
    "FP32": lambda n: np.arange(n * 3, dtype=np.float32).reshape(n, 3),
    "FP64": lambda n: np.linspace(0, 1, n * 2).reshape(n, 2),
    "FP16": lambda n: np.arange(n * 2, dtype=np.float16).reshape(n, 2),
    "INT64": lambda n: np.arange(n * 4, dtype=np.int64).reshape(n, 4),
    "INT32": lambda n: np.arange(n, dtype=np.int32).reshape(n, 1),
    "UINT8": lambda n: np.arange(n * 2, dtype=np.uint8).reshape(n, 2),
    "BOOL": lambda n: (np.arange(n * 2) % 2 == 0).reshape(n, 2),
    "BYTES": lambda n: np.array([f"row{i}".encode() for i in range(n)], dtype=object).reshape(n, 1),
}


@pytest.mark.parametrize(("datatype", "raw"), [(d, raw) for d in sorted(TYPED_ARRAYS) for raw in (True, False)
                                                if raw or d != "FP16"])  # FP16 travels raw only
def test_merged_answers_equal_unbatched_for_every_tensor_type(datatype: str, raw: bool) -> None:
    model = Echo()
    requests = [request({"x": TYPED_ARRAYS[datatype](n)}, raw=raw, rid=f"r{n}") for n in (1, 3, 2)]
    outcomes = run(model, requests)
    assert model.calls == [6]  # one prediction for the three
    for req, got in zip(requests, outcomes, strict=True):
        assert got == alone(model, req)  # byte for byte: same outputs, id, name and form
        assert pb.ModelInferResponse.FromString(got).id == req.id


def test_several_inputs_merge_together_and_rows_split_back() -> None:
    model = Echo(names=("a", "b"))
    requests = [request({"a": np.full((n, 2), n, np.float32), "b": np.full((n, 1), -n, np.int64)}) for n in (2, 1)]
    first, second = (decode_response(pb.ModelInferResponse.FromString(o)) for o in run(model, requests))  # type: ignore[arg-type]
    assert first["out_a"].tolist() == [[4, 4], [4, 4]] and first["out_b"].tolist() == [[-4], [-4]]
    assert second["out_a"].tolist() == [[2, 2]] and second["out_b"].tolist() == [[-2]]


def test_split_refuses_outputs_that_lost_the_rows() -> None:
    assert split_rows({"y": np.zeros((5, 2))}, [2, 3]) is not None
    assert split_rows({"y": np.zeros(4)}, [2, 3]) is None
    assert split_rows({"y": np.float64(1.0)}, [2, 3]) is None  # type: ignore[dict-item]


def test_signature_says_what_may_merge() -> None:
    base = signature(request({"x": np.zeros((2, 3), np.float32)}))
    assert base is not None and base[0] == 2
    assert signature(request({"x": np.zeros((5, 3), np.float32)}))[1] == base[1]  # type: ignore[index]
    for other in (request({"x": np.zeros((2, 4), np.float32)}),  # another trailing shape
                  request({"x": np.zeros((2, 3), np.float64)}),  # another datatype
                  request({"y": np.zeros((2, 3), np.float32)}),  # another input name
                  request({"x": np.zeros((2, 3), np.float32)}, outputs=["predict_proba"])):
        assert signature(other)[1] != base[1]  # type: ignore[index]
    with_params = request({"x": np.zeros((2, 3), np.float32)})
    with_params.parameters["threshold"].double_param = 0.5
    assert signature(with_params)[1] != base[1]  # type: ignore[index]
    assert signature(request({"x": np.float32(1.0)})) is None  # no first dimension  # type: ignore[dict-item]
    assert signature(request({"a": np.zeros((2, 1)), "b": np.zeros((3, 1))})) is None  # rows disagree


def test_a_refused_request_gets_its_own_error_and_the_others_their_answers() -> None:
    model = Echo()
    good = [request({"x": np.ones((2, 2), np.float32)}), request({"x": np.zeros((1, 2), np.float32)})]
    bad = request({"x": np.full((1, 2), np.nan, np.float32)})
    malformed = request({"x": np.ones((1, 2), np.float32)})
    malformed.raw_input_contents[0] = b"\0" * 3  # 3 bytes for 2 FP32
    outcomes = run(model, [good[0], bad, malformed, good[1]])
    assert isinstance(outcomes[1], InvalidArgument) and "NaN" in str(outcomes[1])
    assert isinstance(outcomes[2], InvalidArgument) and "raw contents" in str(outcomes[2])
    assert outcomes[0] == alone(model, good[0]) and outcomes[3] == alone(model, good[1])


def test_a_failed_merge_leaves_each_request_to_be_answered_alone_but_not_here_is_everyones() -> None:
    requests = [request({"x": np.ones((1, 2), np.float32)}) for _ in range(3)]
    model = Echo(fail=RuntimeError("library crashed"))
    merged = predict_merged(model, "m", requests)
    assert merged.outcomes == [None] * 3 and merged.fault == FAILED and model.calls == [3]
    gone = NotHere("model 'm' was unloaded from this instance")
    merged = predict_merged(Echo(fail=gone), "m", requests)
    assert merged.outcomes == [gone] * 3 and merged.fault is None  # the router retries them elsewhere


def test_an_unloaded_copy_answers_not_here_to_each() -> None:
    model = Echo()
    model.close()
    outcomes = run(model, [request({"x": np.ones((1, 2), np.float32)}) for _ in range(2)])
    assert all(isinstance(o, NotHere) for o in outcomes)


def test_models_with_a_fixed_first_dimension_are_not_batched() -> None:
    model = Echo()
    assert batchable_model(model)
    model.inputs = [TensorSpec("x", "FP32", (1, 3))]
    assert not batchable_model(model)


@pytest.mark.parametrize("kind", ["sklearn", "xgboost", "lightgbm", "onnx", "torchscript"])
def test_real_models_answer_the_same_batched(kind: str, tmp_path: Path) -> None:
    artifact = make_model(kind, tmp_path, seed=1)
    model = get_loader(kind).load("m", artifact.path, {}, "ram")
    assert batchable_model(model)
    rows = np.asarray(artifact.sample, dtype=np.float32)
    requests = [request({"input": rows[i:i + n]}, rid=str(i)) for i, n in ((0, 1), (1, 3), (4, 4))]
    for req, got in zip(requests, run(model, requests), strict=True):
        assert isinstance(got, bytes)
        assert_outputs_match(decode_response(pb.ModelInferResponse.FromString(got)),
                             decode_response(pb.ModelInferResponse.FromString(alone(model, req))))
    model.close()


# --- the queue on the event loop --------------------------------------------------------------


class FakeTimer:
    """``schedule`` for the Batcher: records the delays; ``fire`` runs what is due."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, Callable[[], None], list[bool]]] = []

    def __call__(self, delay: float, callback: Callable[[], None]) -> Any:
        cancelled = [False]
        self.calls.append((delay, callback, cancelled))

        class Handle:
            def cancel(self) -> None:
                cancelled[0] = True

        return Handle()

    def fire(self) -> None:
        for _, callback, cancelled in list(self.calls):
            if not cancelled[0]:
                cancelled[0] = True
                callback()


def batcher(model: Any, policy: BatchPolicy, timer: FakeTimer, sizes: list[int],
            alone_calls: list[bytes] | None = None) -> Batcher:
    async def execute(requests: list[pb.ModelInferRequest]) -> Any:
        return predict_merged(model, "m", requests)

    async def alone(body: bytes) -> bytes:
        if alone_calls is not None:
            alone_calls.append(body)
        await asyncio.sleep(0)
        return infer_bytes(model, "m", body)

    return Batcher(policy, execute, alone, model_id="m", inputs=model.inputs, schedule=timer,
                   on_batch=sizes.append)


async def submit(b: Batcher, req: pb.ModelInferRequest) -> bytes:
    admitted = b.admit(req.SerializeToString())
    assert admitted is not None
    return await b.submit(admitted[0], req.SerializeToString(), admitted[1], admitted[2])


def test_a_batch_waits_for_max_wait_then_goes_with_what_it_has() -> None:
    async def main() -> None:
        model, timer, sizes = Echo(), FakeTimer(), []
        b = batcher(model, BatchPolicy(max_size=8, max_wait_ms=5), timer, sizes)
        tasks = [asyncio.create_task(submit(b, request({"x": np.ones((1, 2), np.float32)}))) for _ in range(3)]
        await asyncio.sleep(0.01)  # real time passes; the fake timer has not fired
        assert not any(t.done() for t in tasks) and model.calls == [] and b.waiting == 3
        assert [delay for delay, _, _ in timer.calls] == [0.005]  # one timer, at the max wait
        timer.fire()
        await asyncio.gather(*tasks)
        assert model.calls == [3] and sizes == [3] and b.waiting == 0

    asyncio.run(main())


def test_a_full_batch_goes_at_once_and_an_overflowing_request_opens_the_next() -> None:
    async def main() -> None:
        model, timer, sizes = Echo(), FakeTimer(), []
        b = batcher(model, BatchPolicy(max_size=4, max_wait_ms=5), timer, sizes)
        first = [asyncio.create_task(submit(b, request({"x": np.ones((n, 2), np.float32)}))) for n in (2, 1)]
        await asyncio.sleep(0)
        third = asyncio.create_task(submit(b, request({"x": np.ones((2, 2), np.float32)})))  # 5 rows > 4
        await asyncio.gather(*first)  # flushed by the overflow, without the timer
        assert model.calls == [3]
        fourth = asyncio.create_task(submit(b, request({"x": np.ones((2, 2), np.float32)})))  # 4 rows: full
        await asyncio.gather(third, fourth)
        assert model.calls == [3, 4] and sizes == [2, 2]

    asyncio.run(main())


def test_incompatible_requests_wait_in_batches_of_their_own() -> None:
    async def main() -> None:
        model, timer, sizes = Echo(), FakeTimer(), []
        b = batcher(model, BatchPolicy(max_size=8, max_wait_ms=5), timer, sizes)
        reqs = [request({"x": np.ones((1, 2), np.float32)}), request({"x": np.ones((1, 3), np.float32)}),
                request({"x": np.ones((1, 2), np.float32)})]
        tasks = [asyncio.create_task(submit(b, r)) for r in reqs]
        await asyncio.sleep(0)
        assert len(timer.calls) == 2
        timer.fire()
        answers = await asyncio.gather(*tasks)
        assert sorted(model.calls) == [1, 2] and sorted(sizes) == [1, 2]
        assert list(answers) == [alone(model, r) for r in reqs]

    asyncio.run(main())


def test_a_request_whose_deadline_passes_while_waiting_leaves_its_batch() -> None:
    async def main() -> None:
        model, timer, sizes = Echo(), FakeTimer(), []
        b = batcher(model, BatchPolicy(max_size=8, max_wait_ms=50), timer, sizes)
        late = request({"x": np.ones((1, 2), np.float32)})
        stays = asyncio.create_task(submit(b, request({"x": np.ones((2, 2), np.float32)})))

        async def with_deadline() -> bytes:
            async with asyncio.timeout(0.01):  # as the transports bound a request by its deadline
                return await submit(b, late)

        with pytest.raises(TimeoutError):
            await with_deadline()
        assert b.waiting == 1
        timer.fire()
        await stays
        assert model.calls == [2] and sizes == [1]  # predicted without the one that left

        lone = asyncio.create_task(with_deadline())  # alone in its batch: the batch goes with it
        with pytest.raises(TimeoutError):
            await lone
        timer.fire()
        await asyncio.sleep(0)
        assert b.waiting == 0 and model.calls == [2] and timer.calls[-1][2][0]

    asyncio.run(main())


def test_the_queue_is_bounded() -> None:
    async def main() -> None:
        model, timer, sizes = Echo(), FakeTimer(), []
        b = batcher(model, BatchPolicy(max_size=100, max_wait_ms=5, max_queue=2), timer, sizes)
        tasks = [asyncio.create_task(submit(b, request({"x": np.ones((1, 2), np.float32)}))) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(ResourceExhausted, match="batch_max_queue"):
            await submit(b, request({"x": np.ones((1, 2), np.float32)}))
        timer.fire()
        await asyncio.gather(*tasks)

    asyncio.run(main())


def test_errors_reach_each_waiting_request() -> None:
    async def main() -> None:
        model, timer, sizes = Echo(), FakeTimer(), []
        b = batcher(model, BatchPolicy(max_size=3, max_wait_ms=5), timer, sizes)
        reqs = [request({"x": np.ones((1, 2), np.float32)}), request({"x": np.full((1, 2), np.nan, np.float32)}),
                request({"x": np.zeros((1, 2), np.float32)})]
        results = await asyncio.gather(*(submit(b, r) for r in reqs), return_exceptions=True)
        assert isinstance(results[1], InvalidArgument)
        assert results[0] == alone(model, reqs[0]) and results[2] == alone(model, reqs[2])

    asyncio.run(main())


def test_large_or_unreadable_bodies_are_not_batched() -> None:
    b = batcher(Echo(), BatchPolicy(max_size=8, max_wait_ms=5), FakeTimer(), [])
    assert b.admit(b"\xff\xff not a request") is None
    big = request({"x": np.ones((10_000, 4), np.float32)}).SerializeToString()
    assert b.admit(big) is None


def test_the_per_model_setting_comes_from_the_registration_key() -> None:
    defaults = BatchPolicy(max_size=0, max_wait_ms=2, max_queue=10)
    assert not defaults.enabled
    mine = defaults.for_model({"storage_key": "s3", "batch_max_size": 16, "batch_max_wait_ms": 1.5})
    assert mine == BatchPolicy(max_size=16, max_wait_ms=1.5, max_queue=10) and mine.enabled
    assert defaults.for_model({"batch_max_size": 1}).enabled is False  # a model may turn it off
    for bad in ({"batch_max_size": "16"}, {"batch_max_size": 2.5}, {"batch_max_size": -1},
                {"batch_max_wait_ms": 10_000}, {"batch_max_size": True}):
        assert defaults.for_model(bad) == defaults  # ignored, with a warning


def test_the_register_flags_write_the_key() -> None:
    from mesh.cli.commands import _key
    from mesh.cli.main import build_parser

    args = build_parser().parse_args(["model", "register", "m", "--type", "onnx", "--path", "/m",
                                      "--key", '{"storage_key": "s3"}', "--batch-max-size", "16",
                                      "--batch-max-wait-ms", "2"])
    key = json.loads(_key(args))
    assert key == {"storage_key": "s3", "batch_max_size": 16, "batch_max_wait_ms": 2.0}
    assert BatchPolicy().for_model(key) == BatchPolicy(max_size=16, max_wait_ms=2.0)


def test_runtime_wide_batching_is_for_row_wise_types_and_keys_are_checked() -> None:
    """A graph may mix rows: the runtime-wide setting batches scikit-learn, XGBoost and LightGBM
    only; ONNX and TorchScript batch when their own key says so. A key's non-finite value is ignored."""
    policy = BatchPolicy(max_size=32, max_wait_ms=2)
    assert policy.for_model({}, "m", "sklearn").enabled and policy.for_model({}, "m", "lightgbm").enabled
    assert not policy.for_model({}, "m", "onnx").enabled and not policy.for_model({}, "m", "torchscript").enabled
    assert policy.for_model({"batch_max_size": 8}, "m", "onnx").max_size == 8
    for bad in (float("inf"), float("nan"), -1, 10**9, "8", True):
        assert policy.for_model({"batch_max_size": bad}, "m", "sklearn").max_size == 32, bad


def test_a_negative_dimension_is_never_a_row_count() -> None:
    """A request declaring a negative first dimension goes alone (the model refuses it), so it can
    never push a batch past its size."""
    req = request({"x": np.zeros((2, 3), dtype=np.float32)})
    req.inputs[0].shape[0] = -100
    assert signature(req) is None


# --- errors per request, refused requests, copies that do not batch (review of issue 17) --------


class Picky(Echo):
    """Raises a model error (not INVALID_ARGUMENT) on a row whose first value is negative, or on any
    call of more than ``max_rows`` rows (a model that claims a batch dimension it cannot take);
    with ``lose_rows`` its output has one row whatever the input (a model that mixes rows)."""

    def __init__(self, max_rows: int = 1 << 30, lose_rows: bool = False) -> None:
        super().__init__()
        self.inputs = [TensorSpec("x", "FP32", (-1, 2))]
        self.max_rows, self.lose_rows = max_rows, lose_rows

    def _predict(self, inputs: Mapping[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        self.calls.append(len(x))
        if len(x) > self.max_rows:
            raise MeshError("batch too large for this model")
        if (x[:, 0] < 0).any():
            raise RuntimeError("negative value crashed the library")
        return {"out_x": x[:1] if self.lose_rows else x * 2}


def rows_of(value: float, n: int = 1) -> pb.ModelInferRequest:
    return request({"x": np.full((n, 2), value, np.float32)})


async def through(b: Batcher, requests: Sequence[pb.ModelInferRequest], timer: FakeTimer) -> list[Any]:
    tasks = [asyncio.create_task(submit(b, r)) for r in requests]
    await asyncio.sleep(0)
    timer.fire()
    return list(await asyncio.gather(*tasks, return_exceptions=True))


def test_a_model_error_on_one_request_stays_that_requests() -> None:
    """A model error other than INVALID_ARGUMENT on one request's rows fails the merged prediction;
    each request is then answered alone: the poisoned one gets its error, the others their answers,
    and the copy keeps batching (the request was at fault, not the merge)."""
    async def main() -> None:
        model, timer, sizes, calls = Picky(), FakeTimer(), [], []
        b = batcher(model, BatchPolicy(max_size=8, max_wait_ms=5), timer, sizes, calls)
        reqs = [rows_of(1.0), rows_of(-1.0), rows_of(2.0, 2)]
        for _ in range(MAX_STRIKES + 1):
            results = await through(b, reqs, timer)
            assert isinstance(results[1], RuntimeError) and "negative" in str(results[1])
            assert results[0] == alone(model, reqs[0]) and results[2] == alone(model, reqs[2])
        assert b.enabled and b.strikes == 0 and len(calls) == 3 * (MAX_STRIKES + 1)

    asyncio.run(main())


def test_a_copy_whose_merges_fail_where_single_requests_do_not_stops_batching() -> None:
    async def main() -> None:
        model, timer, sizes, calls = Picky(max_rows=1), FakeTimer(), [], []
        b = batcher(model, BatchPolicy(max_size=8, max_wait_ms=5), timer, sizes, calls)
        reqs = [rows_of(float(i)) for i in range(3)]
        for _ in range(MAX_STRIKES):
            assert b.admit(reqs[0].SerializeToString()) is not None
            results = await through(b, reqs, timer)
            assert results == [alone(model, r) for r in reqs]  # every answer right all along
        assert not b.enabled and b.admit(reqs[0].SerializeToString()) is None  # now the unbatched way
        assert model.calls.count(3) == MAX_STRIKES  # one failed merge per batch, no more

    asyncio.run(main())


def test_a_copy_whose_outputs_lose_the_rows_stops_batching_at_once() -> None:
    async def main() -> None:
        model, timer, sizes = Picky(lose_rows=True), FakeTimer(), []
        b = batcher(model, BatchPolicy(max_size=8, max_wait_ms=5), timer, sizes)
        reqs = [rows_of(1.0), rows_of(2.0)]
        assert await through(b, reqs, timer) == [alone(model, r) for r in reqs]
        assert not b.enabled

    asyncio.run(main())


def test_requests_left_to_answer_alone_run_concurrently() -> None:
    """A failed merge does not serialize its batch: its requests are answered alone at once,
    each the unbatched way (its own inference thread or worker connection)."""
    async def main() -> None:
        model, timer = Picky(), FakeTimer()
        started, gate = [], asyncio.Event()

        async def execute(requests: list[pb.ModelInferRequest]) -> Any:
            return predict_merged(model, "m", requests)

        async def slow_alone(body: bytes) -> bytes:
            started.append(body)
            if len(started) == len(reqs):
                gate.set()
            await asyncio.wait_for(gate.wait(), 5)  # none finishes before all have started (serial: TimeoutError)
            return infer_bytes(model, "m", body)

        b = Batcher(BatchPolicy(max_size=8, max_wait_ms=5), execute, slow_alone, model_id="m",
                    inputs=model.inputs, schedule=timer)
        reqs = [rows_of(-1.0), rows_of(1.0), rows_of(2.0), rows_of(3.0)]
        results = await through(b, reqs, timer)
        assert isinstance(results[0], RuntimeError) and results[1:] == [alone(model, r) for r in reqs[1:]]

    asyncio.run(main())


def test_a_request_its_copys_declared_inputs_refuse_is_not_batched() -> None:
    """Shapes past the first dimension that the declared inputs refuse would fail any batch they
    joined: such a request goes the unbatched way and gets its own error there."""
    b = batcher(Picky(), BatchPolicy(max_size=8, max_wait_ms=5), FakeTimer(), [])
    assert b.admit(rows_of(1.0).SerializeToString()) is not None
    assert b.admit(request({"x": np.ones((1, 3), np.float32)}).SerializeToString()) is None  # 3 features, not 2
    assert b.admit(request({"x": np.ones((1, 2, 1), np.float32)}).SerializeToString()) is None  # rank
    any_name = request({"other": np.ones((1, 2), np.float32)})
    assert b.admit(any_name.SerializeToString()) is not None  # a one-input model: any name
    two = batcher(Echo(names=("a", "b")), BatchPolicy(max_size=8, max_wait_ms=5), FakeTimer(), [])
    assert two.admit(request({"a": np.ones((1, 2), np.float32), "c": np.ones((1, 2), np.float32)})
                     .SerializeToString()) is None  # an input it does not have


def forward_with(model: Any) -> Any:
    """A forwarded copy's batch, with ``model`` standing for the worker (it decodes, predicts and
    encodes the merged request as a worker does any request)."""
    def execute(requests: list[pb.ModelInferRequest], fail: BaseException | None = None) -> Any:
        body, outcomes, decoded, rows = merge_request("m", requests)
        assert body is not None
        answer: bytes | BaseException
        try:
            answer = fail if fail is not None else infer_bytes(model, "m", body)
        except Exception as exc:
            answer = exc
        return split_answer("m", requests, answer, outcomes, decoded, rows)
    return execute


@pytest.mark.parametrize(("datatype", "raw"), [(d, raw) for d in sorted(TYPED_ARRAYS) for raw in (True, False)
                                                if raw or d != "FP16"])
def test_a_forwarded_batch_merges_into_one_request_and_splits_back(datatype: str, raw: bool) -> None:
    model = Echo()
    requests = [request({"x": TYPED_ARRAYS[datatype](n)}, raw=raw, rid=f"r{n}") for n in (1, 3, 2)]
    for r in requests:
        r.parameters["p"].string_param = "kept"  # (the signature makes them equal in a batch)
    merged = forward_with(model)(requests)
    assert model.calls == [6] and merged.fault is None
    for req, got in zip(requests, merged.outcomes, strict=True):
        assert got == alone(model, req)


def test_a_forwarded_batch_keeps_errors_per_request() -> None:
    model = Picky()
    reqs = [rows_of(1.0), rows_of(-1.0)]
    malformed = rows_of(1.0)
    malformed.raw_input_contents[0] = b"\0" * 3
    merged = forward_with(model)([*reqs, malformed])
    assert merged.outcomes[:2] == [None, None] and merged.fault == FAILED  # each alone, by the batcher
    assert isinstance(merged.outcomes[2], InvalidArgument)
    assert forward_with(Picky(lose_rows=True))([rows_of(1.0), rows_of(2.0)]).fault == ROWS
    for everyones in (NotHere("worker lost"), DeadlineExceeded("took too long; its worker was ended")):
        assert forward_with(model)(reqs, fail=everyones).outcomes == [everyones, everyones]
    assert forward_with(model)(reqs, fail=ResourceExhausted("answer over the limit")).outcomes == [None, None]
