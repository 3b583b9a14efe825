"""``python -m loadtest.scenarios.scale`` end to end with tiny steps, and the registration-path
changes it came with, pinned.

The scenario runs as a user runs it (a child process: it installs its own SIGTERM handler and
logging), growing a real etcd behind a real router to 500 and then 2,000 registrations; it must
register every model, find them all in etcd and in ``listModels``, answer every warm inference and
cold lookup, report positive memory figures, and leave no process behind. About 20 s on two cores.

Pinned: the router counts registrations with a count-only read (``KVStore.count_prefix``), which
must agree with a listing in both stores and ignore keys that merely share the prefix's beginning.
(That a registration's answer comes from the router's view with unchanged semantics is pinned in
tests/integration/test_mesh_api.py.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from loadtest.report import REPO
from mesh.gen.mmesh import model_mesh_pb2 as mm
from mesh.registry.etcd import EtcdStore
from mesh.registry.etcd_server import EtcdProcess
from mesh.registry.memory import MemoryStore
from mesh.registry.records import ModelSpec
from mesh.registry.registry import Registry

pytestmark = pytest.mark.integration

ST = mm.ModelStatusInfo
STEPS = (500, 2_000)
WARM = 3
LOOKUPS = 40


@pytest.fixture(scope="module")
def scale_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], dict]:
    out = tmp_path_factory.mktemp("scale") / "scale.json"
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest.scenarios.scale", "--models", ",".join(map(str, STEPS)),
         "--warm-models", str(WARM), "--warm-requests", "60", "--lookups", str(LOOKUPS),
         "--spec-cache", "100", "--in-flight", "64", "--time-limit", "120", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=180)
    result = json.loads(out.read_text())["result"] if out.exists() else {}
    return proc, result


def test_scale_scenario_registers_measures_and_stops_everything(
        scale_run: tuple[subprocess.CompletedProcess[str], dict]) -> None:
    proc, result = scale_run
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    steps = result["steps"]
    assert [s["models"] for s in steps] == [0, *STEPS]
    previous = 0
    for step in steps:
        n = step["models"]
        if n:
            reg = step["register"]
            assert reg["registered"] == reg["added"] == n - previous and reg["errors"] == {}
            assert reg["per_second"] > 0 and reg["cpu_ms_per_registration"]["router"] > 0
            # every cold lookup was of a registered, unloaded model the router had to read from etcd
            for key in ("model_ready", "get_model_status"):
                assert step[key]["ok"] == LOOKUPS and step[key]["errors"] == {}, step[key]
                assert step[key]["p50_ms"] > 0
        previous = n
        assert step["memory"]["models_in_etcd"] == n + WARM
        assert step["list"]["listed"] == n + WARM
        assert step["warm_infer"]["ok"] == 60 and step["warm_infer"]["errors"] == {}
        for proc_name in ("router", "etcd"):
            assert step["memory"][proc_name]["rss_mb"] > 0 and step["memory"][proc_name]["uss_mb"] > 0
        assert step["memory"]["etcd_quota_mb"] > 0
    assert steps[-1]["memory"]["etcd_db_mb"] > 0
    assert result["survivors"] == []
    assert not [p for p in result["pids"].values() if psutil.pid_exists(p)
                and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert "| 500 -> 2,000" in proc.stdout and "etcd backend quota" in proc.stdout


def test_bad_steps_are_one_line_usage_errors() -> None:
    proc = subprocess.run([sys.executable, "-m", "loadtest.scenarios.scale", "--models", "2000,500"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "increasing" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("kind", ["memory", "etcd"])
async def test_count_models_is_a_count_only_read_that_agrees_with_a_listing(
        kind: str, tmp_path: Path) -> None:
    etcd = EtcdProcess(tmp_path / "etcd") if kind == "etcd" else None
    if etcd is not None:
        etcd.start()
    store: MemoryStore | EtcdStore = EtcdStore([etcd.endpoint]) if etcd else MemoryStore()
    try:
        registry = Registry(store, "/mesh/")
        assert await registry.count_models() == 0
        for i in range(25):
            await registry.register_model(ModelSpec(model_id=f"m-{i:02d}", type="sklearn", path=f"/m/{i}"))
        await store.put("/mesh/modelsX/not-a-model", b"x")  # shares the prefix's letters, not its slash
        await store.put("/mesh/vmodels/v", b"{}")
        assert await registry.count_models() == 25 == len(await registry.list_models())
        assert await store.count_prefix("/mesh/models/m-1") == 10
        await registry.delete_model("m-00")
        assert await registry.count_models() == 24
        assert await store.count_prefix("/nothing/") == 0
    finally:
        await store.close()
        if etcd is not None:
            etcd.stop()
