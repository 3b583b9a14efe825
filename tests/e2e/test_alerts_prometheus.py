"""deploy/monitoring/alerts.yaml in a real Prometheus scraping a real mesh, firing on staged failures.

Real: `mesh up` (a private etcd, a router and a runtime process) and Prometheus (Debian's
`prometheus` package, installed by `scripts/install-test-deps`) on 127.0.0.1, scraping every second
the metrics endpoints `mesh up` printed, as jobs `mesh-router` and `mesh-runtime` (the names the
rules select, as the Prometheus Operator names the jobs of deploy/'s Services). The rules are
loaded as shipped but for their `for:` durations, shortened to one second, so that an alert fires
within seconds. Staged failures: two models whose files are not models, requested, so that every
load fails (MeshModelLoadFailures); then the runtime frozen with SIGSTOP, so that its scrapes time
out (MeshRuntimeDown). A healthy router must not be reported down. promtool's unit tests cover
every alert (tests/unit/test_alert_rules.py); this test shows the rules load and work against the
series a real mesh exposes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
import pytest
import yaml

from mesh.gen.inference import grpc_service_pb2_grpc as pb_grpc
from mesh.gen.mmesh import model_mesh_pb2 as mm
from mesh.gen.mmesh import model_mesh_pb2_grpc as mm_grpc
from mesh.tensors import encode_request
from tests.e2e.test_dashboard_prometheus import Prometheus, free_port
from tests.e2e.test_mesh_up import MeshUp

pytestmark = [pytest.mark.e2e]

RULES = Path(__file__).resolve().parents[2] / "deploy" / "monitoring" / "alerts.yaml"


def _start_prometheus(tmp: Path, router: str, runtime: str) -> Prometheus:
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "1s"
    (tmp / "alerts.yaml").write_text(yaml.safe_dump(rules))
    prometheus = Prometheus.__new__(Prometheus)
    prometheus.port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "900ms", "evaluation_interval": "1s"},
        "rule_files": [str(tmp / "alerts.yaml")],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": [target], "labels": {"namespace": "mesh-test"}}]}
            for job, target in (("mesh-router", router), ("mesh-runtime", runtime))],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    binary = Prometheus.__init__.__globals__["shutil"].which("prometheus")
    assert binary, "prometheus is not installed: run scripts/install-test-deps"
    prometheus.proc = subprocess.Popen(
        [binary, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prometheus.port}", "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=(tmp / "prometheus.log").open("w"))
    return prometheus


def _alerts(prometheus: Prometheus) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for alert in prometheus.get("/api/v1/alerts")["data"]["alerts"]:
        out.setdefault(alert["labels"]["alertname"], []).append(alert)
    return out


def _wait_firing(prometheus: Prometheus, name: str, timeout: float = 60) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        firing = [a for a in _alerts(prometheus).get(name, []) if a["state"] == "firing"]
        if firing:
            return firing
        assert time.monotonic() < deadline, f"{name} did not fire: {_alerts(prometheus)}"
        time.sleep(0.5)


def _endpoint(text: str, name: str) -> str:
    line = next(line for line in text.splitlines() if line.startswith(f"  {name} "))
    return line.split()[1].removeprefix("http://").removesuffix("/metrics")


def test_alert_rules_fire_in_a_real_prometheus_on_staged_failures(tmp_path: Path) -> None:
    up = MeshUp(tmp_path, "--runtimes", "1")
    prometheus = None
    frozen = None
    try:
        prometheus = _start_prometheus(tmp_path, _endpoint(up.text(), "router"), _endpoint(up.text(), "runtime-0"))
        prometheus.wait_ready()
        # Every rule of the file is loaded, none in error.
        groups = prometheus.get("/api/v1/rules")["data"]["groups"]
        loaded = [r for g in groups for r in g["rules"]]
        assert len(loaded) == len(yaml.safe_load(RULES.read_text())["groups"][0]["rules"])
        assert all(r["health"] != "err" for r in loaded), loaded
        # Both targets scraped before anything is staged: a counter first seen at 1 shows no increase.
        deadline = time.monotonic() + 30
        while len(prometheus.query("up == 1")["data"]["result"]) < 2:
            assert time.monotonic() < deadline, prometheus.query("up")
            time.sleep(0.2)

        # Staged failure 1: models that cannot load, requested.
        with grpc.insecure_channel(up.address) as channel:  # in-process calls: no CLI start-up to wait for
            management = mm_grpc.ModelMeshStub(channel)  # type: ignore[no-untyped-call]
            inference = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
            for name in ("broken-a", "broken-b"):
                bad = tmp_path / f"{name}.joblib"
                bad.write_bytes(b"not a model")
                management.registerModel(mm.RegisterModelRequest(
                    modelId=name, modelInfo=mm.ModelInfo(type="sklearn", path=str(bad))), timeout=30)
                request = encode_request(model_name=name, inputs={"input-0": np.ones((1, 4))})
                with pytest.raises(grpc.RpcError) as refused:
                    inference.ModelInfer(request, metadata=(("mm-model-id", name),), timeout=60)
                assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # the load failed
        (failing,) = _wait_firing(prometheus, "MeshModelLoadFailures")
        assert failing["labels"]["namespace"] == "mesh-test" and failing["labels"]["severity"] == "warning"
        assert "of model loads failed" in failing["annotations"]["summary"]

        # Staged failure 2: the runtime frozen, so its scrapes time out.
        frozen = up.runtime_pids()[0]
        os.kill(frozen, signal.SIGSTOP)
        (down,) = _wait_firing(prometheus, "MeshRuntimeDown")
        assert down["labels"]["job"] == "mesh-runtime"
        assert down["labels"]["instance"] == _endpoint(up.text(), "runtime-0")
        assert "MeshRouterDown" not in _alerts(prometheus)  # the router answered every scrape
    finally:
        if frozen is not None and psutil.pid_exists(frozen):
            os.kill(frozen, signal.SIGCONT)
        if prometheus is not None:
            prometheus.stop()
        assert up.stop() == 0
