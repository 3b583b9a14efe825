"""Model workers (``mesh.runtime.workers``): model code in processes of their own, for real.

Real worker processes (``python -m mesh.runtime.worker``) started by a real ``WorkerPool``, real
models trained here, real signals. Asserted: loads spread over the workers and answer like the
in-process loaders; a worker's environment holds no ``MESH_*`` setting and no secret of the
runtime's; a model whose code raises answers its message; one whose code kills its worker
(SIGSEGV, or SIGKILL from outside) takes only that worker's models, which answer "not here"
(the router's cue to retry elsewhere) and are reported lost, while the other worker's models keep
answering; the worker comes back and loads again; a load that hangs past the timeout ends its
worker instead of holding a thread forever.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
from pathlib import Path

import joblib
import numpy as np
import pytest

from mesh.errors import DeadlineExceeded, InvalidArgument, MeshError, ModelLoadError, NotHere, ResourceExhausted
from mesh.gen.inference import grpc_service_pb2 as pb
from mesh.registry.records import ModelSpec
from mesh.runtime.loaders.base import LoadPolicy
from mesh.runtime.service import load_model
from mesh.runtime.workers import WorkerGone, WorkerPool
from mesh.tensors import decode_response, encode_request, infer_bytes
from tests.support import hostile
from tests.support.models import ModelArtifact, make_model

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

REPO = str(Path(__file__).resolve().parents[2])


@pytest.fixture()
def pool(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("PYTHONPATH", REPO)  # the hostile models' module, importable in the workers
    monkeypatch.setenv("MESH_REGISTRY_PASSWORD", "etcd-secret-123")  # the runtime's, never a worker's
    lost: list[str] = []

    async def on_lost(model_ids: list[str]) -> None:
        lost.extend(model_ids)

    workers = WorkerPool(2, LoadPolicy(), load_timeout_s=3, warm=("sklearn",), on_lost=on_lost,
                         directory=tmp_path / "workers")
    workers.lost = lost  # type: ignore[attr-defined]
    workers.start()
    try:
        yield workers
    finally:
        workers.close()


def _spec(model_id: str, model_type: str, path: Path) -> ModelSpec:
    return ModelSpec(model_id=model_id, type=model_type, path=str(path))


def _body(model_id: str, sample: np.ndarray) -> bytes:
    return encode_request(model_name=model_id, inputs={"input-0": sample}).SerializeToString()


def _pickle(tmp_path: Path, name: str, obj: object) -> Path:
    path = tmp_path / name / "model.joblib"
    path.parent.mkdir(parents=True)
    joblib.dump(obj, path)
    return path


def test_loads_spread_and_answer_as_in_process(pool: WorkerPool, tmp_path: Path) -> None:
    models: list[tuple[str, ModelArtifact]] = [(f"{t}-{i}", make_model(t, tmp_path / f"{t}-{i}", seed=i))
                                               for i, t in enumerate(["sklearn", "lightgbm", "xgboost", "sklearn"])]
    remote = {mid: pool.load(_spec(mid, m.type, m.path), "ram") for mid, m in models}
    assert sorted(len(w.models) for w in pool.workers) == [2, 2]  # spread over both
    for mid, m in models:
        body = _body(mid, m.sample)
        local = load_model(_spec(mid, m.type, m.path), "ram")
        assert remote[mid].infer_bytes(body) == infer_bytes(local, mid, body)  # byte for byte
        assert remote[mid].platform == local.platform and remote[mid].inputs == local.inputs
        assert remote[mid].footprint_bytes() > 0
    mid, m = models[0]
    with pytest.raises(InvalidArgument, match="malformed request"):
        remote[mid].infer_bytes(b"\xff\x00garbage")
    request = encode_request(model_name=mid, inputs={"input-0": m.sample})
    request.outputs.add(name="nope")
    with pytest.raises(InvalidArgument, match="unknown output 'nope'"):
        remote[mid].infer_bytes(request.SerializeToString())
    with pytest.raises(ModelLoadError, match=r"missing.joblib. does not exist"):
        pool.load(_spec("missing", "sklearn", tmp_path / "missing.joblib"), "ram")
    remote[mid].close()  # unloaded in its worker: a later call is "not here"
    with pytest.raises(NotHere):
        remote[mid].infer_bytes(_body(mid, m.sample))


def test_a_workers_environment_holds_no_secret(pool: WorkerPool) -> None:
    for pid in pool.pids():
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert b"etcd-secret-123" not in environ and b"MESH_" not in environ
        assert Path(f"/proc/{pid}/cwd").resolve() == Path("/")  # its home is not on its import path
        home = Path(environ.split(b"HOME=")[1].split(b"\0")[0].decode())
        assert home.parent == pool.directory and oct(pool.directory.stat().st_mode & 0o777) == "0o700"
        assert b" -P -s -m mesh.runtime.worker" in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")


async def test_model_code_that_raises_or_kills_its_worker_takes_only_that_worker(
        pool: WorkerPool, tmp_path: Path) -> None:
    supervisor = asyncio.create_task(pool.supervise())
    try:
        healthy = make_model("sklearn", tmp_path / "healthy", seed=3)
        crashing = pool.load(_spec("crashes", "sklearn", _pickle(tmp_path, "crashes", hostile.CrashesOnPredict())),
                             "ram")
        ok = pool.load(_spec("healthy", "sklearn", healthy.path), "ram")  # the emptier worker: the other
        raising = pool.load(_spec("raises", "sklearn", _pickle(tmp_path, "raises", hostile.RaisesOnPredict())), "ram")
        sample = np.zeros((1, 2))
        with pytest.raises(MeshError, match="the model divided by zero"):
            await asyncio.to_thread(raising.infer_bytes, _body("raises", sample))
        doomed = {m for w in pool.workers for m in w.models if "crashes" in w.models}
        assert "crashes" in doomed and "healthy" not in doomed  # spread: the healthy one is elsewhere

        with pytest.raises(WorkerGone):  # its worker died under the call: "not here", retried elsewhere
            await asyncio.to_thread(crashing.infer_bytes, _body("crashes", sample))
        for _ in range(50):
            if sorted(pool.lost) == sorted(doomed):  # type: ignore[attr-defined]
                break
            await asyncio.sleep(0.1)
        assert sorted(pool.lost) == sorted(doomed)  # type: ignore[attr-defined]
        answer = decode_response(pb.ModelInferResponse.FromString(
            await asyncio.to_thread(ok.infer_bytes, _body("healthy", healthy.sample))))
        np.testing.assert_array_equal(answer["predict"], healthy.expected["predict"])
        for _ in range(100):  # the supervisor restarts it
            if len(pool.pids()) == 2:
                break
            await asyncio.sleep(0.1)
        assert len(pool.pids()) == 2 and pool.restarts == 1
        again = await asyncio.to_thread(pool.load, _spec("raises", "sklearn", tmp_path / "raises"), "ram")
        with pytest.raises(MeshError, match="divided by zero"):
            await asyncio.to_thread(again.infer_bytes, _body("raises", sample))

        # SIGKILL from outside (the OOM killer): the same.
        victim = next(w for w in pool.workers if "healthy" in w.models)
        assert victim.proc is not None
        os.kill(victim.proc.pid, signal.SIGKILL)
        with pytest.raises(WorkerGone):
            for _ in range(50):
                await asyncio.to_thread(ok.infer_bytes, _body("healthy", healthy.sample))
                await asyncio.sleep(0.05)
    finally:
        supervisor.cancel()


async def test_a_load_that_hangs_ends_its_worker(pool: WorkerPool, tmp_path: Path) -> None:
    supervisor = asyncio.create_task(pool.supervise())
    try:
        healthy = make_model("sklearn", tmp_path / "healthy", seed=4)
        with pytest.raises(DeadlineExceeded, match="its worker was ended"):
            await asyncio.to_thread(pool.load, _spec("hangs", "sklearn", _pickle(tmp_path, "hangs", hostile.Hangs())),
                                    "ram")
        model = await asyncio.to_thread(pool.load, _spec("healthy", "sklearn", healthy.path), "ram")
        answer = decode_response(pb.ModelInferResponse.FromString(
            await asyncio.to_thread(model.infer_bytes, _body("healthy", healthy.sample))))
        np.testing.assert_array_equal(answer["predict"], healthy.expected["predict"])
        for _ in range(100):
            if len(pool.pids()) == 2:
                break
            await asyncio.sleep(0.1)
        assert len(pool.pids()) == 2 and pool.restarts == 1
    finally:
        supervisor.cancel()


async def test_a_worker_killed_under_load_fails_no_request(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Through a real router: two runtimes with two workers each, 8 clients on 8 models; one
    worker gets SIGKILL mid-run. Its models' requests answer "not here" once, and the router
    retries them (elsewhere, or reloaded in the restarted worker): no client sees a failure. The
    runtimes run in this process, which they make non-dumpable."""
    from mesh.tensors import encode_request as encode
    from tests.support.inprocess import InProcessMesh, memory_url

    monkeypatch.setenv("PYTHONPATH", REPO)
    models = [make_model("sklearn", tmp_path / f"m{i}", seed=i) for i in range(8)]
    mesh = InProcessMesh(memory_url(), runtime_overrides={"workers": 2})
    await mesh.start(runtimes=2)
    try:
        for i, m in enumerate(models):
            await mesh.register(f"m{i}", "sklearn", str(m.path))
            await mesh.infer(f"m{i}", encode(model_name=f"m{i}", inputs={"input-0": m.sample}))
        import psutil

        workers = [p for p in psutil.Process().children(recursive=True)
                   if "mesh.runtime.worker" in " ".join(p.cmdline())]
        assert len(workers) == 4
        assert ctypes.CDLL(None).prctl(3, 0, 0, 0, 0) == 0  # PR_GET_DUMPABLE: the runtime is not dumpable
        failures: list[str] = []
        answered = 0
        stop = asyncio.Event()

        async def client(k: int) -> None:
            nonlocal answered
            while not stop.is_set():
                i = k % len(models)
                k += 3
                try:
                    request = encode(model_name=f"m{i}", inputs={"input-0": models[i].sample})
                    response = await mesh.infer(f"m{i}", request)
                    np.testing.assert_array_equal(decode_response(response)["predict"], models[i].expected["predict"])
                    answered += 1
                except Exception as exc:  # counted, asserted below
                    failures.append(repr(exc)[:300])

        clients = [asyncio.create_task(client(k)) for k in range(8)]
        await asyncio.sleep(1.5)
        victim = max(workers, key=lambda p: p.memory_info().rss)  # one holding models
        victim.kill()
        await asyncio.sleep(4)
        stop.set()
        await asyncio.gather(*clients)
        assert not failures, (len(failures), failures[:3])
        assert answered > 200
    finally:
        await mesh.stop()
    assert ctypes.CDLL(None).prctl(3, 0, 0, 0, 0) == 1  # dumpable again once the runtimes stopped


