"""`mesh status`, `mesh top`, `mesh model status` and `mesh model metadata` as an operator runs them:
subprocesses against a real `mesh up` (private etcd, a router, two runtime processes) with a tokens
file. The figures they print are compared with the runtimes' own Prometheus metrics, scraped from
their /metrics endpoints; a broken model file's failure shows with its reason and expiry; a
TorchScript model answers `mesh infer` without --datatype (its metadata says FP32); a tenant's
token sees only its own models."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
import pytest

from mesh.gen.inference import grpc_service_pb2_grpc as pb_grpc
from mesh.tensors import decode_response, encode_request
from tests.e2e.test_mesh_up import MeshUp
from tests.support.models import ModelArtifact, make_model

pytestmark = [pytest.mark.e2e]

ADMIN = "admin-token-0123456789abcdef"
TEAM_A = "team-a-token-0123456789abcdef"
READER = "reader-token-0123456789abcdef"
COUNTERS = ("requests", "hits", "misses", "loads", "loadFailures", "evictions")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModelArtifact]:
    directory = tmp_path_factory.mktemp("status-models")
    return {"sklearn": make_model("sklearn", directory, 0), "torchscript": make_model("torchscript", directory, 0)}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshUp]:
    tmp = tmp_path_factory.mktemp("status-up")
    tokens = tmp / "tokens.toml"
    tokens.write_text(f"""
[[token]]
name = "admin"
role = "write"
token = "{ADMIN}"

[[token]]
name = "viewer"
role = "read"
token = "{READER}"

