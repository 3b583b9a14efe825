"""deploy/autoscaling: the HPA and the KEDA ScaledObject that make the runtime StatefulSet follow the
routers' mesh_runtime_replicas_desired, checked on what ``kubectl kustomize`` builds from an overlay
that uses each Component (as tests/unit/test_deploy.py checks the base).

Well-formed means: the HPA's every field is one that autoscaling/v2 defines (walked against the
Kubernetes client's generated models, which are the API's OpenAPI types) and the required ones are
there; the ScaledObject's fields are those of KEDA's ScaledObject CRD (keda.sh/v1alpha1, 2.x: the
names below are its schema's), its trigger metadata strings (the CRD types them so) with the
prometheus scaler's parameters. Both point at a StatefulSet the build contains, which no longer
fixes its replica count; the metric they read is one the router exports.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mesh.observability.metrics import RouterMetrics
from mesh.settings import load_settings
from placement.autoscale import AutoscaleConfig, Autoscaler, Demand
from tests.unit.test_deploy import DEPLOY, Doc, _kustomize, _one

AUTOSCALING = DEPLOY / "autoscaling"
METRIC = "mesh_runtime_replicas_desired"


def _overlay(tmp_path: Path, component: str) -> list[Doc]:
    """An overlay of one's own, outside deploy/: the base plus one autoscaling Component."""
    overlay = tmp_path / component
    overlay.mkdir()
    base = os.path.relpath(DEPLOY, overlay)
    (overlay / "kustomization.yaml").write_text(
        f"resources:\n  - {base}\ncomponents:\n  - {base}/autoscaling/{component}\n")
    return _kustomize(overlay)


@pytest.fixture(scope="module")
def hpa_build(tmp_path_factory: pytest.TempPathFactory) -> list[Doc]:
    return _overlay(tmp_path_factory.mktemp("hpa"), "hpa")


@pytest.fixture(scope="module")
def keda_build(tmp_path_factory: pytest.TempPathFactory) -> list[Doc]:
    return _overlay(tmp_path_factory.mktemp("keda"), "keda")


# --- autoscaling/v2, as the Kubernetes API defines it ---------------------------------------------

_PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object}


def _unknown_fields(value: Any, type_name: str, path: str) -> list[str]:
    """Fields of ``value`` that the OpenAPI type ``type_name`` (a kubernetes.client model) does not
    define, and values of the wrong primitive type."""
    if type_name.lower().startswith("list["):  # "List[V2MetricSpec]" (older clients: "list[...]")
        if not isinstance(value, list):
            return [f"{path}: a list expected"]
        return [p for i, v in enumerate(value) for p in _unknown_fields(v, type_name[5:-1], f"{path}[{i}]")]
    if type_name.lower().startswith(("dict[", "dict(")):  # "Dict[str, str]" (older: "dict(str, str)")
        inner = type_name[5:-1].split(", ", 1)[1]
        return [p for k, v in value.items() for p in _unknown_fields(v, inner, f"{path}.{k}")]
    if type_name in _PRIMITIVES:
        ok = isinstance(value, _PRIMITIVES[type_name]) and not (type_name == "int" and isinstance(value, bool))
        return [] if ok else [f"{path}: {type_name} expected, got {value!r}"]
    model = getattr(k8s, type_name)
    if not isinstance(value, dict):
        return [f"{path}: an object ({type_name}) expected"]
    by_json = {json_name: attr for attr, json_name in model.attribute_map.items()}
    problems = []
    for key, sub in value.items():
        if key not in by_json:
            problems.append(f"{path}.{key}: not a field of {type_name}")
        else:
            problems += _unknown_fields(sub, model.openapi_types[by_json[key]], f"{path}.{key}")
    return problems


def _as_model(doc: Doc, type_name: str) -> Any:
    """Deserialized with the client's models (pydantic), which refuse a missing required field."""
    return k8s.ApiClient().deserialize(json.dumps(doc), type_name, "application/json")


