"""``loadtest.scenarios.payloads --quick``: it runs as a user runs it (a child process, ``TMPDIR``
inside the test's folder), reports both paths, the sink's count and the router's counters, and
leaves no process behind. Timings are reported, never asserted."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.test_loadtest_rest import _ours
from tests.support.scenarios import run_scenario

pytestmark = pytest.mark.integration


def test_payloads_quick_reports_every_path_and_the_sinks_count(tmp_path: Path) -> None:
    result, markdown = run_scenario("payloads", ["--quick"], tmp_path)
    assert set(result["phases"]) == {"logging off", "logging on, binary", "logging on, batched"}
    for name, phase in result["phases"].items():
        assert phase["requests"] > 0 and phase["errors"] == {}, (name, phase)
    for mode in ("binary", "batched"):
        on = result["phases"][f"logging on, {mode}"]["requests"]
        received = result["sink"]["received"][mode]
        # Mode all: a request and a response record per inference, each sent or (queue full) dropped;
        # the sink counts batched records by parsing each batch.
        counters = result["router_counters"][mode]
        assert counters["sent"] == sum(received.values()) and counters["failed"] == 0, (mode, counters, received)
        assert counters["sent"] + counters["dropped"] >= 2 * on
    assert set(result["targets"]) == {"throughput_drop_binary", "throughput_drop_batched"}
    assert "command: python -m loadtest.scenarios.payloads" in markdown
    assert not _ours(str(tmp_path))
