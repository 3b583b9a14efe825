"""``loadtest.scenarios.payloads --quick``: it runs as a user runs it (a child process, ``TMPDIR``
inside the test's folder), reports both paths, the sink's count and the router's counters, and
leaves no process behind. Timings are reported, never asserted."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.test_loadtest_rest import _ours
from tests.support.scenarios import run_scenario

pytestmark = pytest.mark.integration


def test_payloads_quick_reports_both_paths_and_the_sinks_count(tmp_path: Path) -> None:
    result, markdown = run_scenario("payloads", ["--quick"], tmp_path)
    assert set(result["phases"]) == {"logging off", "logging on"}
    for name, phase in result["phases"].items():
        assert phase["requests"] > 0 and phase["errors"] == {}, (name, phase)
    on = result["phases"]["logging on"]["requests"]
    received = result["sink"]["received"]
    # Mode all: a request and a response record per inference, each sent or (queue full) dropped.
    counters = result["router_counters"]
    assert counters["sent"] == sum(received.values()) and counters["failed"] == 0
    assert counters["sent"] + counters["dropped"] >= 2 * on
    assert set(result["targets"]) == {"throughput_drop"}
    assert "command: python -m loadtest.scenarios.payloads" in markdown
    assert not _ours(str(tmp_path))