[[token]]
name = "team-a"
role = "write"
token = "{TEAM_A}"
prefixes = ["team-a/"]
""")
    config = tmp / "mesh.toml"
    config.write_text(f'[auth]\ntokens_file = "{tokens}"\n')
    up = MeshUp(tmp, "--runtimes", "2", "--capacity", "64MiB", "--config", str(config))
    try:
        yield up
    finally:
        assert up.stop() in (0, 130), up.text()


def cli(mesh: MeshUp, *args: str, token: str = ADMIN, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    return subprocess.run([sys.executable, "-m", "mesh", *args, "--router", mesh.address], capture_output=True,
                          text=True, timeout=timeout, env={**env, "MESH_TOKEN": token})


def ok(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    assert "Traceback" not in r.stderr
    return r.stdout


def status(mesh: MeshUp, token: str = ADMIN) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(ok(cli(mesh, "status", "--json", "--top", "20", token=token)))
    return data


def infer(mesh: MeshUp, model: str, rows: np.ndarray, n: int) -> None:
    with grpc.insecure_channel(mesh.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        for _ in range(n):
            stub.ModelInfer(encode_request(model_name=model, inputs={"input": rows}), timeout=30,
                            metadata=(("authorization", f"Bearer {ADMIN}"),))


def runtime_metrics(mesh: MeshUp) -> dict[str, dict[str, float]]:
    """Each runtime's counters from its own /metrics, by its gRPC endpoint. The runtimes' metrics
    ports are their listening ports other than the gRPC one."""
    out: dict[str, dict[str, float]] = {}
    for pid in mesh.runtime_pids():
        listening = sorted({c.laddr.port for c in psutil.Process(pid).net_connections("tcp")
                            if c.status == psutil.CONN_LISTEN})
        text, grpc_port = "", None
        for port in listening:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                    text = response.read().decode()
            except Exception:
                grpc_port = port  # not HTTP: the gRPC port (or one that does not answer HTTP)
        if not text or grpc_port is None:
            continue
        out[f"127.0.0.1:{grpc_port}"] = parse_counters(text)
    return out


def _sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        series = head[len(name):]
        if series and not series.startswith("{"):
            continue  # another metric whose name starts with this one
        if all(f'{k}="{v}"' in series for k, v in labels.items()):
            total += float(value)
    return total


def parse_counters(text: str) -> dict[str, float]:
    return {"requests": _sum(text, "modelmesh_invoke_model_milliseconds_count"),
            "hits": _sum(text, "mesh_cache_requests_total", result="hit"),
            "misses": _sum(text, "mesh_cache_requests_total", result="miss"),
            "loads": _sum(text, "modelmesh_loadmodel_milliseconds_count"),
            "loadFailures": _sum(text, "modelmesh_loadmodel_failure_total"),
            "evictions": _sum(text, "mesh_evictions_total", reason="capacity")}


def settled(mesh: MeshUp, token: str = ADMIN) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    """`mesh status --json` and the runtimes' metrics once the runtimes have published what their
    metrics count (they publish every 2 s)."""
    deadline = time.monotonic() + 20
    while True:
        data, metrics = status(mesh, token), runtime_metrics(mesh)
        by_endpoint = {i["endpoint"]: i["total"] for i in data["instances"]}
        if len(metrics) == 2 and all(by_endpoint.get(e) == {k: int(v) for k, v in m.items()}
                                     for e, m in metrics.items()):
            return data, metrics
        assert time.monotonic() < deadline, f"status never matched the metrics:\n{by_endpoint}\n{metrics}"
        time.sleep(0.5)


def test_status_and_top_show_the_numbers_the_runtime_metrics_show(mesh: MeshUp,
                                                                   models: dict[str, ModelArtifact]) -> None:
    iris = models["sklearn"]
    ok(cli(mesh, "model", "register", "ops/iris", "--type", "sklearn", "--path", str(iris.file)))
    ok(cli(mesh, "model", "register", "ops/cold", "--type", "sklearn", "--path", str(iris.file)))
    before, _ = settled(mesh)
    infer(mesh, "ops/iris", iris.sample.astype(np.float64), 25)
    infer(mesh, "ops/cold", iris.sample.astype(np.float64), 3)
    data, metrics = settled(mesh)

    # Per instance and in all, the counters are the runtimes' metrics (settled() compared each).
    total = {k: int(sum(m[k] for m in metrics.values())) for k in COUNTERS}
    assert data["total"] == total
    assert total["requests"] - before["total"]["requests"] == 28
    assert total["hits"] - before["total"]["hits"] >= 26  # the first request of each model may miss
    assert total["hits"] + total["misses"] == total["requests"]
    # All 28 requests were sent within the last minute, so the window holds them.
    assert data["window"]["requests"] >= 28 and 0 < data["windowS"] <= 66
    assert data["window"]["requests"] <= data["total"]["requests"]
    assert len(data["instances"]) == 2 and all(i["state"] == "ready" for i in data["instances"])
    assert all(d["capacityBytes"] == 64 * 2**20 for i in data["instances"] for d in i["devices"])
    assert data["modelsLoaded"] >= 2 and data["copiesLoaded"] >= 2
    assert sum(d["copies"] for i in data["instances"] for d in i["devices"]) == data["copiesLoaded"]
    hottest = [h["modelId"] for h in data["hottest"]]
    assert hottest.index("ops/iris") < hottest.index("ops/cold")

    text = ok(cli(mesh, "status"))
    assert "runtimes: 2 (2 ready)" in text
    for i in data["instances"]:
        assert i["instanceId"] in text and i["endpoint"] in text
    since = re.search(r"since the runtimes started: (\d+) requests, hit ratio \S+ \((\d+) hits, (\d+) misses\), "
                      r"(\d+) loads", text)
    assert since, text
    assert [int(g) for g in since.groups()] == [total["requests"], total["hits"], total["misses"], total["loads"]]

    # mesh top --once: the router's last-minute window, as mesh status --json reports it (no
    # traffic in between; the window may move on by one reading, so read both again if so).
    for _ in range(3):
        frame = ok(cli(mesh, "top", "--once"))
        window = status(mesh)["window"]
        shown = re.search(r"last [\d.]+ s: (\d+) requests, [\d.]+ req/s, hit rate \S+ \((\d+) hits, (\d+) misses\)",
                          frame)
        assert shown, frame
        if [int(g) for g in shown.groups()] == [window["requests"], window["hits"], window["misses"]]:
            break
    else:
        raise AssertionError(f"mesh top --once and mesh status --json disagree:\n{frame}\n{window}")
    assert int(shown.group(1)) >= 28
    lines = frame.splitlines()
    hot = lines.index(next(line for line in lines if line.startswith("HOTTEST MODELS")))
    listed = [line.split()[0] for line in lines[hot + 1:]]
    assert listed.index("ops/iris") < listed.index("ops/cold")


def test_top_refreshes_and_ends_cleanly_on_ctrl_c_and_on_a_closed_pipe(mesh: MeshUp,
                                                                       models: dict[str, ModelArtifact]) -> None:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MESH_")}, "MESH_TOKEN": ADMIN}
    command = [sys.executable, "-m", "mesh", "top", "--interval", "0.3", "--router", mesh.address]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    frames = 0
    deadline = time.monotonic() + 30
    while frames < 3 and time.monotonic() < deadline:
        if proc.stdout.readline().startswith("mesh top: router"):
            frames += 1
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)
    assert frames == 3 and proc.returncode == 0 and "Traceback" not in err, err
    # On a terminal each frame clears the screen and redraws from the top.
    master, slave = pty.openpty()
    proc = subprocess.Popen(command, stdout=slave, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                            env=env)
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + 30
    try:
        while seen.count(b"\x1b[H\x1b[2Jmesh top: router") < 2 and time.monotonic() < deadline:
            if select.select([master], [], [], 1.0)[0]:
                seen += os.read(master, 65536)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    finally:
        os.close(master)
    assert seen.count(b"\x1b[H\x1b[2Jmesh top: router") >= 2, seen[-2000:]
    assert proc.returncode == 0 and "Traceback" not in err, err
    # A reader that stops after one line (mesh top | head -1).
    shell = subprocess.run(f"{' '.join(command)} | head -1; exit ${{PIPESTATUS[0]}}", shell=True,
                           executable="/bin/bash", capture_output=True, text=True, env=env, timeout=60)
    assert shell.returncode == 0 and shell.stdout.startswith("mesh top: router"), shell
    assert "Traceback" not in shell.stderr and "BrokenPipe" not in shell.stderr, shell.stderr
    r = cli(mesh, "top", "--interval", "0")
    assert r.returncode == 2 and "--interval" in r.stderr and "Traceback" not in r.stderr


def test_model_status_shows_each_copy_and_why_a_load_failed(mesh: MeshUp, models: dict[str, ModelArtifact],
                                                            tmp_path: Path) -> None:
    iris = models["sklearn"]
    ok(cli(mesh, "model", "register", "ops/seen", "--type", "sklearn", "--path", str(iris.file), "--load-now",
           "--sync"))
    endpoints = {i["instanceId"]: i["endpoint"] for i in status(mesh)["instances"]}
    text = ok(cli(mesh, "model", "status", "ops/seen"))
    copy = re.search(r"copy on (\S+) \((\S+)\): LOADED, [\d.]+ \S+ in ram, since \d\d:\d\d:\d\d", text)
    assert copy and endpoints[copy.group(1)] == copy.group(2), text
    details = json.loads(ok(cli(mesh, "model", "status", "ops/seen", "--json")))
    assert details["status"] == "LOADED"
    assert [(c["instanceId"], c["endpoint"], c["state"], c["device"]) for c in details["copies"]] == [
        (copy.group(1), copy.group(2), "loaded", "ram")]
    assert details["copies"][0]["sizeBytes"] > 0

    broken = tmp_path / "broken.joblib"
    broken.write_bytes(b"this is not a pickle")
    ok(cli(mesh, "model", "register", "ops/broken", "--type", "sklearn", "--path", str(broken)))
    r = cli(mesh, "infer", "ops/broken", "--input", "[[1.0, 2.0, 3.0, 4.0]]")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    r = cli(mesh, "model", "status", "ops/broken")
    text = ok(r)
    assert "ops/broken: LOADING_FAILED" in text
    failed = re.findall(r"failed on (\S+): (.*) \(at \d\d:\d\d:\d\d; expires \d\d:\d\d:\d\d \(in \S+\)\)", text)
    assert failed and all(instance in endpoints for instance, _ in failed), text
    assert all("cannot load" in reason and str(broken) in reason for _, reason in failed), text
    details = json.loads(ok(cli(mesh, "model", "status", "ops/broken", "--json")))
    for f in details["failures"]:
        # The router's registry.failure_ttl_s, 300 s by default, from the failure's time.
        assert f["expiresMs"] - f["timeMs"] == 300_000 and f["kind"] == "" and f["modelId"] == "ops/broken"
    # mesh status lists it among the failures, and counts the failed loads as the metrics do.
    data, metrics = settled(mesh)
    assert "ops/broken" in {f["modelId"] for f in data["failures"]}
    assert data["total"]["loadFailures"] == sum(m["loadFailures"] for m in metrics.values()) >= 1
    assert "ops/broken on" in ok(cli(mesh, "status"))
    r = cli(mesh, "model", "status", "ops/never-registered")
    assert r.returncode == 1 and "NOT_FOUND" in r.stdout and "Traceback" not in r.stderr


def test_model_metadata_and_infer_without_datatype(mesh: MeshUp, models: dict[str, ModelArtifact]) -> None:
    iris, torch_model = models["sklearn"], models["torchscript"]
    ok(cli(mesh, "model", "register", "ops/meta-iris", "--type", "sklearn", "--path", str(iris.file)))
    text = ok(cli(mesh, "model", "metadata", "ops/meta-iris"))
    assert re.search(rf"inputs:\n  input\s+FP64\s+\[-1, {iris.n_features}\]", text), text
    assert re.search(r"outputs:\n  predict\s+\S+\s+\[-1\]", text), text
    doc = json.loads(ok(cli(mesh, "model", "metadata", "ops/meta-iris", "--json")))
    assert doc["platform"] == "sklearn" and [i["name"] for i in doc["inputs"]] == ["input"]
    assert [o["name"] for o in doc["outputs"]][:1] == ["predict"]

    ok(cli(mesh, "model", "register", "ops/torch", "--type", "torchscript", "--path", str(torch_model.file)))
    doc = json.loads(ok(cli(mesh, "model", "metadata", "ops/torch", "--json")))
    assert [(i["name"], i["datatype"]) for i in doc["inputs"]] == [("x", "FP32")]
    assert [o["name"] for o in doc["outputs"]] == ["output__0", "output__1"]
    rows = json.dumps(torch_model.sample[:2].tolist())
    # No --datatype: the JSON's numbers would be FP64, which the module refuses; metadata says FP32.
    answer = json.loads(ok(cli(mesh, "infer", "ops/torch", "--input", rows, "--json")))
    logits = np.array(answer["outputs"]["output__0"]["data"], dtype=np.float32)
    np.testing.assert_allclose(logits.reshape(2, -1), torch_model.expected["output__0"][:2], rtol=1e-4, atol=1e-5)
    assert answer["outputs"]["output__0"]["datatype"] == "FP32"
    # What the user says still wins: an explicit FP64 reaches the module, which refuses it.
    # (The module's own TorchScript traceback comes back in the message: trimming it is issue 20 part 3.)
    r = cli(mesh, "infer", "ops/torch", "--input", rows, "--datatype", "FP64")
    assert r.returncode == 1 and r.stderr.startswith("mesh: error: ")
    # sklearn: the declared FP64 for integer JSON too, and the answer is the model's.
    r = ok(cli(mesh, "infer", "ops/meta-iris", "--input", json.dumps(iris.sample[:2].tolist()), "--json"))
    assert json.loads(r)["outputs"]["predict"]["data"] == iris.expected["predict"][:2].tolist()


def test_a_tenant_token_sees_only_its_models(mesh: MeshUp, models: dict[str, ModelArtifact]) -> None:
    iris = models["sklearn"]
    ok(cli(mesh, "model", "register", "team-a/iris", "--type", "sklearn", "--path", str(iris.file), "--load-now",
           "--sync", token=TEAM_A))
    ok(cli(mesh, "model", "register", "ops/other", "--type", "sklearn", "--path", str(iris.file), "--load-now",
           "--sync"))
    with grpc.insecure_channel(mesh.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        for model in ("team-a/iris", "ops/other"):
            for _ in range(3):
                response = stub.ModelInfer(encode_request(model_name=model, inputs={"input": iris.sample}),
                                           timeout=30, metadata=(("authorization", f"Bearer {ADMIN}"),))
                assert decode_response(response)["predict"].tolist() == iris.expected["predict"].tolist()
    admin = status(mesh)
    tenant = status(mesh, token=TEAM_A)
    assert not admin["scoped"] and tenant["scoped"]
    assert {h["modelId"] for h in tenant["hottest"]} == {"team-a/iris"}
    assert "ops/other" in {h["modelId"] for h in admin["hottest"]}
    assert tenant["modelsLoaded"] == 1 and tenant["copiesLoaded"] == 1
    assert all(not f["modelId"].startswith("ops/") for f in tenant["failures"])
    assert tenant["total"] == dict.fromkeys(COUNTERS, 0) and tenant["window"] == dict.fromkeys(COUNTERS, 0)
    assert [i["instanceId"] for i in tenant["instances"]] == [i["instanceId"] for i in admin["instances"]]
    frame = ok(cli(mesh, "top", "--once", token=TEAM_A))
    assert "team-a/iris" in frame and "ops/" not in frame and "not shown" in frame
    text = ok(cli(mesh, "status", token=TEAM_A))
    assert "team-a/iris" in text and "ops/" not in text
    r = cli(mesh, "model", "status", "ops/other", token=TEAM_A)
    assert r.returncode == 1 and "PERMISSION_DENIED" in r.stderr
    # A read-only token may look; no token may not.
    assert not status(mesh, token=READER)["scoped"]
    r = cli(mesh, "status", token="")
    assert r.returncode == 1 and "UNAUTHENTICATED" in r.stderr and "Traceback" not in r.stderr
