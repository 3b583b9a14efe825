"""``mesh-loadtest`` against a real mesh: a router and a runtime in this process (gRPC and metrics on
127.0.0.1, a ``memory://`` registry) serving real scikit-learn models. The tool's async entry point
runs in the test's event loop, a few seconds per run; the bad-target case runs the console script."""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from loadtest import cli
from loadtest.plot import plot
from loadtest.report import dump_json
from tests.support.inprocess import InProcessMesh, memory_url
from tests.support.models import ModelArtifact, make_model

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> ModelArtifact:
    return make_model("sklearn", tmp_path_factory.mktemp("models"), seed=0)


@pytest.fixture
async def mesh() -> AsyncIterator[tuple[InProcessMesh, list[str]]]:
    ports = {"router": free_port(), "runtime": free_port()}
    m = await InProcessMesh(memory_url(), router_overrides={"metrics_port": ports["router"]},
                            runtime_overrides={"metrics_port": ports["runtime"],
                                               "direct_port": 0}).start(runtimes=1)  # smart clients' port
    try:
        assert m.router is not None
        yield m, [f"http://127.0.0.1:{p}/metrics" for p in ports.values()]
    finally:
        await m.stop()


async def test_open_loop_poisson_over_registered_models(mesh: tuple[InProcessMesh, list[str]],
                                                        model: ModelArtifact, tmp_path: Path) -> None:
    m, metrics = mesh
    assert m.router is not None
    args = cli.parse_args(["--target", m.router.endpoint, "--register", str(model.file), "--type", "sklearn",
                           "--models", "5", "--model-prefix", "lt-", "--rate", "100", "--arrivals", "poisson",
                           "--duration", "3", "--popularity", "uniform",
                           *(a for url in metrics for a in ("--metrics", url)), "--plot", "x.png"])
    summary = await cli.run(args)

    assert set(summary) == set(cli.JSON_KEYS)
    assert summary["requests"] == pytest.approx(300, rel=0.25)
    assert summary["errors"] == {} and summary["dropped"] == 0
    assert summary["ok"] == summary["requests"]
    assert summary["throughput_rps"] == pytest.approx(100, rel=0.25)
    lat = summary["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99.9"] <= lat["max"]
    # no warm-up: each of the 5 models was loaded during the run, and every request that found its
    # model loading or not yet loaded was a miss; every request reached the one runtime
    cache = summary["cache"]
    assert cache["misses"] >= 5
    assert cache["hits"] + cache["misses"] == summary["requests"]
    assert 0 < cache["hit_ratio"] < 1
    assert cache["hit_ratio"] == pytest.approx(cache["hits"] / (cache["hits"] + cache["misses"]))
    assert len(summary["timeline"]) >= 3
    assert any(not math.isnan(r["hit_ratio"]) for r in summary["timeline"])
    json.loads(dump_json(summary))  # strict JSON (NaN becomes null)
    assert "p99" in cli.render(summary) and "cache hit ratio" in cli.render(summary)

    png = tmp_path / "run.png"
    plot(summary, str(png))
    assert png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


async def test_closed_loop_concurrency(mesh: tuple[InProcessMesh, list[str]], model: ModelArtifact) -> None:
    m, _ = mesh
    assert m.router is not None
    args = cli.parse_args(["--target", m.router.endpoint, "--register", str(model.file), "--models", "2",
                           "--concurrency", "4", "--duration", "2", "--warmup", "0.5"])
    summary = await cli.run(args)
    assert summary["mode"] == "closed"
    assert summary["ok"] > 20 and summary["errors"] == {}
    assert summary["cache"]["hit_ratio"] is None  # no --metrics
    assert "n/a" in cli.render(summary)


async def test_unknown_model_errors_are_counted_as_not_found(mesh: tuple[InProcessMesh, list[str]]) -> None:
    m, _ = mesh
    assert m.router is not None
    args = cli.parse_args(["--target", m.router.endpoint, "--models", "2", "--model-prefix", "nosuch-",
                           "--input-shape", "1,4", "--datatype", "FP32", "--rate", "50", "--duration", "1"])
    summary = await cli.run(args)
    assert summary["ok"] == 0
    assert summary["errors"] == {"NOT_FOUND": summary["requests"]}
    assert summary["requests"] > 20
    assert "NOT_FOUND" in cli.render(summary)


def _console_script() -> list[str]:
    script = shutil.which("mesh-loadtest")
    return [script] if script else [sys.executable, "-m", "loadtest.cli"]


@pytest.mark.parametrize("argv", [["--target", "127.0.0.1:1", "--rate", "10", "--duration", "1"],
                                  ["--target", "127.0.0.1:1", "--rate", "10", "--no-such-option"],
                                  ["--target", "127.0.0.1:1", "--rate", "10", "--concurrency", "2"]])
def test_bad_target_or_option_is_one_line_and_exit_2(argv: list[str]) -> None:
    proc = subprocess.run([*_console_script(), *argv], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mesh-loadtest: error:"), proc.stderr
    assert "Traceback" not in proc.stderr


async def test_smart_client_mode_sends_loaded_models_straight_to_the_runtime(
        mesh: tuple[InProcessMesh, list[str]], model: ModelArtifact) -> None:
    """``--client smart``: the router takes each model's first (cold) request, which loads it; the
    rest go straight to the runtime, and every request is answered."""
    m, _ = mesh
    assert m.router is not None
    args = cli.parse_args(["--target", m.router.endpoint, "--client", "smart", "--register", str(model.file),
                           "--models", "2", "--model-prefix", "sc-", "--concurrency", "4", "--duration", "2",
                           "--warmup", "1", "--popularity", "uniform"])
    summary = await cli.run(args)
    assert summary["errors"] == {} and summary["ok"] == summary["requests"] > 0
    paths = summary["client"]["paths"]
    assert summary["client"]["kind"] == "smart"
    assert paths["direct"] > 0.9 * (paths["direct"] + paths["routed"])  # beyond the cold ones, all direct
    assert paths["direct_failed"] == 0
    assert "smart client requests" in cli.render(summary)