def test_the_hpa_component_renders_an_autoscaling_v2_hpa_on_the_runtime_statefulset(hpa_build: list[Doc]) -> None:
    hpa = _one(hpa_build, "HorizontalPodAutoscaler", "mesh-runtime")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert _unknown_fields(hpa, "V2HorizontalPodAutoscaler", "hpa") == []
    model = _as_model(hpa, "V2HorizontalPodAutoscaler")  # raises on a missing required field
    spec = model.spec
    target = spec.scale_target_ref
    statefulset = _one(hpa_build, target.kind, target.name)
    assert (target.api_version, statefulset["apiVersion"]) == ("apps/v1", "apps/v1")
    assert statefulset["metadata"]["namespace"] == hpa["metadata"]["namespace"] == "mesh-serving"
    # The StatefulSet no longer fixes its count (else each apply would reset what the HPA set).
    assert "replicas" not in statefulset["spec"]
    # The metric and the target that make the replicas follow the desired count itself.
    (metric,) = spec.metrics
    assert metric.type == "External"
    assert metric.external.metric.name == METRIC
    assert metric.external.metric.selector.match_labels == {"runtime": ""}
    assert (metric.external.target.type, metric.external.target.average_value) == ("AverageValue", "1")
    # Bounds: the signal's own (router settings), which the HPA must not contradict.
    router = load_settings(env={}).router
    assert (spec.min_replicas, spec.max_replicas) == (router.autoscale_min_replicas, router.autoscale_max_replicas)
    # The signal holds scale-downs; the HPA adds no 5-minute window of its own, and scales up at once.
    assert spec.behavior.scale_up.stabilization_window_seconds == 0
    assert spec.behavior.scale_down.stabilization_window_seconds <= 60
    assert [(p.type, p.value) for p in spec.behavior.scale_down.policies] == [("Pods", 1)]


def test_the_unknown_field_check_can_fail() -> None:
    bad = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
           "spec": {"maxReplicas": "10", "scaleTargetRef": {"kind": "StatefulSet", "name": "x"},
                    "metrics": [{"type": "External", "external": {"metric": {"name": METRIC},
                                                                  "target": {"type": "AverageValue",
                                                                             "averageValue": "1"}}}],
                    "behaviour": {}}}
    problems = _unknown_fields(bad, "V2HorizontalPodAutoscaler", "hpa")
    assert problems == ["hpa.spec.maxReplicas: int expected, got '10'", "hpa.spec.behaviour: not a field of "
                        "V2HorizontalPodAutoscalerSpec"]
    with pytest.raises(ValueError, match="scaleTargetRef"):
        _as_model({"spec": {"maxReplicas": 3}}, "V2HorizontalPodAutoscaler")


def test_the_prometheus_adapter_rule_serves_the_metric_the_hpa_reads(hpa_build: list[Doc]) -> None:
    rules = yaml.safe_load(_one(hpa_build, "ConfigMap", "mesh-prometheus-adapter-rules")["data"]["config.yaml"])
    (rule,) = rules["externalRules"]
    assert set(rule) == {"seriesQuery", "resources", "name", "metricsQuery"}
    assert METRIC in rule["seriesQuery"]
    assert re.fullmatch(rule["name"]["matches"], METRIC) and rule["name"]["as"] == METRIC
    assert rule["resources"]["overrides"]["namespace"] == {"resource": "namespace"}
    # The HPA's selector arrives as <<.LabelMatchers>>; max over the routers' series.
    assert rule["metricsQuery"] == "max(<<.Series>>{<<.LabelMatchers>>})"


# --- KEDA ScaledObject --------------------------------------------------------------------------

# The fields of KEDA's ScaledObject CRD (keda.sh/v1alpha1, config/crd/bases/keda.sh_scaledobjects.yaml
# of KEDA 2.x), as far as these manifests may use them.
KEDA_SPEC = {"scaleTargetRef", "pollingInterval", "cooldownPeriod", "idleReplicaCount", "minReplicaCount",
             "maxReplicaCount", "fallback", "advanced", "triggers"}