def test_a_model_that_balloons_fails_its_own_load(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A worker's models may take ``max_model_bytes`` (256 MiB here) beyond its libraries: a
    pickle that allocates 2 GiB while loading fails that load, and the worker serves on."""
    monkeypatch.setenv("PYTHONPATH", REPO)
    pool = WorkerPool(1, LoadPolicy(), load_timeout_s=30, max_model_bytes=256 << 20, directory=tmp_path / "w")
    pool.start()
    try:
        with pytest.raises(ModelLoadError, match="MemoryError"):
            pool.load(_spec("balloon", "sklearn", _pickle(tmp_path, "balloon", hostile.Balloons())), "ram")
        healthy = make_model("sklearn", tmp_path / "healthy", seed=5)
        model = pool.load(_spec("healthy", "sklearn", healthy.path), "ram")
        answer = decode_response(pb.ModelInferResponse.FromString(model.infer_bytes(_body("healthy", healthy.sample))))
        np.testing.assert_array_equal(answer["predict"], healthy.expected["predict"])
        assert len(pool.pids()) == 1 and pool.restarts == 0
    finally:
        pool.close()


async def test_runaway_predictions_and_answers_cost_only_their_own_request(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A predict that hangs ends its worker at ``predict_timeout_s`` (DEADLINE_EXCEEDED, then a
    restart); an answer over the message limit is refused before it is read (RESOURCE_EXHAUSTED),
    its worker serving on; a model's print() breaks nothing; and an evicted copy's unload never
    removes the newer copy of the same model loaded meanwhile in the same worker."""
    monkeypatch.setenv("PYTHONPATH", REPO)
    pool = WorkerPool(1, LoadPolicy(), load_timeout_s=30, predict_timeout_s=2, max_answer_bytes=1 << 20,
                      directory=tmp_path / "w")
    pool.start()
    supervisor = asyncio.create_task(pool.supervise())
    try:
        sample = np.zeros((1, 2))
        huge = pool.load(_spec("huge", "sklearn", _pickle(tmp_path, "huge", hostile.HugeOutput())), "ram")
        with pytest.raises(ResourceExhausted, match="over the limit of 1048576"):
            await asyncio.to_thread(huge.infer_bytes, _body("huge", sample))
        healthy = make_model("sklearn", tmp_path / "healthy", seed=6)
        old = await asyncio.to_thread(pool.load, _spec("healthy", "sklearn", healthy.path), "ram")
        new = await asyncio.to_thread(pool.load, _spec("healthy", "sklearn", healthy.path), "ram")
        await asyncio.to_thread(old.close)  # the evicted copy goes; the new one stays
        answer = decode_response(pb.ModelInferResponse.FromString(
            await asyncio.to_thread(new.infer_bytes, _body("healthy", healthy.sample))))
        np.testing.assert_array_equal(answer["predict"], healthy.expected["predict"])
        assert pool.restarts == 0

        hangs = pool.load(_spec("hangs", "sklearn", _pickle(tmp_path, "hangs", hostile.HangsOnPredict())), "ram")
        with pytest.raises(DeadlineExceeded, match="its worker was ended"):
            await asyncio.to_thread(hangs.infer_bytes, _body("hangs", sample))
        for _ in range(100):
            if pool.restarts == 1 and len(pool.pids()) == 1:
                break
            await asyncio.sleep(0.1)
        assert pool.restarts == 1 and len(pool.pids()) == 1
        with pytest.raises(WorkerGone):
            await asyncio.to_thread(new.infer_bytes, _body("healthy", healthy.sample))  # lost with the worker
    finally:
        supervisor.cancel()
        pool.close()
