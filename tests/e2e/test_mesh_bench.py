"""``mesh-bench`` as a user runs it (real subprocesses, a tiny cold-start run against a scratch copy of a
BENCHMARKS-like file), and its marker rewriting as a pure function."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.benchfile import SECTION, SECTION_BEFORE, BenchError, apply_blocks, find_blocks

ROOT = Path(__file__).resolve().parents[2]
TINY_COLDSTART = "coldstart=--models 2 --burst 10 --single 2 --warm 3 --probes 2"

BEFORE = """# Benchmarks

Hand-written prose, kept as it is.

```
python -m loadtest.scenarios.coldstart --json     # 14 s
```

<!-- mesh-bench:begin coldstart -->
OLD COLDSTART CONTENT
<!-- mesh-bench:end coldstart -->
"""
AFTER = """
## Notes for whoever changes the router

Trailing prose, also kept.
"""
FIXTURE = BEFORE + AFTER

def mesh_bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "loadtest.bench", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=240)


def block(text: str, name: str) -> str:
    m = re.search(rf"<!-- mesh-bench:begin {name} -->\n(.*?)<!-- mesh-bench:end {name} -->", text, re.S)
    assert m, f"no {name} block in:\n{text}"
    return m.group(1)


def outside_markers(text: str) -> str:
    return re.sub(r"(<!-- mesh-bench:begin (\S+) -->\n).*?(<!-- mesh-bench:end \2 -->)", r"\1\3", text,
                  flags=re.S)


def assert_one_line_error(stderr: str) -> None:
    assert "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr


# -- end to end ----------------------------------------------------------------------------------

@pytest.mark.e2e
@pytest.mark.integration
def test_tiny_coldstart_run_rewrites_its_block_and_the_summary(tmp_path: Path) -> None:
    bench = tmp_path / "BENCHMARKS.md"
    bench.write_text(FIXTURE)
    r = mesh_bench("--only", "coldstart", "--args", TINY_COLDSTART, "--benchmarks-file", str(bench))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert "[coldstart] " in r.stderr  # the scenario's output, streamed with its prefix
    text = bench.read_text()

    cold = block(text, "coldstart")
    assert "OLD COLDSTART CONTENT" not in cold
    command = "python -m loadtest.scenarios.coldstart --models 2 --burst 10 --single 2 --warm 3 --probes 2"
    assert f"```\n{command}\n```" in cold
    assert "wall time " in cold
    assert "| cold requests" in cold and "| target" in cold  # the scenario's tables
    assert "cores" in cold and "grpcio" in cold  # its machine line

    summary = block(text, "summary")
    from loadtest.report import git_commit

    assert f"commit {git_commit()}" in summary
    assert re.search(r"\| coldstart\s*\| ok\s*\|", summary), summary
    assert re.search(r"\| hop\s*\| not run\s*\|", summary), summary
    assert "mesh-bench --only coldstart --args" in summary
    assert "| scenario" in summary and "| command" in summary

    # Outside the markers, the old text is kept byte for byte; the new section comes before the Notes.
    kept = outside_markers(text)
    assert kept.startswith(outside_markers(BEFORE))
    assert kept.endswith(AFTER)
    assert kept[len(outside_markers(BEFORE)):-len(AFTER)].startswith(f"\n{SECTION}\n")


@pytest.mark.e2e
@pytest.mark.integration
def test_a_failing_scenario_leaves_its_block_and_is_marked_failed(tmp_path: Path) -> None:
    bench = tmp_path / "BENCHMARKS.md"
    bench.write_text(FIXTURE)
    r = mesh_bench("--only", "coldstart", "--args", "coldstart=--no-such-flag", "--benchmarks-file", str(bench))
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert "coldstart FAILED (exit status 2)" in r.stderr
    assert "--no-such-flag" in r.stderr  # the tail of its output, repeated
    text = bench.read_text()
    assert block(text, "coldstart") == "OLD COLDSTART CONTENT\n"
    assert re.search(r"\| coldstart\s*\| FAILED: exit status 2\s*\|", block(text, "summary"))
    assert text.startswith(BEFORE) and text.endswith(AFTER)


@pytest.mark.e2e
@pytest.mark.integration
def test_list_shows_the_suite_and_the_budget_is_enforced(tmp_path: Path) -> None:
    r = mesh_bench("--list")
    assert r.returncode == 0, r.stderr
    listed = {m.group(1): m.group(2) for m in re.finditer(r"^\| (\w+)\s*\| ([\d.]+|-)\s*\|", r.stdout, re.M)}
    for path in sorted((ROOT / "loadtest" / "scenarios").glob("[!_]*.py")):
        constants = _suite_constants(path)
        if {"SUITE_ARGS", "SUITE_SECONDS"} <= constants.keys():
            assert path.stem in listed, r.stdout
            if isinstance(constants["SUITE_SECONDS"], int | float):
                assert float(listed[path.stem]) == constants["SUITE_SECONDS"]
    for name in ("hop", "coldstart", "router_memory", "placement", "peers"):
        assert name in listed
    assert list(listed)[:2] == ["hop", "coldstart"]  # ORDER, not alphabetical
    assert "budget 600 s" in r.stdout

    refused = mesh_bench("--budget", "10", "--benchmarks-file", str(tmp_path / "absent.md"))
    assert refused.returncode == 2
    assert_one_line_error(refused.stderr)
    assert "over the budget of 10 s" in refused.stderr
    assert refused.stdout == ""

    bad = mesh_bench("--only", "no_such_scenario")
    assert bad.returncode == 2
    assert_one_line_error(bad.stderr)


def _suite_constants(path: Path) -> dict[str, object]:
    found: dict[str, object] = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign):
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        else:
            continue
        if isinstance(target, ast.Name) and target.id in ("SUITE_ARGS", "SUITE_SECONDS"):
            try:
                found[target.id] = ast.literal_eval(value)
            except ValueError:
                found[target.id] = None
    return found


# -- the rewriting, as a pure function -------------------------------------------------------------

def test_existing_block_is_replaced_and_nothing_else_changes() -> None:
    out = apply_blocks(FIXTURE, {"coldstart": "NEW\n| a | b |"})
    assert out == FIXTURE.replace("OLD COLDSTART CONTENT", "NEW\n| a | b |")
    assert apply_blocks(out, {"coldstart": "NEW\n| a | b |"}) == out  # idempotent


def test_missing_blocks_go_to_a_new_section_before_the_notes() -> None:
    out = apply_blocks(FIXTURE, {"summary": "S", "hop": "H"})
    head, _, rest = out.partition(SECTION)
    assert head == BEFORE + "\n"
    assert rest.endswith(AFTER)
    added = rest[: -len(AFTER)]
    assert added.index("### Last run\n\n<!-- mesh-bench:begin summary -->\nS\n<!-- mesh-bench:end summary -->") \
        < added.index("### hop\n\n<!-- mesh-bench:begin hop -->\nH\n<!-- mesh-bench:end hop -->")
    assert find_blocks(out).keys() == {"coldstart", "summary", "hop"}
    # A later run appends a new scenario at the end of the existing section, and replaces the others.
    again = apply_blocks(out, {"summary": "S2", "scale": "X"})
    assert again.count(SECTION) == 1
    assert again.index("begin hop") < again.index("begin scale") < again.index(SECTION_BEFORE)
    assert "\nS2\n" in again and "\nS\n" not in again


def test_section_is_appended_at_the_end_without_a_notes_heading() -> None:
    text = "# Title\n\nprose\n\n## 1. Hop\n\n```\n## not a heading, in a fence\n```\n"
    out = apply_blocks(text, {"hop": "H"})
    assert out.startswith(text)
    assert out[len(text):] == f"\n{SECTION}\n\n" + out.split(f"{SECTION}\n\n", 1)[1]
    assert out.endswith("<!-- mesh-bench:begin hop -->\nH\n<!-- mesh-bench:end hop -->\n")
    # Headings inside blocks or fences do not end the section.
    out2 = apply_blocks(out, {"hop": "## inside the block", "coldstart": "C"})
    assert out2.index("begin hop") < out2.index("begin coldstart")
    assert out2.endswith("<!-- mesh-bench:end coldstart -->\n")


def test_text_without_a_final_newline_and_crlf_outside_blocks_is_kept() -> None:
    text = "a\r\nb\r\n<!-- mesh-bench:begin hop -->\nold\n<!-- mesh-bench:end hop -->\r\nc"
    out = apply_blocks(text, {"hop": "new"})
    assert out == text.replace("old", "new")


@pytest.mark.parametrize("text", [
    "<!-- mesh-bench:begin hop -->\n",
    "<!-- mesh-bench:end hop -->\n",
    "<!-- mesh-bench:begin hop -->\n<!-- mesh-bench:begin cold -->\n<!-- mesh-bench:end cold -->\n",
    "<!-- mesh-bench:begin hop -->\n<!-- mesh-bench:end hop -->\n<!-- mesh-bench:begin hop -->\n"
    "<!-- mesh-bench:end hop -->\n",
    "<!-- mesh-bench:begin hop -->\n<!-- mesh-bench:end cold -->\n",
], ids=["no end", "no begin", "nested", "twice", "mismatched"])
def test_malformed_markers_are_refused(text: str) -> None:
    with pytest.raises(BenchError):
        apply_blocks(text, {"hop": "x"})
