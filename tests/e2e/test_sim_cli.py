"""`mesh sim gen` and `mesh sim run` as a user runs them: real subprocesses, small traces, JSON checked;
bad input gives exit status 2 and one line on stderr."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def mesh(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mesh", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def zipf_trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sim") / "zipf.csv"
    r = mesh("sim", "gen", "zipf", "--models", "300", "--requests", "6000", "--alpha", "1.0", "--churn", "0.1",
             "--churn-every", "2000", "--seed", "3", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "wrote 6,000 requests" in r.stdout
    return out


def test_gen_then_run_with_opt_as_json(zipf_trace: Path) -> None:
    r = mesh("sim", "run", "--trace", zipf_trace, "--capacity", "10%", "--instances", "2",
             "--policy", "gdsf", "--policy", "sieve", "--opt", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["trace"]["requests"] == 6000 and report["trace"]["uniform_sizes"] is True
    assert report["instances"] == 2 and report["capacity_bytes"] == report["trace"]["working_set_bytes"] // 10
    assert report["opt"]["label"] == "Belady (exact)"
    rows = {row["policy"]: row for row in report["policies"]}
    assert list(rows) == ["lru", "gdsf", "sieve"]  # LRU added as the baseline of the gap
    assert rows["lru"]["baseline_only"] is True and rows["lru"]["gap_closed"] == {"lo": 0.0, "hi": 0.0}
    for row in rows.values():
        assert report["opt"]["miss_ratio"] <= row["miss_ratio"] <= 1.0
        assert row["loads_per_s"] > 0 and row["added_p99_ms"] >= row["added_p50_ms"] >= 0
        total = row["cluster"]["total"]
        assert total["requests"] == 6000 == total["hits"] + total["misses"] + total["joined"]
        assert set(row["cluster"]["instances"]) == {"runtime-0", "runtime-1"}
    gap = rows["gdsf"]["gap_closed"]
    assert gap["lo"] == gap["hi"] and gap["lo"] is not None and -1.0 < gap["lo"] < 1.0


def test_a_pass_through_room_is_simulated_at_the_cluster_level(tmp_path: Path) -> None:
    trace = tmp_path / "skewed.csv"  # sizes that vary: the admission filter refuses some newcomers
    assert mesh("sim", "gen", "zipf", "--models", "300", "--requests", "6000", "--sizes", "skewed", "--cv", "2",
                "--seed", "3", "--out", trace).returncode == 0

    def run(*extra: str) -> dict[str, object]:
        r = mesh("sim", "run", "--trace", trace, "--capacity", "10%", "--policy", "s3fifo+tinylfu",
                 "--json", *extra)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)  # type: ignore[no-any-return]

    plain = run()
    room = int(plain["capacity_bytes"]) // 10  # type: ignore[call-overload]
    pooled = run("--passthrough", str(room))
    assert (plain["passthrough_bytes"], pooled["passthrough_bytes"]) == (0, room)
    without, with_room = (r["policies"][0]["cluster"] for r in (plain, pooled))  # type: ignore[index]
    assert without["pooled"] == 0 and 0 < with_room["pooled"] <= with_room["refused"]


def test_run_prints_a_table(zipf_trace: Path) -> None:
    r = mesh("sim", "run", "--trace", zipf_trace, "--capacity", "500MB", "--policy", "lru", "--scaling")
    assert r.returncode == 0, r.stderr
    assert "POLICY" in r.stdout and "lru" in r.stdout and "copy scaling on" in r.stdout


def test_skewed_sizes_and_azure_traces(tmp_path: Path) -> None:
    skewed = tmp_path / "skewed.csv"
    assert mesh("sim", "gen", "zipf", "--models", "200", "--requests", "3000", "--sizes", "skewed", "--cv", "2",
                "--seed", "1", "--out", skewed).returncode == 0
    r = mesh("sim", "run", "--trace", skewed, "--capacity", "10%", "--policy", "gdsf", "--opt", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["trace"]["uniform_sizes"] is False
    opt = report["opt"]
    assert opt["exact_misses"] is False and opt["cost_miss_ratio_lower"] <= opt["cost_miss_ratio"]
    gap = report["policies"][1]["gap_closed_cost"]
    assert gap["lo"] <= gap["hi"]

    azure = tmp_path / "azure.csv"
    r = mesh("sim", "gen", "azure", "--synthetic", "30", "--models", "10", "--start-minute", "600",
             "--end-minute", "605", "--seed", "2", "--out", azure)
    assert r.returncode == 0, r.stderr
    assert azure.read_text().startswith("time_s,model_id,size_bytes,load_ms,infer_ms\n")


@pytest.mark.parametrize(("args", "expected"), [
    (["--trace", "{missing}", "--capacity", "1GiB"], "No such file"),
    (["--trace", "{bad}", "--capacity", "1GiB"], "size_bytes 'x' is not an integer"),
    (["--trace", "{good}", "--capacity", "1GiB", "--policy", "nope"], "unknown policy 'nope'"),
    (["--trace", "{good}", "--capacity", "1XB"], "not a byte size"),
    (["--trace", "{good}", "--capacity", "150%"], "bad share"),
    (["--trace", "{good}", "--capacity", "1GiB", "--instances", "x"], "invalid int value"),
    (["--trace", "{good}"], "required: --capacity"),
    (["--trace", "{good}", "--capacity", "1MiB", "--passthrough", "600KiB"], "more than half the capacity"),
    (["--trace", "{good}", "--capacity", "1MiB", "--passthrough", "lots"], "--passthrough:"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, zipf_trace: Path, args: list[str], expected: str) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("time_s,model_id,size_bytes,load_ms\n1.0,a,x,5\n")
    paths = {"missing": tmp_path / "none.csv", "bad": bad, "good": zipf_trace}
    r = mesh("sim", "run", *(a.format(**paths) for a in args))
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mesh: error:") and expected in lines[0], r.stderr


def test_bad_generator_arguments(tmp_path: Path) -> None:
    r = mesh("sim", "gen", "zipf", "--alpha", "-1", "--out", tmp_path / "x.csv")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "alpha" in r.stderr
    r = mesh("sim", "gen", "azure", "--counts", tmp_path / "none.csv", "--out", tmp_path / "y.csv")
    assert r.returncode == 2 and "No such file" in r.stderr and "Traceback" not in r.stderr
