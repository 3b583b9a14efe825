"""Structure the design relies on, checked by machine: the layering of imports, and generated
stubs that match the .proto files."""

from __future__ import annotations

import ast
import filecmp
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _modules(package: str) -> list[Path]:
    return [p for p in (ROOT / package).rglob("*.py") if "gen" not in p.relative_to(ROOT).parts]


def _importing(package: str, banned: tuple[str, ...]) -> dict[str, set[str]]:
    found = {}
    for path in _modules(package):
        hits = {n for n in _imports(path) if n.split(".")[0] in banned or n in banned}
        if hits:
            found[str(path.relative_to(ROOT))] = hits
    return found


def test_placement_is_a_pure_library() -> None:
    assert _importing("placement", ("grpc", "aetcd", "kubernetes", "asyncio", "mesh")) == {}


def test_grpc_is_imported_only_at_the_transport_edge() -> None:
    allowed_names = {"servicer.py", "forwarder.py", "router_client.py", "client.py", "demo.py",
                     "etcd.py"}
    offenders = {
        path: hits for path, hits in _importing("mesh", ("grpc", "grpc_health")).items()
        if not path.startswith("mesh/transport/") and Path(path).name not in allowed_names
        and not path.endswith("app.py")  # process assembly wires servers together
    }
    assert offenders == {}


def test_etcd_client_is_confined_to_the_etcd_store() -> None:
    assert set(_importing("mesh", ("aetcd",))) == {"mesh/registry/etcd.py"}


def test_kubernetes_client_is_confined_to_the_controllers_kube_module() -> None:
    assert set(_importing("mesh", ("kubernetes",))) == {"mesh/controller/kube.py"}


def test_prometheus_client_is_confined_to_the_metrics_module() -> None:
    assert set(_importing("mesh", ("prometheus_client",))) == {"mesh/observability/metrics.py"}


def test_router_does_not_depend_on_the_runtime() -> None:
    for path in _modules("mesh/router"):
        assert not any(n.startswith("mesh.runtime") for n in _imports(path)), path


def test_generated_stubs_are_fresh(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "proto" / "generate.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    checked = ROOT / "mesh" / "gen"
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    stored = sorted(p.relative_to(checked) for p in checked.rglob("*")
                    if p.is_file() and "__pycache__" not in p.parts)
    assert fresh == stored, "run: python proto/generate.py"
    stale = [str(p) for p in fresh if not filecmp.cmp(tmp_path / p, checked / p, shallow=False)]
    assert stale == [], f"stale generated files {stale}; run: python proto/generate.py"
