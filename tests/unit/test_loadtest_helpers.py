"""The benchmark runner's pure helpers: the py-spy summary, result folding, Markdown tables."""

from __future__ import annotations

import math
from pathlib import Path

from loadtest.load import PhaseResult, percentile_ms
from loadtest.profile import REPO_ROOT, layer, parse_raw
from loadtest.report import table

SITE = "/opt/py/lib/python3.11/site-packages/"
STDLIB = "/opt/py/lib/python3.11/"
MESH = REPO_ROOT + "mesh/"
RAW = "\n".join([
    # 6 idle samples of the poller thread, blocked in epoll_wait
    f"Thread.run ({STDLIB}threading.py:982);0x7f01 ({SITE}grpc/_cython/cygrpc.cpython-311-x86_64-linux-gnu.so);"
    "epoll_wait (/usr/lib/x86_64-linux-gnu/libc.so.6) 6",
    # 3 busy samples in the router's code, under the event loop
    f"<module> ({MESH}__main__.py:3);Runner.run ({STDLIB}asyncio/runners.py:118);run_forever (loop.c:33192);"
    f"Forwarder.model_infer ({MESH}router/forwarder.py:190);Forwarder.forward ({MESH}router/forwarder.py:130) 3",
    # 1 busy sample in a kernel call made by grpc under the forwarder
    f"<module> ({MESH}__main__.py:3);Runner.run ({STDLIB}asyncio/runners.py:118);"
    f"Forwarder.model_infer ({MESH}router/forwarder.py:191);0x7f02 ({SITE}grpc/_cython/cygrpc.so);"
    "sendmsg (/usr/lib/x86_64-linux-gnu/libc.so.6) 1",
    "not a stack line",
])


def test_parse_raw_drops_idle_waits_and_groups_busy_samples() -> None:
    prof = parse_raw(RAW)
    assert (prof.samples, prof.idle, prof.busy) == (10, 6, 4)
    assert prof.by_thread == {"event loop (main thread)": 4}
    assert prof.by_layer["Python: mesh code"] == 3
    assert prof.by_layer["kernel calls via libc (send/recv/write/futex)"] == 1
    # inclusive, line numbers dropped, entry frames left out
    assert prof.python_total["Forwarder.model_infer (mesh/router/forwarder.py)"] == 4
    assert prof.python_total["Forwarder.forward (mesh/router/forwarder.py)"] == 3
    assert not any("runners.py" in k or "__main__" in k for k in prof.python_total)
    assert prof.top(prof.python_total, 1) == [("Forwarder.model_infer (mesh/router/forwarder.py)", 100.0)]


def test_layer_of_cython_and_runtime_frames() -> None:
    assert layer("0x7f (grpc/_cython/cygrpc.cpython-311-x86_64-linux-gnu.so)").startswith("grpc C-core")
    assert layer("Loop__run (loop.c)") == "uvloop / libuv"
    assert layer("UnaryUnaryCall._invoke (grpc/aio/_call.py)") == "Python: grpc.aio layer"
    assert layer("task_step_impl (_asynciomodule.c)").startswith("CPython runtime")


def test_phase_results_fold_across_rounds() -> None:
    a = PhaseResult("routed c=1", 1, 2, 1.0, [0.001, 0.003], {"UNAVAILABLE": 1})
    a.add(PhaseResult("routed c=1", 1, 2, 1.0, [0.002, 0.004], {"UNAVAILABLE": 2, "INTERNAL": 1}))
    assert (a.requests, a.seconds, a.throughput_rps) == (4, 2.0, 2.0)
    assert a.errors == {"UNAVAILABLE": 3, "INTERNAL": 1}
    assert math.isclose(a.p(50), 2.5)
    assert math.isnan(percentile_ms([], 50))


def test_markdown_table_aligns_and_formats_numbers() -> None:
    out = table(["path", "req/s", "p50 ms"], [["direct", 1234.5, 0.81234], ["routed", 12, float("nan")]])
    lines = out.splitlines()
    assert lines[0].startswith("| path ")
    assert set(lines[1]) <= {"|", "-"}
    assert "| 1,234 " in lines[2] and "| 0.812 " in lines[2]
    assert "| n/a " in lines[3] and "| 12 " in lines[3]
    assert len({len(line) for line in lines}) == 1


def test_json_output_is_strict_json() -> None:
    import json

    from loadtest.report import dump_json

    assert json.loads(dump_json({"a": float("nan"), "b": [1.5, float("nan")], "c": (1, 2)})) == {
        "a": None, "b": [1.5, None], "c": [1, 2]}


def test_peers_finds_mesh_ups_logs_folder_after_a_pruning_line(tmp_path: Path) -> None:
    """`mesh up` may first say which older run's logs it removed; the folder is the line after."""
    from loadtest.peers.fit import logs_dir

    out = tmp_path / "mesh-up.log"
    out.write_text("logs: removed the logs of an older run, /s/up/1 (the newest 10 are kept)\n"
                   "logs: /s/up/2 (kept after exit; --logs DIR to choose)\nstarting...\n")
    assert logs_dir(out) == Path("/s/up/2")
    out.write_text("starting...\n")
    assert logs_dir(out) is None
