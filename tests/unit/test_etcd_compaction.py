"""Every etcd the project starts compacts its history: `mesh up` and the tests (EtcdProcess), and the
Kubernetes StatefulSet (deploy/base/etcd.yaml). Without it etcd keeps every revision forever."""

from __future__ import annotations

from pathlib import Path

import yaml

from mesh.registry.etcd_server import AUTO_COMPACTION, EtcdProcess

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "base" / "etcd.yaml"


def test_etcd_process_compacts_periodically(tmp_path: Path) -> None:
    command = EtcdProcess(tmp_path / "etcd")._command()
    assert AUTO_COMPACTION == ("--auto-compaction-mode", "periodic", "--auto-compaction-retention", "5m")
    at = command.index("--auto-compaction-mode")
    assert tuple(command[at:at + 4]) == AUTO_COMPACTION


def test_the_deployed_etcd_compacts_with_the_same_retention() -> None:
    (statefulset,) = [d for d in yaml.safe_load_all(DEPLOY.read_text()) if d and d["kind"] == "StatefulSet"]
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    assert "--auto-compaction-mode=periodic" in container["command"]
    assert "--auto-compaction-retention=5m" in container["command"]