KEDA_TARGET = {"apiVersion", "kind", "name", "envSourceContainerName"}
KEDA_TRIGGER = {"type", "name", "metadata", "metricType", "authenticationRef"}
KEDA_ADVANCED = {"restoreToOriginalReplicaCount", "horizontalPodAutoscalerConfig"}
KEDA_INTEGERS = {"pollingInterval", "cooldownPeriod", "idleReplicaCount", "minReplicaCount", "maxReplicaCount"}
# The prometheus scaler's parameters (keda.sh/docs/latest/scalers/prometheus).
PROMETHEUS_METADATA = {"serverAddress", "query", "queryParameters", "threshold", "activationThreshold",
                       "namespace", "customHeaders", "ignoreNullValues", "unsafeSsl", "timeout"}


def test_the_keda_component_renders_a_scaledobject_on_the_runtime_statefulset(keda_build: list[Doc]) -> None:
    so = _one(keda_build, "ScaledObject", "mesh-runtime")
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    spec = so["spec"]
    assert set(spec) <= KEDA_SPEC and {"scaleTargetRef", "triggers"} <= set(spec)
    assert all(isinstance(spec[k], int) for k in KEDA_INTEGERS & set(spec))
    target = spec["scaleTargetRef"]
    assert set(target) <= KEDA_TARGET and target["name"]
    statefulset = _one(keda_build, target["kind"], target["name"])
    assert target["apiVersion"] == statefulset["apiVersion"] == "apps/v1"
    assert so["metadata"]["namespace"] == statefulset["metadata"]["namespace"]
    assert "replicas" not in statefulset["spec"]
    # KEDA makes its own HPA: the build must not hold another one fighting it.
    assert not [d for d in keda_build if d["kind"] == "HorizontalPodAutoscaler"]
    # Scale to zero is what KEDA adds over an HPA; losing the metric holds the fallback instead.
    assert spec["minReplicaCount"] == 0
    assert spec["maxReplicaCount"] == load_settings(env={}).router.autoscale_max_replicas
    assert set(spec["fallback"]) == {"failureThreshold", "replicas"} and spec["fallback"]["replicas"] >= 1
    assert set(spec["advanced"]) <= KEDA_ADVANCED
    # The behaviour KEDA passes to its HPA is autoscaling/v2's.
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert _unknown_fields(behavior, "V2HorizontalPodAutoscalerBehavior", "behavior") == []

    (trigger,) = spec["triggers"]
    assert set(trigger) <= KEDA_TRIGGER
    assert (trigger["type"], trigger["metricType"]) == ("prometheus", "AverageValue")  # fallback needs it
    metadata = trigger["metadata"]
    assert set(metadata) <= PROMETHEUS_METADATA and {"serverAddress", "query", "threshold"} <= set(metadata)
    assert all(isinstance(v, str) for v in metadata.values()), "the CRD types trigger metadata as strings"
    assert float(metadata["threshold"]) == 1.0 and 0 < float(metadata["activationThreshold"]) < 1
    assert metadata["ignoreNullValues"] == "false"
    assert re.fullmatch(r'max\(mesh_runtime_replicas_desired\{namespace="mesh-serving", runtime=""\}\)',
                        metadata["query"])


def test_each_component_is_an_alternative_to_the_other() -> None:
    for component in ("hpa", "keda"):
        kustomization = yaml.safe_load((AUTOSCALING / component / "kustomization.yaml").read_text())
        assert kustomization["kind"] == "Component"
    base = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert not any("autoscaling" in str(r) for r in base.get("resources", [])), "not in the base"


def test_the_router_exports_the_series_the_manifests_select() -> None:
    """RouterMetrics serves the gauge with the label the HPA selects and the KEDA query names."""
    scaler = Autoscaler(AutoscaleConfig())
    signal = scaler.decide(Demand("", 1, 10**9, working_set_bytes=3 * 10**9), 0.0)
    metrics = RouterMetrics()
    metrics.attach_autoscaling(lambda: {"": signal, "sklearn": signal})
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(metrics.registry).decode())}
    samples = {tuple(sorted(s.labels.items())): s.value for s in families[METRIC].samples}
    assert samples[(("runtime", ""),)] == signal.desired == 4
    assert samples[(("runtime", "sklearn"),)] == 4
