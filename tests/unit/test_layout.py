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


def test_the_import_contracts_hold() -> None:
    """The layering in ``.importlinter`` (import-linter reads the import graph, module by module:
    a file's name cannot get it past a contract). Contracts: placement/ is a pure library; the
    router's data plane imports neither grpc nor aiohttp, even indirectly; only named edge modules
    import grpc, aetcd, kubernetes or aiohttp; the router does not depend on the runtime."""
    result = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
                             "lint_imports_command()", "--no-cache"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "7 kept, 0 broken" in result.stdout, result.stdout[-2000:]


def test_a_contract_breach_is_caught(tmp_path: Path) -> None:
    """The check can fail: a copy of the data plane that imports grpc breaks its contract."""
    config = (ROOT / ".importlinter").read_text()
    probe = ROOT / "mesh" / "router" / "_contract_probe.py"
    probe.write_text("import grpc  # noqa: F401\n")
    broken = tmp_path / "contracts.ini"
    broken.write_text(config.replace("    mesh.router.dataplane\n",
                                     "    mesh.router.dataplane\n    mesh.router._contract_probe\n", 1))
    try:
        result = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
                                 "lint_imports_command()", "--no-cache", "--config", str(broken)],
                                cwd=ROOT, capture_output=True, text=True, timeout=300)
    finally:
        probe.unlink()
    assert result.returncode != 0
    assert "mesh.router._contract_probe -> grpc" in result.stdout, result.stdout[-2000:]


def test_prometheus_client_is_confined_to_the_metrics_module() -> None:
    assert set(_importing("mesh", ("prometheus_client",))) == {"mesh/observability/metrics.py"}


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
