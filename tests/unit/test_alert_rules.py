"""deploy/monitoring's alert rules: valid for promtool, every alert fired by promtool's unit tests
(alerts.test.yaml) on a staged failure, every metric they name a real one (exposed by
mesh/observability/metrics.py and listed in docs/metrics.md), the PrometheusRule equal to the rule
file, and each alert explained in docs/operations.md. A real Prometheus firing them on a real
mesh: tests/e2e/test_alerts_prometheus.py."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "deploy" / "monitoring"
RULES = MONITORING / "alerts.yaml"


def _promtool() -> str:
    binary = shutil.which("promtool")
    assert binary, "promtool is not installed: run scripts/install-test-deps"
    return binary


def _alerts() -> list[dict[str, object]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def test_promtool_checks_the_rules() -> None:
    r = subprocess.run([_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in r.stdout


def test_promtool_unit_tests_fire_every_alert() -> None:
    r = subprocess.run([_promtool(), "test", "rules", "alerts.test.yaml"], cwd=MONITORING,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    tests = yaml.safe_load((MONITORING / "alerts.test.yaml").read_text())["tests"]
    fired = {check["alertname"] for t in tests for check in t["alert_rule_test"] if check["exp_alerts"]}
    assert fired == {a["alert"] for a in _alerts()}


def _metric_names(expr: str) -> set[str]:
    names = set(re.findall(r"\b((?:modelmesh|mesh)_[a-z_]+)", expr))
    # Samples of a histogram or counter, back to the family's name.
    return {re.sub(r"_(bucket|count|sum)$", "", n) for n in names}


@pytest.mark.parametrize("alert", _alerts(), ids=lambda a: str(a["alert"]))
def test_every_metric_an_alert_names_exists(alert: dict[str, object]) -> None:
    source = (ROOT / "mesh" / "observability" / "metrics.py").read_text()
    documented = (ROOT / "docs" / "metrics.md").read_text()
    names = _metric_names(str(alert["expr"]))
    for name in names:
        family = name.removesuffix("_total")
        assert f'"{name}"' in source or f'"{family}"' in source, f"{name}: not in metrics.py"
        assert f"`{name}`" in documented or f"`{family}`" in documented or f"`{family}_total`" in documented \
            or f"{family}`" in documented, f"{name}: not in docs/metrics.md"
    assert alert["labels"]["severity"] in ("critical", "warning")  # type: ignore[index]
    assert {"summary", "description"} <= set(alert["annotations"])  # type: ignore[arg-type]


def test_the_prometheus_rule_holds_the_same_groups_and_each_alert_is_documented() -> None:
    rule = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"] == yaml.safe_load(RULES.read_text())
    assert "prometheusrule.yaml" in (MONITORING / "kustomization.yaml").read_text()
    guide = (ROOT / "docs" / "operations.md").read_text()
    for alert in _alerts():
        assert f"`{alert['alert']}`" in guide, f"{alert['alert']} is not explained in docs/operations.md"
