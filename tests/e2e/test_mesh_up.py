"""`mesh up` as a user runs it: a subprocess with a private etcd, a router and two runtime
processes. 200 real models across the six formats, more than fits, each answered correctly;
evictions seen; a runtime killed with SIGKILL while traffic flows, and every request still
answered; Ctrl-C stops everything."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest

from mesh.gen.inference import grpc_service_pb2_grpc as pb_grpc
from mesh.gen.mmesh import model_mesh_pb2 as mm
from mesh.gen.mmesh import model_mesh_pb2_grpc as mm_grpc
from mesh.tensors import decode_response, encode_request
from tests.support.models import ModelArtifact, assert_outputs_match, make_fleet

pytestmark = [pytest.mark.e2e]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MeshUp:
    def __init__(self, tmp: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.rest_port = free_port()
        self.output = tmp / "mesh-up.out"
        self._out = open(self.output, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mesh", "up", "--port", str(self.port), *args],
            stdout=self._out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "MESH_LOG_LEVEL": "info", "MESH_ROUTER_REST_PORT": str(self.rest_port),
                 "XDG_STATE_HOME": str(tmp / "state"), **(env or {})})  # kept logs: not in $HOME
        deadline = time.monotonic() + 90
        # The last line `mesh up` prints at start: its hints' example model is written by then (a
        # child process that would otherwise count among its children).
        while "Ctrl-C stops everything." not in self.text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"mesh up did not start:\n{self.text()}")
            time.sleep(0.1)
        match = re.search(r"registry (etcd://\S+)", self.text())
        assert match, self.text()
        self.registry = match.group(1)

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def runtime_pids(self) -> list[int]:
        return [p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)
                if "runtime" in " ".join(p.cmdline())]

    def all_pids(self) -> list[int]:
        return [p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._out.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> list[ModelArtifact]:
    return make_fleet(tmp_path_factory.mktemp("fleet"), 200)


@pytest.fixture
def mesh_up(tmp_path: Path) -> Iterator[MeshUp]:
    # 384 KiB of model memory per runtime: the 200 models are charged their measured size, 0.1 to
    # 18 KB each (footprints of the six formats, 5 KB on average, 1 MB or more together), so
    # they cannot all stay; a load reserves its prediction first (64 KiB at least), so several
    # loads still fit at once.
    up = MeshUp(tmp_path, "--runtimes", "2", "--capacity", "384KiB")
    try:
        yield up
    finally:
        pids = up.all_pids() if up.proc.poll() is None else []
        up.stop()
        for pid in pids:  # nothing may outlive `mesh up`
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


async def _infer(stub: pb_grpc.GRPCInferenceServiceStub, model_id: str, model: ModelArtifact) -> None:
    response = await stub.ModelInfer(encode_request(model_name=model_id, inputs={"input-0": model.sample}),
                                     metadata=(("mm-model-id", model_id),), timeout=60)
    assert_outputs_match(decode_response(response), model.expected)


async def _counters(registry: str) -> dict[str, int]:
    from mesh.embedded.demo import cache_counters

    return await cache_counters(registry)


async def _scenario(up: MeshUp, fleet: list[ModelArtifact]) -> None:
    async with grpc.aio.insecure_channel(up.address) as channel:
        mesh = mm_grpc.ModelMeshStub(channel)
        v2 = pb_grpc.GRPCInferenceServiceStub(channel)
        ids = [f"{m.type}-{i:03d}" for i, m in enumerate(fleet)]
        for model_id, model in zip(ids, fleet, strict=True):
            await mesh.registerModel(mm.RegisterModelRequest(
                modelId=model_id, modelInfo=mm.ModelInfo(type=model.type, path=str(model.path))), timeout=10)

        # Every model once, eight at a time: all answers must equal the model's own predict.
        sem = asyncio.Semaphore(8)

        async def one(model_id: str, model: ModelArtifact) -> None:
            async with sem:
                await _infer(v2, model_id, model)

        await asyncio.gather(*(one(i, m) for i, m in zip(ids, fleet, strict=True)))
        await asyncio.sleep(2.5)  # runtimes publish their counters every 2 s
        counters = await _counters(up.registry)
        assert counters["loads"] >= 200
        assert counters["evictions"] > 0, counters
        assert counters["loaded_now"] < 200, counters

        # Kill one runtime with SIGKILL while 50 models are being asked for continuously.
        hot = list(zip(ids, fleet, strict=True))[:50]
        for model_id, model in hot:  # warm them up first
            await _infer(v2, model_id, model)
        failures: list[BaseException] = []
        answered = 0
        stop_at = time.monotonic() + 12

        async def traffic(offset: int) -> None:
            nonlocal answered
            k = offset
            while time.monotonic() < stop_at:
                model_id, model = hot[k % len(hot)]
                k += 7
                try:
                    await _infer(v2, model_id, model)
                    answered += 1
                except Exception as exc:  # recorded, asserted below
                    failures.append(exc)

        tasks = [asyncio.create_task(traffic(i)) for i in range(8)]
        await asyncio.sleep(3)
        victim = up.runtime_pids()[0]
        os.kill(victim, signal.SIGKILL)
        await asyncio.gather(*tasks)
        assert not failures, f"{len(failures)} failed of {answered + len(failures)}: {failures[:3]}"
        assert answered > 100
        # The supervisor restarts the killed runtime, as a Deployment would.
        deadline = time.monotonic() + 30
        while len(up.runtime_pids()) < 2 or victim in up.runtime_pids():
            assert time.monotonic() < deadline, up.text()
            await asyncio.sleep(0.2)


@pytest.mark.slow
def test_mesh_up_serves_200_models_in_six_formats_through_evictions_and_a_killed_runtime(
        mesh_up: MeshUp, fleet: list[ModelArtifact]) -> None:
    asyncio.run(_scenario(mesh_up, fleet))
    assert "restarting" in mesh_up.text()
    assert mesh_up.stop() == 0
    assert "stopping" in mesh_up.text()


def test_cli_register_infer_status_and_errors(mesh_up: MeshUp, fleet: list[ModelArtifact]) -> None:
    model = fleet[0]  # sklearn
    base = [sys.executable, "-m", "mesh"]
    router = ["--router", mesh_up.address]

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*base, *args, *router], capture_output=True, text=True, timeout=60)

    r = cli("model", "register", "iris", "--type", "sklearn", "--path", str(model.path))
    assert r.returncode == 0 and "registered iris" in r.stdout, r.stderr
    rows = model.sample[:2].tolist()
    import json

    r = cli("infer", "iris", "--input", str(rows), "--datatype", "FP32", "--json")
    assert r.returncode == 0, r.stderr
    answer = json.loads(r.stdout)
    assert answer["outputs"]["predict"]["data"] == model.expected["predict"][:2].tolist()
    r = cli("model", "status", "iris")
    assert r.returncode == 0 and "LOADED" in r.stdout
    # REST on the port `mesh up` printed: KServe V1 as its printed curl line sends it, and V2 JSON.
    rest = f"http://127.0.0.1:{mesh_up.rest_port}"
    assert f"REST: {rest}" in mesh_up.text() and f"curl -s {rest}/v1/models/iris:predict" in mesh_up.text()
    import urllib.request

    def post(path: str, doc: object) -> dict[str, object]:
        request = urllib.request.Request(rest + path, data=json.dumps(doc).encode(), method="POST")
        with urllib.request.urlopen(request, timeout=60) as answer:
            return dict(json.loads(answer.read()))

    assert post("/v1/models/iris:predict", {"instances": rows})["predictions"] == model.expected["predict"][:2].tolist()
    v2 = post("/v2/models/iris/infer", {"inputs": [{"name": "input-0", "shape": [2, len(rows[0])],
                                                     "datatype": "FP32", "data": rows}]})
    outputs = {o["name"]: o["data"] for o in v2["outputs"]}  # type: ignore[attr-defined]
    assert outputs["predict"] == model.expected["predict"][:2].tolist()
    r = cli("model", "list", "--json")
    assert [m["modelId"] for m in json.loads(r.stdout)] == ["iris"]
    r = cli("infer", "missing", "--input", "[[1, 2]]")
    assert r.returncode == 1 and "NOT_FOUND" in r.stderr and "missing" in r.stderr
    assert "Traceback" not in r.stderr
    r = cli("infer", "iris", "--input", "[[1, 2")
    assert r.returncode == 2 and "not valid JSON" in r.stderr
    r = cli("vmodel", "set", "prod", "iris")
    assert r.returncode == 0 and "DEFINED" in r.stdout, r.stderr
    r = cli("infer", "prod", "--vmodel", "--input", str(rows), "--datatype", "FP32")
    assert r.returncode == 0 and "predict" in r.stdout, r.stderr
    r = cli("model", "unregister", "iris")
    assert r.returncode == 1 and "FAILED_PRECONDITION" in r.stderr  # prod still uses it
    assert cli("vmodel", "delete", "prod").returncode == 0
    assert cli("model", "unregister", "iris").returncode == 0
    r = subprocess.run([*base, "model", "list", "--router", "127.0.0.1:1"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "cannot reach the router" in r.stderr


def _etcd_pid(up: MeshUp) -> int:
    return next(p.pid for p in psutil.Process(up.proc.pid).children() if "etcd" in p.name())


def _gone(pid: int) -> bool:
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


async def _register_and_list(address: str, model_id: str, path: str) -> list[str]:
    async with grpc.aio.insecure_channel(address) as channel:
        mesh = mm_grpc.ModelMeshStub(channel)
        await mesh.registerModel(mm.RegisterModelRequest(
            modelId=model_id, modelInfo=mm.ModelInfo(type="sklearn", path=path)), timeout=10)
        listed = await mesh.listModels(mm.ListModelsRequest(), timeout=10)
        return [m.modelId for m in listed.models]


def test_mesh_up_restarts_its_etcd_and_takes_its_children_along_when_killed(tmp_path: Path) -> None:
    """etcd SIGKILLed under `mesh up`: the supervisor says so on the console and starts it again on
    the same data and ports, and the registry (with what it held) answers again. Then `mesh up`
    itself SIGKILLed: no process it started outlives it (parent-death signal, mesh.procs)."""
    up = MeshUp(tmp_path, "--runtimes", "1")
    try:
        model = tmp_path / "m.joblib"
        from loadtest.models import train_logistic

        model = train_logistic("m", tmp_path, n_features=4, seed=1).path
        assert asyncio.run(_register_and_list(up.address, "before", str(model))) == ["before"]
        first = _etcd_pid(up)
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while "etcd restarted" not in up.text():
            assert time.monotonic() < deadline, up.text()
            time.sleep(0.1)
        assert "etcd exited (killed by SIGKILL); restarting" in up.text()
        assert _etcd_pid(up) != first

        async def management_back() -> list[str]:
            for _ in range(100):  # the router's registry client reconnects within a few seconds
                try:
                    return await _register_and_list(up.address, "after", str(model))
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.2)
            raise AssertionError("management did not come back:\n" + up.text())

        assert asyncio.run(management_back()) == ["after", "before"]  # the data survived the restart

        children = up.all_pids()
        assert len(children) == 3  # etcd, router, runtime
        up.proc.kill()
        up.proc.wait(10)
        deadline = time.monotonic() + 30
        while not all(_gone(pid) for pid in children):
            assert time.monotonic() < deadline, [pid for pid in children if not _gone(pid)]
            time.sleep(0.2)
    finally:
        up.stop()
