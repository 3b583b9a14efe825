"""`mesh graph ...` as a user runs it, against `mesh up` (router and runtime processes, a private
etcd): the README's example (register two models, `mesh graph set` with a YAML InferenceGraph,
`mesh infer --graph`), status, list, delete, and one-line errors for bad files and bad graphs."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.e2e.test_mesh_up import MeshUp
from tests.integration.test_graphs import W_A, W_B, X, _fit

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

MANIFEST = """\
apiVersion: serving.kserve.io/v1alpha1
kind: InferenceGraph
metadata:
  name: chain
spec:
  nodes:
    root:
      routerType: Sequence
      steps:
        - serviceName: wide      # a's 3 outputs...
        - serviceName: narrow    # ...are b's input
          data: $response
          dependency: Hard
"""


@pytest.fixture
def up(tmp_path: Path) -> Iterator[MeshUp]:
    mesh = MeshUp(tmp_path, "--runtimes", "1")
    try:
        yield mesh
    finally:
        mesh.stop()


def mesh(up: MeshUp, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mesh", *args, "--router", up.address],
                          capture_output=True, text=True, timeout=60)


def test_graph_commands(up: MeshUp, tmp_path: Path) -> None:
    for name, weights in (("wide", W_A), ("narrow", W_B)):
        r = mesh(up, "model", "register", name, "--type", "sklearn", "--path", str(_fit(tmp_path, name, weights)))
        assert r.returncode == 0, r.stderr
    (tmp_path / "chain.yaml").write_text(MANIFEST)
    r = mesh(up, "graph", "set", "chain", "-f", str(tmp_path / "chain.yaml"))
    assert r.returncode == 0 and r.stdout.startswith("chain: DEFINED"), r.stdout + r.stderr

    r = mesh(up, "infer", "chain", "--graph", "--input", f"x={json.dumps(X.tolist())}", "--json")
    assert r.returncode == 0, r.stderr
    answer = json.loads(r.stdout)
    assert answer["model_name"] == "chain"
    np.testing.assert_allclose(answer["outputs"]["predict"]["data"], X @ W_A @ W_B, rtol=1e-9, atol=1e-9)

    r = mesh(up, "graph", "status", "chain", "--json")
    status = json.loads(r.stdout)
    assert r.returncode == 0 and status["status"] == "READY", r.stdout
    assert [m["model_id"] for m in status["models"]] == ["narrow", "wide"]
    assert status["spec"]["nodes"]["root"]["steps"][1]["dependency"] == "Hard"

    # Only the spec, as JSON, works too.
    spec = {"nodes": {"root": {"routerType": "Ensemble",
                               "steps": [{"serviceName": "wide"}, {"serviceName": "narrow"}]}}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    r = mesh(up, "graph", "set", "both", "-f", str(tmp_path / "spec.json"))
    assert r.returncode == 0, r.stderr
    r = mesh(up, "graph", "list")
    assert r.returncode == 0 and [line.split()[0] for line in r.stdout.splitlines()] == ["both", "chain"], r.stdout

    # Refusals: one line on stderr naming the place, a non-zero exit, no traceback.
    (tmp_path / "typo.yaml").write_text(MANIFEST.replace("serviceName: narrow", "serviceName: narow"))
    (tmp_path / "broken.yaml").write_text("spec: [unclosed\n")
    (tmp_path / "other.yaml").write_text(MANIFEST.replace("name: chain", "name: elsewhere"))
    for args, words in [
        (("graph", "set", "chain", "-f", str(tmp_path / "typo.yaml")), "node 'root', step 2 ('narow')"),
        (("graph", "set", "chain", "-f", str(tmp_path / "broken.yaml")), "not valid YAML or JSON (line 2"),
        (("graph", "set", "chain", "-f", str(tmp_path / "other.yaml")), "defines InferenceGraph 'elsewhere'"),
        (("graph", "set", "chain", "-f", str(tmp_path / "missing.yaml")), "cannot read"),
    ]:
        r = mesh(up, *args)
        assert r.returncode != 0 and words in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr

    r = mesh(up, "graph", "delete", "chain")
    assert r.returncode == 0, r.stderr
    r = mesh(up, "graph", "status", "chain")
    assert r.returncode == 1 and "NOT_FOUND" in r.stdout
    r = mesh(up, "infer", "chain", "--graph", "--input", f"x={json.dumps(X.tolist())}")
    assert r.returncode != 0 and "NOT_FOUND" in r.stderr, r.stderr
