"""The Grafana dashboard against a real Prometheus scraping a live mesh.

Real: Prometheus (Debian's `prometheus` package, installed by `scripts/install-test-deps`) on
127.0.0.1, scraping every second the `/metrics` of a router and two runtimes that serve real
scikit-learn models in this process (gRPC on 127.0.0.1, a `memory://` registry). The test drives
hits, cold misses, evictions (the runtimes have room for a few models only), a load failure, an
unknown model, a hot model that gets a second copy and a pinned model, then evaluates every PromQL
expression of `deploy/grafana/mesh-dashboard.json` through Prometheus' HTTP API and asserts that
each parses and returns data. Grafana's own variables are replaced the way Grafana would with
"All" selected (`$namespace`, `$instance`, `$model` -> `.*`, `$__rate_interval` -> `30s`).

This machine has no GPU: runtime-b is given a stand-in GPU (``tests.support.fake_gpu``: NVML
answered by the test), so that the per-GPU panels have series to show.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from mesh.gen.inference import grpc_service_pb2 as pb
from mesh.tensors import encode_request
from tests.support.fake_gpu import FakeGpus, StandInGpuMemory, stand_in_load
from tests.support.inprocess import InProcessMesh, memory_url
from tests.support.models import make_model

pytestmark = pytest.mark.e2e

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "mesh-dashboard.json"
NAMESPACE = "mesh-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expression) for every target of every panel."""
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


def variable_queries() -> list[tuple[str, str]]:
    """The template variables' ``label_values(selector, label)`` as PromQL (``group by (label)``)."""
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for var in dash["templating"]["list"]:
        if var["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", var["definition"])
        assert m, f"variable {var['name']}: unexpected query {var['definition']!r}"
        out.append((f"variable {var['name']}", f"group by ({m.group(2)}) ({m.group(1)})"))
    return out


def grafana_substitute(expr: str) -> str:
    expr = expr.replace("$__rate_interval", "30s")
    return re.sub(r"\$(namespace|instance|model)\b", ".*", expr)


class Prometheus:
    def __init__(self, tmp: Path, targets: dict[str, str]) -> None:
        binary = shutil.which("prometheus")
        assert binary, "prometheus is not installed: run scripts/install-test-deps"
        self.port = free_port()
        config = tmp / "prometheus.yml"
        jobs = "\n".join(
            f"  - job_name: {job}\n    scrape_interval: 1s\n    static_configs:\n"
            f"      - targets: ['{target}']\n        labels: {{namespace: {NAMESPACE}}}"
            for job, target in targets.items())
        config.write_text(f"global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n{jobs}\n")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=(tmp / "prometheus.log").open("w"))

    def get(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read()) if path.startswith("/api") else response.read()

    def query(self, expr: str) -> dict[str, Any]:
        try:
            return self.get("/api/v1/query", query=expr)  # type: ignore[no-any-return]
        except urllib.error.HTTPError as exc:  # a 400 carries Prometheus' parse error
            return json.loads(exc.read())  # type: ignore[no-any-return]

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.get("/-/ready")
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def ports() -> Iterator[dict[str, int]]:
    yield {"router": free_port(), "runtime-a": free_port(), "runtime-b": free_port()}


async def test_every_dashboard_query_returns_data(tmp_path: Path, ports: dict[str, int]) -> None:
    models = [make_model("sklearn", tmp_path / "models", seed=s) for s in range(3)]
    broken = tmp_path / "models" / "broken"
    broken.mkdir()
    (broken / "model.joblib").write_bytes(b"not a model")
    mesh = InProcessMesh(memory_url(),
                         router_overrides={"metrics_port": ports["router"], "per_model_metrics": True,
                                           "scale_rps_threshold": 5.0, "min_copies_check_s": 0.5},
                         runtime_overrides={"capacity_bytes": 640 * 1024, "per_model_metrics": True})
    await mesh.add_runtime(metrics_port=ports["runtime-a"])
    gpus = FakeGpus([64 * 1024 * 1024])
    stand_in = StandInGpuMemory(gpus, mesh.settings().runtime)
    await mesh.add_runtime(metrics_port=ports["runtime-b"],
                           serve_kwargs={"gpus": stand_in, "load_fn": stand_in_load(gpus)})
    await mesh.start(runtimes=0)
    prometheus = Prometheus(tmp_path, {"router": f"127.0.0.1:{ports['router']}",
                                       "runtime-a": f"127.0.0.1:{ports['runtime-a']}",
                                       "runtime-b": f"127.0.0.1:{ports['runtime-b']}"})
    try:
        await asyncio.to_thread(prometheus.wait_ready)
        n_models = 80
        for i in range(n_models):
            await mesh.register(f"tenant-{i}", "sklearn", str(models[i % 3].path))
        await mesh.register("pinned", "sklearn", str(models[0].path), minCopies=1)
        await mesh.register("broken", "sklearn", str(broken))
        requests = [encode_request(model_name="", inputs={"input-0": m.sample}) for m in models]
        deadline = time.monotonic() + 12
        while time.monotonic() < deadline:  # a few rounds of every model, and a hot one throughout
            for i in range(n_models):
                await mesh.infer(f"tenant-{i}", requests[i % 3])
                await asyncio.gather(*(mesh.infer("tenant-0", requests[0]) for _ in range(3)))
            for name in ("broken", "no-such-model"):
                with pytest.raises(grpc.aio.AioRpcError):  # the status codes are asserted through metrics
                    await mesh.infer(name, pb.ModelInferRequest())
        await asyncio.sleep(3)  # a few more scrapes after the last request

        up = await asyncio.to_thread(prometheus.query, "up")
        assert {r["metric"]["job"]: r["value"][1] for r in up["data"]["result"]} == {
            "router": "1", "runtime-a": "1", "runtime-b": "1"}
        failures = []
        for title, expr in dashboard_queries() + variable_queries():
            answer = await asyncio.to_thread(prometheus.query, grafana_substitute(expr))
            if answer.get("status") != "success":
                failures.append(f"{title}: {expr}\n    error: {answer.get('error')}")
            elif not answer["data"]["result"]:
                failures.append(f"{title}: {expr}\n    no data")
        assert not failures, "dashboard queries failing:\n" + "\n".join(failures)
    finally:
        prometheus.stop()
        await mesh.stop()


def test_dashboard_filters_every_query_by_its_variables() -> None:
    """Every panel follows the namespace variable, and runtime panels the instance variable too, so
    that choosing a namespace or instance in Grafana narrows every panel."""
    dash = json.loads(DASHBOARD.read_text())
    assert [v["name"] for v in dash["templating"]["list"]] == ["datasource", "namespace", "instance", "model"]
    router_only = re.compile(r"modelmesh_api_request|modelmesh_models_|mesh_copy_changes|mesh_models_by_copies"
                             r"|mesh_router_instances")
    for title, expr in dashboard_queries():
        assert 'namespace=~"$namespace"' in expr, title
        if not router_only.search(expr):
            assert 'instance=~"$instance"' in expr, title
