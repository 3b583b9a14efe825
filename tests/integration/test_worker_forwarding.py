"""Forwarded predictions (``RemoteModel.forward``): the event loop's connections to a worker.

Two tiers. Against a stand-in worker (an asyncio Unix server in the test, answering each request
frame as the test says, byte by byte where it matters): an answer that trickles in arrives whole
and its connection is reused; an answer announced over the limit is refused at its header and its
connection dropped; bytes beyond an answer, or bytes nobody asked for, cost the connection and
never reach the next request; a caller cancelled in flight leaves no half-read answer for the next
caller; a worker that closes mid-answer is WorkerGone; no more connections than the bound.

Against real worker processes (``python -m mesh.runtime.worker``), on asyncio's loop and on
uvloop (the runtime's): many concurrent forwards to two models give each request its own answer;
an answer over the limit fails only its request; a prediction past the deadline ends the worker
(DEADLINE_EXCEEDED) and the requests in flight beside it are WorkerGone; a worker killed under
concurrent forwarded load ends every request promptly (an answer or WorkerGone, no hang); a
closed copy is "not here", a copy lost with its worker WorkerGone, and a new copy answers after
the restart.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import joblib
import numpy as np
import pytest

from mesh.errors import DeadlineExceeded, MeshError, NotHere, ResourceExhausted
from mesh.gen.inference import grpc_service_pb2 as pb
from mesh.registry.records import ModelSpec
from mesh.runtime import worker_channels as channels_module
from mesh.runtime.loaders.base import LoadPolicy
from mesh.runtime.worker import HEADER
from mesh.runtime.workers import OutOfStep, RemoteModel, WorkerGone, WorkerPool, WorkerProcess
from tests.support import hostile
from tests.support.models import make_model

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

REPO = str(Path(__file__).resolve().parents[2])


class Sleeps:
    """A model that sleeps, then answers its constant (unpickled in a worker: this module is on
    the workers' PYTHONPATH)."""

    n_features_in_ = 2

    def __init__(self, seconds: float, value: float) -> None:
        self.seconds = seconds
        self.value = value

    def predict(self, x: np.ndarray) -> np.ndarray:
        time.sleep(self.seconds)
        return np.full(len(x), self.value)


# --- a stand-in worker ------------------------------------------------------------------------

Answer = Callable[[int, bytes, asyncio.StreamWriter], Awaitable[None]]


class StandIn:
    """A Unix server that reads request frames and lets ``answer`` write whatever it likes."""

    def __init__(self, path: Path, answer: Answer) -> None:
        self.path = path
        self.answer = answer
        self.connections = 0
        self.closed_by_peer = 0
        self.requests: list[bytes] = []
        self.server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> StandIn:
        self.server = await asyncio.start_unix_server(self._serve, str(self.path))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                length, op = HEADER.unpack(await reader.readexactly(HEADER.size))
                payload = await reader.readexactly(length)
                self.requests.append(payload)
                await self.answer(op, payload, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed_by_peer += 1
        finally:
            writer.close()


def _frame(payload: bytes, tag: int = 0) -> bytes:
    return HEADER.pack(len(payload), tag) + payload


def _stand_in_worker(tmp_path: Path) -> WorkerProcess:
    worker = WorkerProcess(0, tmp_path, LoadPolicy())
    worker.generation = 1
    worker.ready.set()
    return worker


async def _echo(op: int, payload: bytes, writer: asyncio.StreamWriter) -> None:
    writer.write(_frame(b"echo:" + payload[3:]))  # after the model's u16 length and 1-byte name


async def test_an_answer_that_trickles_in_arrives_whole_on_a_reused_connection(tmp_path: Path) -> None:
    async def trickle(op: int, payload: bytes, writer: asyncio.StreamWriter) -> None:
        for i, byte in enumerate(_frame(b"echo:" + payload[3:])):
            writer.write(bytes([byte]))
            if i % 3 == 0:
                await writer.drain()
                await asyncio.sleep(0.001)

    worker = _stand_in_worker(tmp_path)
    async with StandIn(worker.socket_path, trickle) as stand_in:
        for body in (b"first", b"second" * 100, b""):
            answer = await worker.channels().infer(1, b"\x01\x00m", body, timeout=10, limit=1 << 20)
            assert answer == b"echo:" + body
        assert stand_in.connections == 1


async def test_an_answer_announced_over_the_limit_is_refused_at_its_header(tmp_path: Path) -> None:
    async def announces(op: int, payload: bytes, writer: asyncio.StreamWriter) -> None:
        if payload.endswith(b"huge"):
            writer.write(HEADER.pack(2**32 - 1, 0) + b"\0" * 1000)  # 4 GiB announced, never sent
        else:
            await _echo(op, payload, writer)

    worker = _stand_in_worker(tmp_path)
    async with StandIn(worker.socket_path, announces) as stand_in:
        started = time.perf_counter()
        with pytest.raises(ResourceExhausted, match="over the limit of 65536"):
            await worker.channels().infer(1, b"\x01\x00m", b"huge", timeout=10, limit=65536)
        assert time.perf_counter() - started < 5  # refused at the header, not at the deadline
        assert await worker.channels().infer(1, b"\x01\x00m", b"ok", timeout=10, limit=65536) == b"echo:ok"
        await asyncio.sleep(0.05)
        assert stand_in.connections == 2 and stand_in.closed_by_peer >= 1  # the refused one was dropped


async def test_bytes_beyond_an_answer_never_reach_the_next_request(tmp_path: Path) -> None:
    async def chatty(op: int, payload: bytes, writer: asyncio.StreamWriter) -> None:
        if payload.endswith(b"extra"):
            writer.write(_frame(b"one") + _frame(b"stale"))  # two answers to one request
        elif payload.endswith(b"later"):
            writer.write(_frame(b"answer"))
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(_frame(b"unasked"))  # while the connection sits idle in the pool
        else:
            await _echo(op, payload, writer)

    worker = _stand_in_worker(tmp_path)
    async with StandIn(worker.socket_path, chatty) as stand_in:
        with pytest.raises(OutOfStep, match="more than its answer"):
            await worker.channels().infer(1, b"\x01\x00m", b"extra", timeout=10, limit=1 << 20)
        assert await worker.channels().infer(1, b"\x01\x00m", b"a", timeout=10, limit=1 << 20) == b"echo:a"
        assert await worker.channels().infer(1, b"\x01\x00m", b"later", timeout=10, limit=1 << 20) == b"answer"
        await asyncio.sleep(0.2)  # the unasked frame arrives: that connection is dropped
        assert await worker.channels().infer(1, b"\x01\x00m", b"b", timeout=10, limit=1 << 20) == b"echo:b"
        assert stand_in.connections == 3


async def test_a_cancelled_request_leaves_no_half_read_answer_behind(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(channels_module, "CHANNELS_PER_WORKER", 1)  # the next request must reuse or reconnect

    async def slow(op: int, payload: bytes, writer: asyncio.StreamWriter) -> None:
        if payload.endswith(b"slow"):
            frame = _frame(b"the slow answer")
            writer.write(frame[:7])  # half an answer, then the rest later
            await writer.drain()
            await asyncio.sleep(0.3)
            writer.write(frame[7:])
        else:
            await _echo(op, payload, writer)

    worker = _stand_in_worker(tmp_path)
    async with StandIn(worker.socket_path, slow) as stand_in:
        call = asyncio.create_task(worker.channels().infer(1, b"\x01\x00m", b"slow", timeout=10, limit=1 << 20))
        await asyncio.sleep(0.1)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        for i in range(3):
            assert await worker.channels().infer(1, b"\x01\x00m", b"next%d" % i, timeout=10,
                                                 limit=1 << 20) == b"echo:next%d" % i
        await asyncio.sleep(0.4)
        assert await worker.channels().infer(1, b"\x01\x00m", b"last", timeout=10, limit=1 << 20) == b"echo:last"
        assert stand_in.connections == 2  # the cancelled one's, dropped; one more, reused since


async def test_a_deadline_and_a_worker_that_closes_mid_answer(tmp_path: Path) -> None:
    async def misbehaves(op: int, payload: bytes, writer: asyncio.StreamWriter) -> None:
        if payload.endswith(b"silent"):
            await asyncio.sleep(3600)
        elif payload.endswith(b"cut"):
            writer.write(_frame(b"never whole")[:8])
            await writer.drain()
            writer.close()
        else:
            await _echo(op, payload, writer)

    worker = _stand_in_worker(tmp_path)
    async with StandIn(worker.socket_path, misbehaves):
        with pytest.raises(TimeoutError):
            await worker.channels().infer(1, b"\x01\x00m", b"silent", timeout=0.2, limit=1 << 20)
        with pytest.raises(WorkerGone, match="died during the call"):
            await worker.channels().infer(1, b"\x01\x00m", b"cut", timeout=10, limit=1 << 20)
        assert await worker.channels().infer(1, b"\x01\x00m", b"ok", timeout=10, limit=1 << 20) == b"echo:ok"
        with pytest.raises(WorkerGone, match="not running"):  # a generation that is gone
            await worker.channels().infer(0, b"\x01\x00m", b"ok", timeout=10, limit=1 << 20)


async def test_concurrency_is_bounded_by_the_pool(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(channels_module, "CHANNELS_PER_WORKER", 3)
    in_flight = peak = 0

    async def slowly(op: int, payload: bytes, writer: asyncio.StreamWriter) -> None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        await _echo(op, payload, writer)

    worker = _stand_in_worker(tmp_path)
    async with StandIn(worker.socket_path, slowly) as stand_in:
        bodies = [b"%d" % i for i in range(60)]
        answers = await asyncio.gather(*(worker.channels().infer(1, b"\x01\x00m", body, timeout=10, limit=1 << 20)
                                         for body in bodies))
        assert answers == [b"echo:" + body for body in bodies]
        assert peak == 3 and stand_in.connections == 3


# --- real workers -----------------------------------------------------------------------------

def _spec(model_id: str, path: Path) -> ModelSpec:
    return ModelSpec(model_id=model_id, type="sklearn", path=str(path))


def _pickle(tmp_path: Path, name: str, obj: object) -> Path:
    path = tmp_path / name / "model.joblib"
    path.parent.mkdir(parents=True)
    joblib.dump(obj, path)
    return path


def _request(model_id: str, sample: np.ndarray, request_id: str = "") -> bytes:
    from mesh.tensors import encode_request

    return encode_request(model_name=model_id, inputs={"input-0": sample}, request_id=request_id).SerializeToString()


def _predict(answer: bytes) -> tuple[str, np.ndarray]:
    from mesh.tensors import decode_response

    response = pb.ModelInferResponse.FromString(answer)
    return response.id, decode_response(response)["predict"]


def _run(loop: str, coro: Callable[[], Awaitable[None]]) -> None:
    if loop == "uvloop":
        import uvloop

        uvloop.run(coro())  # type: ignore[arg-type]
    else:
        asyncio.run(coro())  # type: ignore[arg-type]


@pytest.fixture()
def worker_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", REPO)  # this module and the hostile models, importable in the workers


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_many_concurrent_forwards_each_get_their_own_answer(worker_env: None, tmp_path: Path, loop: str) -> None:
    models = {f"m{i}": make_model("sklearn", tmp_path / f"m{i}", seed=i) for i in (0, 1)}
    pool = WorkerPool(1, LoadPolicy(), load_timeout_s=30, warm=("sklearn",), directory=tmp_path / "w")
    pool.start()

    async def main() -> None:
        remote = {mid: await asyncio.to_thread(pool.load, _spec(mid, m.path), "ram") for mid, m in models.items()}

        async def one(k: int) -> None:
            mid = f"m{k % 2}"
            rows = models[mid].sample[k % len(models[mid].sample):][:1 + k % 3]
            request_id, predicted = _predict(await remote[mid].forward(_request(mid, rows, f"r{k}")))
            assert request_id == f"r{k}"  # its own answer, never a neighbour's
            np.testing.assert_array_equal(predicted, models[mid].expected["predict"][k % len(models[mid].sample):]
                                          [:1 + k % 3])

        await asyncio.gather(*(one(k) for k in range(400)))
        channels = pool.workers[0].channels()
        assert 1 < len(channels.idle) <= channels_module.CHANNELS_PER_WORKER  # used at once, and bounded

    try:
        _run(loop, main)
        assert pool.restarts == 0 and len(pool.pids()) == 1
    finally:
        pool.close()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_an_answer_over_the_limit_fails_only_its_request(worker_env: None, tmp_path: Path, loop: str) -> None:
    healthy = make_model("sklearn", tmp_path / "healthy", seed=2)
    pool = WorkerPool(1, LoadPolicy(), load_timeout_s=30, max_answer_bytes=1 << 20, directory=tmp_path / "w")
    pool.start()

    async def main() -> None:
        huge = await asyncio.to_thread(pool.load, _spec("huge", _pickle(tmp_path, "huge", hostile.HugeOutput())), "ram")
        ok = await asyncio.to_thread(pool.load, _spec("healthy", healthy.path), "ram")
        calls = [huge.forward(_request("huge", np.zeros((1, 2)))) if k % 5 == 0 else
                 ok.forward(_request("healthy", healthy.sample, f"r{k}")) for k in range(30)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        for k, result in enumerate(results):
            if k % 5 == 0:
                assert isinstance(result, ResourceExhausted) and "over the limit of 1048576" in str(result)
            else:
                assert isinstance(result, bytes), result
                request_id, predicted = _predict(result)
                assert request_id == f"r{k}"
                np.testing.assert_array_equal(predicted, healthy.expected["predict"])

    try:
        _run(loop, main)
        assert pool.restarts == 0 and len(pool.pids()) == 1
    finally:
        pool.close()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_prediction_past_the_deadline_ends_its_worker(worker_env: None, tmp_path: Path, loop: str) -> None:
    pool = WorkerPool(1, LoadPolicy(), load_timeout_s=30, predict_timeout_s=1.5, directory=tmp_path / "w")
    pool.start()

    async def main() -> None:
        slow = await asyncio.to_thread(pool.load, _spec("slow", _pickle(tmp_path, "slow", Sleeps(0.5, 7.0))), "ram")
        hangs = await asyncio.to_thread(pool.load, _spec("hangs", _pickle(tmp_path, "hangs", Sleeps(600, 0.0))),
                                        "ram")
        request = _request("slow", np.zeros((1, 2)))
        np.testing.assert_array_equal(_predict(await slow.forward(request))[1], [7.0])  # slow, within the deadline
        beside = [asyncio.create_task(slow.forward(request)) for _ in range(3)]
        await asyncio.sleep(0)
        started = time.perf_counter()
        with pytest.raises(DeadlineExceeded, match="its worker was ended"):
            await hangs.forward(_request("hangs", np.zeros((1, 2))))
        assert 1.4 < time.perf_counter() - started < 5
        assert not pool.workers[0].alive()
        for outcome in await asyncio.gather(*beside, return_exceptions=True):
            assert isinstance(outcome, (bytes, WorkerGone)), outcome  # answered before, or lost with it
        with pytest.raises(WorkerGone):
            await slow.forward(request)

    try:
        _run(loop, main)
    finally:
        pool.close()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_worker_killed_under_concurrent_forwards_ends_every_request(
        worker_env: None, tmp_path: Path, loop: str) -> None:
    healthy = make_model("sklearn", tmp_path / "healthy", seed=3)
    pool = WorkerPool(1, LoadPolicy(), load_timeout_s=30, warm=("sklearn",), directory=tmp_path / "w")
    pool.start()

    async def main() -> None:
        supervisor = asyncio.create_task(pool.supervise())
        try:
            model = await asyncio.to_thread(pool.load, _spec("healthy", healthy.path), "ram")
            request = _request("healthy", healthy.sample)
            outcomes: dict[str, int] = {"answered": 0, "gone": 0}
            others: list[BaseException] = []
            stop = asyncio.Event()

            async def client() -> None:
                while not stop.is_set():
                    try:
                        np.testing.assert_array_equal(_predict(await model.forward(request))[1],
                                                      healthy.expected["predict"])
                        outcomes["answered"] += 1
                    except WorkerGone:
                        outcomes["gone"] += 1
                        await asyncio.sleep(0.01)
                    except BaseException as exc:
                        others.append(exc)
                        return

            clients = [asyncio.create_task(client()) for _ in range(32)]
            await asyncio.sleep(0.5)
            victim = pool.workers[0].proc
            assert victim is not None
            os.kill(victim.pid, signal.SIGKILL)
            await asyncio.sleep(0.5)
            stop.set()
            await asyncio.wait_for(asyncio.gather(*clients), 10)  # no request hangs on the dead worker
            assert not others, others[:3]
            assert outcomes["answered"] > 50 and outcomes["gone"] > 0, outcomes
            assert model.lost
            with pytest.raises(WorkerGone, match="lost with its worker"):
                await model.forward(request)
            for _ in range(100):  # the supervisor restarts it
                if pool.restarts == 1 and len(pool.pids()) == 1:
                    break
                await asyncio.sleep(0.1)
            again = await asyncio.to_thread(pool.load, _spec("healthy", healthy.path), "ram")
            np.testing.assert_array_equal(_predict(await again.forward(request))[1], healthy.expected["predict"])
            await asyncio.to_thread(again.close)
            with pytest.raises(NotHere, match="unloaded"):
                await again.forward(request)
        finally:
            supervisor.cancel()

    try:
        _run(loop, main)
    finally:
        pool.close()


def test_a_model_error_crosses_as_its_class(worker_env: None, tmp_path: Path) -> None:
    pool = WorkerPool(1, LoadPolicy(), load_timeout_s=30, directory=tmp_path / "w")
    pool.start()

    async def main() -> None:
        raising = await asyncio.to_thread(
            pool.load, _spec("raises", _pickle(tmp_path, "raises", hostile.RaisesOnPredict())), "ram")
        assert isinstance(raising, RemoteModel)
        for _ in range(3):  # the connection stays in step after an error answer
            with pytest.raises(MeshError, match="the model divided by zero"):
                await raising.forward(_request("raises", np.zeros((1, 2))))
        with pytest.raises(MeshError, match="malformed request"):
            await raising.forward(b"\xff\x00garbage")
        assert len(pool.workers[0].channels().idle) == 1

    try:
        _run("asyncio", main)
    finally:
        pool.close()
