"""``mesh graph set -f FILE``: what the CLI accepts as a graph file (mesh.cli.graph_cmd.read_spec)."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

from mesh.cli.client import CliError
from mesh.cli.graph_cmd import MAX_FILE_BYTES, _spec_text, read_spec
from mesh.graphs.spec import MAX_SPEC_BYTES

SPEC = {"nodes": {"root": {"routerType": "Sequence", "steps": [{"serviceName": "m"}]}}}
MANIFEST = """\
apiVersion: serving.kserve.io/v1alpha1
kind: InferenceGraph
metadata: {name: g}
spec:
  nodes:
    root: {routerType: Sequence, steps: [{serviceName: m}]}
"""


def write(tmp_path: Path, text: str | bytes) -> str:
    path = tmp_path / "graph"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return str(path)


def test_a_manifest_a_bare_spec_and_json(tmp_path: Path) -> None:
    assert read_spec(write(tmp_path, MANIFEST), "g") == SPEC
    assert read_spec(write(tmp_path, MANIFEST.replace("metadata: {name: g}\n", "")), "any") == SPEC
    assert read_spec(write(tmp_path, json.dumps(SPEC)), "g") == SPEC
    assert read_spec(write(tmp_path, json.dumps({"apiVersion": "serving.kserve.io/v1alpha1",
                                                 "kind": "InferenceGraph", "spec": SPEC})), "g") == SPEC


def test_standard_input(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(MANIFEST.encode())))
    assert read_spec("-", "g") == SPEC


@pytest.mark.parametrize(("text", "words"), [
    ("nodes: [unclosed\n", "not valid YAML or JSON (line 2"),
    ("- a\n- b\n", "must hold a mapping"),
    ("", "must hold a mapping"),
    (MANIFEST.replace("kind: InferenceGraph", "kind: InferenceService"), "expected kind InferenceGraph"),
    (MANIFEST, "defines InferenceGraph 'g', not 'other'"),
    ("kind: InferenceGraph\nspec: 3\n", "has no spec mapping"),
    (b"nodes: \x80\n", "not valid YAML or JSON"),
])
def test_refusals_name_the_problem(tmp_path: Path, text: str | bytes, words: str) -> None:
    with pytest.raises(CliError) as refused:
        read_spec(write(tmp_path, text), "other" if "'other'" in words else "g")
    assert words in str(refused.value) and refused.value.exit_code == 2


def test_files_are_bounded(tmp_path: Path) -> None:
    with pytest.raises(CliError, match="over"):
        read_spec(write(tmp_path, b"#" * (MAX_FILE_BYTES + 1)), "g")
    with pytest.raises(CliError, match="cannot read"):
        read_spec(str(tmp_path / "missing.yaml"), "g")


def test_yaml_aliases_are_refused(tmp_path: Path) -> None:
    # The "billion laughs": 6 lines expanding to 10^6 strings (10^9 with three more), a MemoryError
    # traceback before. An anchor alone is harmless YAML and stays accepted.
    bomb = 'a0: &a0 ["x","x","x","x","x","x","x","x","x","x"]\n' + "".join(
        f"a{i}: &a{i} [{','.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 6)) + "nodes: *a5\n"
    with pytest.raises(CliError) as refused:
        read_spec(write(tmp_path, bomb), "g")
    assert "aliases (*name) are not allowed" in str(refused.value) and "line 2" in str(refused.value)
    assert refused.value.exit_code == 2
    anchored = "nodes: &n\n  root: {routerType: Sequence, steps: [{serviceName: m}]}\n"
    assert read_spec(write(tmp_path, anchored), "g") == SPEC


def test_deep_nesting_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(CliError) as refused:
        read_spec(write(tmp_path, "nodes: " + "[" * 5000 + "]" * 5000 + "\n"), "g")
    assert "nested too deeply" in str(refused.value) and refused.value.exit_code == 2


def test_the_json_sent_is_bounded(tmp_path: Path) -> None:
    # YAML flow style is shorter than JSON with escapes: the JSON produced is checked too.
    spec = {"nodes": {"root": {"routerType": "Sequence", "steps": [{"serviceName": "m"}]}},
            "resources": {"pad": "\x01" * (MAX_SPEC_BYTES // 4)}}   # 1 byte in YAML, 6 in JSON
    with pytest.raises(CliError, match=f"bytes of JSON; the limit is {MAX_SPEC_BYTES}") as refused:
        _spec_text(spec, "f.yaml")
    assert refused.value.exit_code == 2
    assert json.loads(_spec_text(SPEC, "f.yaml")) == SPEC
