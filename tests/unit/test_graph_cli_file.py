"""``mesh graph set -f FILE``: what the CLI accepts as a graph file (mesh.cli.graph_cmd.read_spec)."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

from mesh.cli.client import CliError
from mesh.cli.graph_cmd import MAX_FILE_BYTES, read_spec

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
