"""The REST benchmarks with tiny settings: they run, report every figure, and stop what they start.

- ``loadtest.scenarios.rest_codec`` (no server): in this process, a few seconds.
- ``loadtest.scenarios.rest`` (an etcd, a runtime and a router with REST on): as a user runs it, in a
  child process with ``TMPDIR`` inside the test's folder (the scenario turns SIGTERM into
  ``SystemExit`` and reconfigures logging for its process); about 10 s on two cores, so not slow.
- ``loadtest.scenarios.peers --protocol both`` for our mesh and MLServer (slow: two systems, each
  driven over gRPC and then REST; about 25 s once the MLServer venv exists).

Timings are reported, never asserted: they are what the scenarios measure, and this machine is shared.
"""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import pytest

from tests.support.scenarios import run_scenario

pytestmark = pytest.mark.integration


def _ours(marker: str) -> list[psutil.Process]:
    """Processes whose command line names ``marker`` (the test's temp folder): what a run left."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in p.info["cmdline"] or ()):
                found.append(p)
        except psutil.Error:
            pass
    return found


def test_rest_codec_reports_every_size_and_encoding(tmp_path: Path) -> None:
    from loadtest.scenarios.rest_codec import main

    out = tmp_path / "codec.json"
    assert main(["--sizes", "1KiB,4KiB", "--repeats", "2", "--min-batch-ms", "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = data["result"]["rows"]
    assert [(r["tensor_bytes"], r["encoding"]) for r in rows] == [
        (1024, "JSON"), (1024, "binary"), (4096, "JSON"), (4096, "binary")]
    for r in rows:
        for key in ("infer_request_us", "infer_response_us", "grpc_path_us", "json_stdlib_us", "orjson_us"):
            assert r[key] > 0, (key, r)
        assert r["rest_total_us"] == pytest.approx(r["infer_request_us"] + r["infer_response_us"], abs=0.02)
    # Binary tensors travel as they are: the REST body is the tensor plus a short JSON header.
    assert 1024 < rows[1]["rest_request_bytes"] < 1024 + 300
    assert "command: python -m" in data["markdown"] and "| 4 KiB" in data["markdown"]


def test_rest_codec_refuses_a_bad_size(capsys: pytest.CaptureFixture[str]) -> None:
    from loadtest.scenarios.rest_codec import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--sizes", "3B"])
    assert exit_info.value.code == 2
    assert "multiple of 4" in capsys.readouterr().err


def test_rest_against_grpc_reports_every_way_and_leaves_nothing(tmp_path: Path) -> None:
    result, markdown = run_scenario("rest", ["--duration", "0.4", "--rounds", "2", "--warmup", "0.1",
                                             "--concurrency", "4"], tmp_path)

    assert set(result["phases"]) == {f"{way} c={c}" for way in ("gRPC", "REST JSON", "REST binary")
                                     for c in (1, 4)}
    for name, phase in result["phases"].items():
        assert phase["requests"] > 0 and phase["errors"] == {}, (name, phase)
        assert phase["router_cpu_ms_per_req"] > 0, (name, phase)
    sizes = result["settings"]["request_bytes"]
    assert sizes["REST binary"] < sizes["REST JSON"]
    assert set(result["targets"]) == {"REST JSON added p50 ms, c=1", "REST binary added p50 ms, c=1"}
    assert all(t["target"] == "<= 0.3" for t in result["targets"].values())
    assert "command: python -m loadtest.scenarios.rest" in markdown
    # Stopped: no process of the run is left, and its temporary folders (the cluster's, the model's)
    # are gone. Left by design: the runtime's download cache (mesh-storage-<uid>, kept across runs)
    # and onnxruntime's ``.ses`` file.
    assert _ours(str(tmp_path / "temp")) == []
    assert [p.name for p in (tmp_path / "temp").iterdir() if p.name.startswith("mesh-bench")] == []


@pytest.mark.slow
def test_peers_rest_mode_drives_mesh_and_mlserver_both_ways() -> None:
    from loadtest.scenarios.peers import bench, render

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    out = bench(models=3, rate=30.0, concurrency=4, duration=1.0, warmup=0.3,
                systems=("mesh", "mlserver"), protocol="both")

    assert out["settings"]["protocol"] == "both"
    assert set(out["systems"]) == {"mesh/grpc", "mesh/rest", "mlserver/grpc", "mlserver/rest"}
    for name, r in out["systems"].items():
        assert name == f"{r['system']}/{r['protocol']}"
        for phase in ("open", "closed"):
            assert r[phase]["requests"] > 0, f"{name} {phase} served nothing: {r[phase]}"
            assert r[phase]["errors"] == {}, f"{name} {phase} errors: {r[phase]['errors']}"
        assert r["survivors"] == [], f"{name} left processes behind: {r['survivors']}"
    # The same schedule for every system and protocol.
    assert len({r["open"]["offered"] for r in out["systems"].values()}) == 1
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before
    text = render(out)
    assert "V2 HTTP JSON" in text and "REST against gRPC, per system" in text
