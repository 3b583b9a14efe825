"""deploy/: the Predictor CRD, its examples, and the kustomize base that runs the whole mesh.

The CRD's schema is checked as the API server applies it: the examples validate, and malformed
Predictors fail with an error naming the field. One rule is made explicit here: the API server
rejects unknown fields through strict field validation (`kubectl apply`'s default), because a
structural schema may not say ``additionalProperties: false``; so before validating, each object
schema with properties is closed. That the schema stays structural is checked too, since the API
server refuses a CRD that is not.

The manifests are checked on what ``kubectl kustomize`` builds, not on the files: names the
generator rewrites (the config's hash suffix) and the namespace are then the ones a cluster sees.
kubectl is required (.ci/run installs Debian's kubernetes-client): without it these tests fail
rather than skip.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator
from kubernetes import client as k8s_client

from mesh.runtime.loaders import get_loader
from mesh.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CRD_FILE = DEPLOY / "crd" / "serving.kserve.io_predictors.yaml"
# The example storage-config Secret sits beside the example Predictors.
STORAGE_CONFIG = DEPLOY / "examples" / "storage-config.yaml"
# So does an example InferenceGraph over two of them (tests/unit/test_controller_graphs.py checks it).
GRAPH_EXAMPLE = DEPLOY / "examples" / "inference-graph.yaml"
EXAMPLES = sorted(p for p in (DEPLOY / "examples").glob("*.yaml") if p not in (STORAGE_CONFIG, GRAPH_EXAMPLE))
NAMESPACE = "mesh-serving"
MESH_IMAGE = "ghcr.io/mesh-serving/mesh"

Doc = dict[str, Any]


# --- the CRD's schema ------------------------------------------------------------------------

def _crd() -> Doc:
    crd: Doc = yaml.safe_load(CRD_FILE.read_text())
    return crd


def _schema() -> Doc:
    (version,) = [v for v in _crd()["spec"]["versions"] if v["name"] == "v1alpha1"]
    schema: Doc = version["schema"]["openAPIV3Schema"]
    return schema


def _strict(node: Any) -> Any:
    """The schema with every object that lists its properties closed to others (strict field
    validation) and the Kubernetes extensions dropped."""
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node:
        out["additionalProperties"] = False
    return out


def _validator(schema: Doc | None = None) -> Draft202012Validator:
    schema = _strict(_schema() if schema is None else schema)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def _error_text(errors: list[Any]) -> str:
    """Every error's location and message, with the branches of anyOf failures."""
    parts = []
    for e in errors:
        parts.append(f"{e.json_path}: {e.message}")
        parts.append(_error_text(list(e.context or ())))
    return "\n".join(p for p in parts if p)


_JUNCTORS = ("anyOf", "allOf", "oneOf", "not")


def _structural_problems(node: Doc, path: str, skeleton: Doc | None = None) -> list[str]:
    """The API server's structural-schema rules that a hand-written schema can break. ``skeleton``
    is, inside anyOf/allOf/oneOf/not, the schema outside them at the same place."""
    in_junctor = skeleton is not None
    outer = node if skeleton is None else skeleton
    problems = []
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{path}: properties and additionalProperties are mutually exclusive")
    if in_junctor:
        for key in ("type", "description", "default", "additionalProperties", "nullable"):
            if key in node:
                problems.append(f"{path}: {key} is not allowed inside anyOf/allOf/oneOf/not")
    elif "type" not in node:
        problems.append(f"{path}: every schema outside anyOf/allOf/oneOf/not needs a type")
    if node.get("type") not in (None, "object") and "properties" in node:
        problems.append(f"{path}: properties on a {node['type']}")
    for name, sub in node.get("properties", {}).items():
        if name not in outer.get("properties", {}):
            problems.append(f"{path}.{name}: inside a junctor but not in the schema outside it")
            continue
        problems += _structural_problems(sub, f"{path}.{name}", outer["properties"][name] if in_junctor else None)
    if isinstance(node.get("additionalProperties"), dict):
        problems += _structural_problems(node["additionalProperties"], f"{path}[*]")
    for key in _JUNCTORS:
        branches = node.get(key, [])
        for i, branch in enumerate(branches if isinstance(branches, list) else [branches]):
            problems += _structural_problems(branch, f"{path}.{key}[{i}]", outer)
    return problems


def test_crd_defines_the_modelmesh_serving_predictor() -> None:
    crd = _crd()
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["metadata"]["name"] == "predictors.serving.kserve.io"
    spec = crd["spec"]
    assert spec["group"] == "serving.kserve.io"
    assert spec["scope"] == "Namespaced"
    assert (spec["names"]["kind"], spec["names"]["plural"]) == ("Predictor", "predictors")
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}
    assert "x-kubernetes-preserve-unknown-fields" not in CRD_FILE.read_text()


ISVC_CRD_FILE = DEPLOY / "crd" / "serving.kserve.io_inferenceservices.yaml"


def test_the_inferenceservice_crd_for_clusters_without_kserve() -> None:
    """KServe's own names (it must be the same resource as KServe's), structural, and it takes the
    quickstart InferenceServices of modelmesh-serving (README's example among them) and refuses a
    status outside the enums. Not in the base: it would clash with KServe's CRD where that is installed."""
    crd: Doc = yaml.safe_load(ISVC_CRD_FILE.read_text())
    assert crd["metadata"]["name"] == "inferenceservices.serving.kserve.io"
    names = crd["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == ("InferenceService", "inferenceservices", ["isvc"])
    (version,) = crd["spec"]["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1beta1", True, True)
    assert version["subresources"] == {"status": {}}
    schema = version["schema"]["openAPIV3Schema"]
    assert _structural_problems(schema, "openAPIV3Schema") == []
    validator = _validator(schema)
    quickstart = {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
                  "metadata": {"name": "example-sklearn-isvc",
                               "annotations": {"serving.kserve.io/deploymentMode": "ModelMesh"}},
                  "spec": {"predictor": {"model": {"modelFormat": {"name": "sklearn"},
                                                   "storage": {"key": "localMinIO",
                                                               "path": "sklearn/mnist-svm.joblib"}}}}}
    older = {**quickstart, "spec": {"predictor": {"sklearn": {"storageUri": "s3://b/sklearn/mnist-svm.joblib"}}}}
    for obj in (quickstart, older):
        assert list(validator.iter_errors(obj)) == []
    bad = {**quickstart, "status": {"modelStatus": {"transitionStatus": "Sideways"}}}
    assert list(validator.iter_errors(bad))
    base = (DEPLOY / "kustomization.yaml").read_text()
    assert "inferenceservices" not in base


def test_printer_columns_match_modelmesh_serving() -> None:
    (version,) = _crd()["spec"]["versions"]
    assert version["additionalPrinterColumns"] == [
        {"name": "Type", "type": "string", "jsonPath": ".spec.modelType.name"},
        {"name": "Available", "type": "boolean", "jsonPath": ".status.available"},
        {"name": "ActiveModel", "type": "string", "jsonPath": ".status.activeModelState"},
        {"name": "TargetModel", "type": "string", "jsonPath": ".status.targetModelState"},
        {"name": "Transition", "type": "string", "jsonPath": ".status.transitionStatus"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]


def test_schema_is_structural_and_its_defaults_are_valid() -> None:
    schema = _schema()
    assert _structural_problems(schema, "openAPIV3Schema") == []
    status = schema["properties"]["status"]
    assert list(_validator(status).iter_errors(status["default"])) == []


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_a_valid_predictor(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs, f"{path.name} holds no document"
    spec_validator = _validator(_schema()["properties"]["spec"])
    for doc in docs:
        assert (doc["apiVersion"], doc["kind"]) == ("serving.kserve.io/v1alpha1", "Predictor")
        # The controller watches its own namespace: `kubectl apply -f` must land there.
        assert doc["metadata"]["namespace"] == NAMESPACE
        assert _error_text(list(_validator().iter_errors(doc))) == ""
        assert _error_text(list(spec_validator.iter_errors(doc["spec"]))) == ""


def test_examples_cover_each_model_type_and_storage_form() -> None:
    specs = [d["spec"] for p in EXAMPLES for d in yaml.safe_load_all(p.read_text()) if d]
    types = {s["modelType"]["name"] for s in specs}
    assert types >= {"sklearn", "xgboost", "lightgbm", "onnx", "pytorch"}
    for name in types:
        get_loader(name)  # every example's type has a built-in loader (pytorch is torchscript's alias)
    storages = [s.get("storage", {}) for s in specs]
    assert any("s3" in st and "path" in s for s, st in zip(specs, storages, strict=True))
    assert any("persistentVolumeClaim" in st for st in storages)
    assert any({"key", "path"} <= set(st) for st in storages)
    assert any("parameters" in st for st in storages)


def _predictor() -> Doc:
    return {
        "apiVersion": "serving.kserve.io/v1alpha1",
        "kind": "Predictor",
        "metadata": {"name": "m", "namespace": NAMESPACE},
        "spec": {"modelType": {"name": "sklearn"}, "storage": {"key": "store", "path": "m.joblib"}},
        "status": {"available": False, "activeModelState": "Pending", "targetModelState": "",
                   "transitionStatus": "UpToDate", "failedCopies": 0, "totalCopies": 0},
    }


_DELETE = object()


def _changed(dotted: str, value: Any) -> Doc:
    doc = _predictor()
    *parents, last = dotted.split(".")
    node = doc
    for key in parents:
        node = node.setdefault(key, {})
    if value is _DELETE:
        del node[last]
    else:
        node[last] = copy.deepcopy(value)
    return doc


def test_the_reference_predictor_is_valid() -> None:
    assert _error_text(list(_validator().iter_errors(_predictor()))) == ""


@pytest.mark.parametrize(("dotted", "value", "field"), [
    ("spec", _DELETE, "spec"),
    ("spec.modelType", _DELETE, "modelType"),
    ("spec.modelType", "sklearn", "modelType"),
    ("spec.modelType.name", "", "modelType.name"),
    ("spec.modelType.name", 3, "modelType.name"),
    ("spec.path", 7, "spec.path"),
    ("spec.storage.path", _DELETE, "path"),  # no path anywhere
    ("spec.storage.path", "", "path"),
    ("spec.storage.parameters", {"bucket": 1}, "parameters.bucket"),
    ("spec.storage.persistentVolumeClaim", {"readOnly": True}, "claimName"),
    ("spec.storage.s3", {"bucket": "models"}, "secretKey"),
    ("spec.runtime", {}, "runtime"),
    ("spec.protocolVersion", "grpc-v3", "protocolVersion"),
    ("spec.gpu", True, "gpu"),  # modelmesh-serving's GpuRequest: "required" or "preferred"
    ("spec.replicas", 2, "replicas"),  # unknown spec field
    ("spec.storage.bucket", "models", "bucket"),  # unknown storage field
    ("status.available", "yes", "available"),
    ("status.activeModelState", "Ready", "activeModelState"),
    ("status.transitionStatus", "Done", "transitionStatus"),
    ("status.totalCopies", -1, "totalCopies"),
    ("status.failedCopies", -2, "failedCopies"),
    ("status.lastFailureInfo", {"reason": "OutOfMemory"}, "reason"),
])
def test_malformed_predictor_is_rejected_naming_the_field(dotted: str, value: Any, field: str) -> None:
    errors = list(_validator().iter_errors(_changed(dotted, value)))
    assert errors, f"{dotted} = {value!r} was accepted"
    assert field in _error_text(errors)


# --- the kustomize base ----------------------------------------------------------------------

def _kustomize(path: Path) -> list[Doc]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not installed (CI installs Debian's kubernetes-client, see .ci/run)")
    done = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


@pytest.fixture(scope="module")
def base() -> list[Doc]:
    return _kustomize(DEPLOY)


def _one(docs: list[Doc], kind: str, name: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _workloads(docs: list[Doc]) -> list[Doc]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]


def _container(workload: Doc) -> Doc:
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return container


def _env(container: Doc) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def _selects(selector: Doc, labels: dict[str, str]) -> bool:
    """A label selector (matchLabels and matchExpressions, or a Service's plain map) against labels."""
    plain = {k: v for k, v in selector.items() if k not in ("matchLabels", "matchExpressions")}
    wanted = {**plain, **selector.get("matchLabels", {})}
    if any(labels.get(k) != v for k, v in wanted.items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {"In": labels.get(key) in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def _bytes(quantity: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "k": 10**3, "M": 10**6, "G": 10**9}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(float(quantity[: -len(suffix)]) * factor)
    return int(quantity)


def test_base_deploys_every_part(base: list[Doc]) -> None:
    kinds = {d["kind"] for d in base}
    assert kinds >= {"CustomResourceDefinition", "Namespace", "StatefulSet", "Deployment", "Service",
                     "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "PodDisruptionBudget"}
    assert _one(base, "CustomResourceDefinition", "predictors.serving.kserve.io") == _crd()
    for kind, name in [("StatefulSet", "mesh-etcd"), ("StatefulSet", "mesh-runtime"),
                       ("Deployment", "mesh-router"), ("Deployment", "mesh-controller"),
                       ("Service", "mesh-etcd"), ("Service", "mesh-router"), ("Service", "mesh-runtime"),
                       ("PodDisruptionBudget", "mesh-router"), ("PodDisruptionBudget", "mesh-runtime")]:
        _one(base, kind, name)
    for doc in base:
        if doc["kind"] not in ("CustomResourceDefinition", "Namespace"):
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{doc['kind']}/{doc['metadata']['name']}"


def test_controller_role_grants_only_reads_status_writes_and_events(base: list[Doc]) -> None:
    role = _one(base, "Role", "mesh-controller")
    assert role["rules"] == [
        {"apiGroups": ["serving.kserve.io"],
         "resources": ["predictors", "inferenceservices", "servingruntimes", "inferencegraphs"],
         "verbs": ["get", "list", "watch"]},
        {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]},
        {"apiGroups": ["serving.kserve.io"],
         "resources": ["predictors/status", "inferenceservices/status", "inferencegraphs/status"],
         "verbs": ["get", "patch", "update"]},
    ]
    assert not [d for d in base if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    binding = _one(base, "RoleBinding", "mesh-controller")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "mesh-controller"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "mesh-controller", "namespace": NAMESPACE}]
    _one(base, "ServiceAccount", "mesh-controller")
    for workload in _workloads(base):
        pod = workload["spec"]["template"]["spec"]
        if workload["metadata"]["name"] == "mesh-controller":
            assert pod["serviceAccountName"] == "mesh-controller"
        else:  # nothing else talks to the Kubernetes API, so nothing else holds a token
            assert pod.get("automountServiceAccountToken") is False, workload["metadata"]["name"]


def test_mesh_pods_run_mesh_serve_with_the_shared_config(base: list[Doc]) -> None:
    config_maps = {d["metadata"]["name"] for d in base if d["kind"] == "ConfigMap"}
    components = set()
    for workload in _workloads(base):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            if not container["image"].startswith(MESH_IMAGE + ":"):
                continue
            assert container["command"][:2] == ["mesh", "serve"], workload["metadata"]["name"]
            components.add(container["command"][2])
            config = Path(_env(container)["MESH_CONFIG"])
            (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(config.parent)]
            (volume,) = [v for v in workload["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
            assert volume["configMap"]["name"] in config_maps
            assert volume["configMap"]["name"].startswith("mesh-config")
    assert components == {"router", "runtime", "controller"}


def _mesh_toml(base: list[Doc]) -> str:
    (config,) = [d for d in base if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("mesh-config")]
    text: str = config["data"]["mesh.toml"]
    return text


def test_config_parses_with_the_settings_loader(base: list[Doc], tmp_path: Path) -> None:
    config = tmp_path / "mesh.toml"
    config.write_text(_mesh_toml(base))
    settings = load_settings(config, env={})
    assert settings.router.host == "0.0.0.0"
    assert settings.runtime.host == "0.0.0.0"
    assert settings.runtime.capacity_fraction == 0.5
    assert settings.runtime.capacity_bytes == 0  # capacity comes from the memory limit
    # The registry is the etcd client Service.
    assert settings.registry.url == "etcd://mesh-etcd:2379/mesh/"
    assert [p["port"] for p in _one(base, "Service", "mesh-etcd")["spec"]["ports"]] == [2379]
    # The ports the settings bind are the ones the pods declare.
    assert {p["containerPort"] for p in _container(_one(base, "Deployment", "mesh-router"))["ports"]} \
        == {settings.router.port, settings.router.rest_port, 2112}
    assert {p["containerPort"] for p in _container(_one(base, "StatefulSet", "mesh-runtime"))["ports"]} \
        == {settings.runtime.port, settings.runtime.health_port, 2112}
    # Confined model files, metrics reachable by Prometheus, etcd over TLS with the pod's certificate.
    assert settings.runtime.model_roots == ("/models",)
    assert settings.router.metrics_host == settings.runtime.metrics_host == "0.0.0.0"
    assert (settings.registry.ca_file, settings.registry.cert_file) == ("/etc/mesh-pki/ca.crt",
                                                                       "/etc/mesh-pki/tls.crt")
    assert settings.tls.runtime_server_name == "mesh-runtime"


def _mounts(container: Doc) -> dict[str, Doc]:
    return {m["name"]: m for m in container["volumeMounts"]}


def _volumes(workload: Doc) -> dict[str, Doc]:
    return {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}


def test_runtimes_pull_with_the_storage_config_secret_into_a_bounded_disk_cache(
        base: list[Doc], tmp_path: Path) -> None:
    config = tmp_path / "mesh.toml"
    config.write_text(_mesh_toml(base))
    settings = load_settings(config, env={}).storage
    runtime = _one(base, "StatefulSet", "mesh-runtime")
    mounts, volumes = _mounts(_container(runtime)), _volumes(runtime)
    # The storage keys: the Secret storage-config as modelmesh-serving mounts it, read-only, and
    # optional, so that a mesh without object storage starts.
    assert (mounts["storage-config"]["mountPath"], mounts["storage-config"]["readOnly"]) == (
        settings.config_dir, True)
    assert settings.config_dir == "/storage-config"
    assert volumes["storage-config"]["secret"] == {"secretName": "storage-config", "optional": True}
    # The disk cache: a folder of its own volume, bounded below the volume's limit (the kubelet
    # evicts a pod whose emptyDir passes it).
    cache = mounts["storage-cache"]["mountPath"]
    assert settings.cache_dir.startswith(cache + "/") and not mounts["storage-cache"].get("readOnly")
    assert 0 < settings.cache_bytes < _bytes(volumes["storage-cache"]["emptyDir"]["sizeLimit"])
    assert settings.pvc_mounts_dir == "/pvc_mounts"
    # No other mount lies under the cache or the claims' folder.
    others = [m["mountPath"] for n, m in mounts.items() if n != "storage-cache"]
    assert not [m for m in others if m.startswith((cache + "/", settings.pvc_mounts_dir + "/"))]


def test_the_controller_reads_unnamed_storage_from_the_default_key(base: list[Doc], tmp_path: Path) -> None:
    """modelmesh-serving's puller reads a Predictor that names no storage from the key `default`."""
    config = tmp_path / "mesh.toml"
    config.write_text(_mesh_toml(base))
    controller = _container(_one(base, "Deployment", "mesh-controller"))
    assert _env(controller)["MESH_CONFIG"] == "/etc/mesh/mesh.toml"  # it reads mesh.toml
    env = {k: v if isinstance(v, str) else "ns" for k, v in _env(controller).items()}
    assert load_settings(config, env=env).controller.default_storage_key == "default"


def test_the_example_storage_config_is_modelmesh_servings_quickstart_key(base: list[Doc]) -> None:
    (secret,) = [d for d in yaml.safe_load_all(STORAGE_CONFIG.read_text()) if d]
    assert (secret["apiVersion"], secret["kind"]) == ("v1", "Secret")
    runtime = _one(base, "StatefulSet", "mesh-runtime")
    assert secret["metadata"] == {"name": _volumes(runtime)["storage-config"]["secret"]["secretName"],
                                  "namespace": NAMESPACE}
    keys = {name: json.loads(text) for name, text in secret["stringData"].items()}
    assert list(keys) == ["localMinIO"]
    local = keys["localMinIO"]
    assert local == {"type": "s3", "access_key_id": local["access_key_id"],
                     "secret_access_key": local["secret_access_key"], "endpoint_url": "http://minio:9000",
                     "default_bucket": "modelmesh-example-models", "region": "us-south"}
    assert all(isinstance(v, str) for v in local.values())  # pullman requires the s3 fields as strings
    assert "EXAMPLE" in local["access_key_id"] and "EXAMPLE" in local["secret_access_key"]  # placeholders
    # Every example Predictor that names a storage key names this one.
    named = {st.get("key") or st.get("s3", {}).get("secretKey")
             for p in EXAMPLES for d in yaml.safe_load_all(p.read_text()) if d
             for st in [d["spec"].get("storage", {})]} - {None}
    assert named == {"localMinIO"}


def _with_pvc_component(tmp_path: Path) -> list[Doc]:
    """An overlay of one's own, outside deploy/, using deploy/storage-pvc as a Component."""
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    base = os.path.relpath(DEPLOY, overlay)
    (overlay / "kustomization.yaml").write_text(
        f"resources:\n  - {base}\ncomponents:\n  - {base}/storage-pvc\n")
    return _kustomize(overlay)


def _with_pvc_patch(tmp_path: Path) -> list[Doc]:
    """deploy/ with storage-pvc/runtime-pvc.yaml added to its patchesStrategicMerge (any kustomize)."""
    copy_ = tmp_path / "deploy"
    shutil.copytree(DEPLOY, copy_)
    with (copy_ / "kustomization.yaml").open("a") as f:
        f.write("patchesStrategicMerge:\n  - storage-pvc/runtime-pvc.yaml\n")
    return _kustomize(copy_)


@pytest.mark.parametrize("build", [_with_pvc_component, _with_pvc_patch], ids=["component", "patch"])
def test_storage_pvc_mounts_a_claim_read_only_where_the_runtime_reads_it(
        base: list[Doc], tmp_path: Path, build: Any) -> None:
    docs = build(tmp_path)
    config = tmp_path / "mesh.toml"
    config.write_text(_mesh_toml(docs))
    settings = load_settings(config, env={}).storage
    runtime = _one(docs, "StatefulSet", "mesh-runtime")
    mounts, volumes = _mounts(_container(runtime)), _volumes(runtime)
    claims = {name: v["persistentVolumeClaim"] for name, v in volumes.items() if "persistentVolumeClaim" in v}
    assert claims == {"pvc-mesh-models": {"claimName": "mesh-models", "readOnly": True}}
    assert mounts["pvc-mesh-models"] == {"name": "pvc-mesh-models", "readOnly": True,
                                         "mountPath": f"{settings.pvc_mounts_dir}/mesh-models"}
    # the claim the PVC example names
    (onnx,) = [d for p in EXAMPLES for d in yaml.safe_load_all(p.read_text())
               if d and "persistentVolumeClaim" in d["spec"].get("storage", {})]
    assert onnx["spec"]["storage"]["persistentVolumeClaim"]["claimName"] == "mesh-models"
    # Nothing else changes: the base's volumes stay, and every other object is the base's.
    assert set(_volumes(_one(base, "StatefulSet", "mesh-runtime"))) == set(volumes) - {"pvc-mesh-models"}
    assert [d for d in docs if d["kind"] != "StatefulSet" or d["metadata"]["name"] != "mesh-runtime"] == [
        d for d in base if d["kind"] != "StatefulSet" or d["metadata"]["name"] != "mesh-runtime"]


def test_runtimes_run_model_code_in_workers_without_credentials(base: list[Doc], tmp_path: Path) -> None:
    config = tmp_path / "mesh.toml"
    config.write_text(_mesh_toml(base))
    env = {k: v if isinstance(v, str) else "10.0.0.1"
           for k, v in _env(_container(_one(base, "StatefulSet", "mesh-runtime"))).items()}
    settings = load_settings(config, env=env)
    assert settings.runtime.workers >= 1 and settings.runtime.server == ""


def test_the_mlserver_overlay_runs_mlserver_beside_each_runtime_without_mesh_credentials(
        base: list[Doc], tmp_path: Path) -> None:
    docs = _kustomize(DEPLOY.parent / "deploy-mlserver")
    runtime = _one(docs, "StatefulSet", "mesh-runtime")
    pod = runtime["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    assert set(containers) == {"runtime", "mlserver"}
    mesh, server = containers["runtime"], containers["mlserver"]
    config = tmp_path / "mesh.toml"
    config.write_text(_mesh_toml(docs))
    settings = load_settings(config, env={k: v if isinstance(v, str) else "10.0.0.1" for k, v in _env(mesh).items()})
    assert (settings.runtime.server, settings.runtime.workers) == ("mlserver", 0)
    # The capacity is MLServer's memory, less its own: not derived from the runtime's limit.
    assert 0 < settings.runtime.capacity_bytes < _bytes(containers["mlserver"]["resources"]["limits"]["memory"])
    # The runtime dials MLServer on the pod's loopback, where MLServer alone listens.
    server_env = _env(server)
    assert settings.runtime.server_address == f"127.0.0.1:{server_env['MLSERVER_GRPC_PORT']}"
    assert server_env["MLSERVER_HOST"] == "127.0.0.1"
    assert server_env["MLSERVER_LOAD_MODELS_AT_STARTUP"] == "false"
    # One repository, written by the runtime, read by MLServer; the models read-only there.
    repo = {m["name"]: m for m in mesh["volumeMounts"]}["mlserver-repo"]
    assert settings.runtime.server_repository == repo["mountPath"] == server["command"][-1]
    mounts = {m["name"]: m for m in server["volumeMounts"]}
    assert mounts["mlserver-repo"]["readOnly"] and mounts["models"]["readOnly"]
    assert mounts["models"]["mountPath"] in settings.runtime.model_roots
    # MLServer holds no mesh credential: no certificate, no configuration, no MESH_ setting.
    assert not {"pki", "config"} & set(mounts)
    assert not [k for k in server_env if k.startswith("MESH_")]
    assert server["securityContext"]["readOnlyRootFilesystem"] is True
    assert server["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert server["resources"]["limits"]["memory"] == server["resources"]["requests"]["memory"]
    # Everything else is the base, unchanged.
    assert len(docs) == len(base)


def test_pod_environment_names_known_settings(base: list[Doc], tmp_path: Path) -> None:
    config = tmp_path / "mesh.toml"
    config.write_text(_mesh_toml(base))
    for workload in _workloads(base):
        container = _container(workload)
        if container["image"].startswith(MESH_IMAGE + ":"):
            # Values from the downward API are strings in the pod: any string stands in for them.
            env = {k: v if isinstance(v, str) else "10.0.0.1" for k, v in _env(container).items()}
            load_settings(config, env=env)  # an unknown MESH_<GROUP>_<FIELD> raises


def test_runtime_capacity_comes_from_its_memory_limit(base: list[Doc]) -> None:
    runtime = _one(base, "StatefulSet", "mesh-runtime")
    pod = runtime["spec"]["template"]["spec"]
    container = _container(runtime)
    assert runtime["spec"]["replicas"] == 3
    limit = container["resources"]["limits"]["memory"]
    assert _bytes(limit) >= 1 << 30
    assert container["resources"]["requests"]["memory"] == limit  # not evicted for what it was promised
    env = _env(container)
    assert env["MESH_RUNTIME_ADVERTISE_HOST"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert env["MESH_RUNTIME_INSTANCE_ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    # Probes on the plaintext health port: the gRPC port requires client certificates.
    assert container["readinessProbe"]["grpc"]["port"] == 8086
    assert container["livenessProbe"]["grpc"] == {"port": 8086, "service": "liveness"}
    assert env["MESH_TLS_CLIENT_AUTH"] == "require"
    assert env["MESH_TLS_ALLOWED_PEERS"] == "mesh-router,mesh-runtime"
    assert pod["terminationGracePeriodSeconds"] == 60
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
    (models,) = [m for m in container["volumeMounts"] if m["name"] == "models"]
    assert container["workingDir"] == models["mountPath"]
    (models_volume,) = [v for v in pod["volumes"] if v["name"] == "models"]
    assert models_volume["emptyDir"]["sizeLimit"]


def test_router_and_controller(base: list[Doc]) -> None:
    router = _one(base, "Deployment", "mesh-router")
    assert router["spec"]["replicas"] == 2
    container = _container(router)
    assert container["readinessProbe"]["grpc"]["port"] == 8033
    assert container["livenessProbe"]["grpc"] == {"port": 8033, "service": "liveness"}
    assert container["resources"]["limits"]["memory"]
    service = _one(base, "Service", "mesh-router")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"grpc": 8033, "rest": 8008, "metrics": 2112}
    # modelmesh-serving's Service name and ports, for clients that keep their address
    alias = _one(base, "Service", "modelmesh-serving")
    assert alias["spec"]["selector"] == service["spec"]["selector"]
    assert {p["port"]: p["targetPort"] for p in alias["spec"]["ports"]} == {8033: "grpc", 8008: "rest"}

    controller = _one(base, "Deployment", "mesh-controller")
    assert controller["spec"]["replicas"] == 1
    env = _env(_container(controller))
    assert env["MESH_CONTROLLER_ROUTER_ENDPOINT"] == "mesh-router:8033"
    assert env["MESH_CONTROLLER_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}


def test_etcd_keeps_its_data_and_is_probed(base: list[Doc]) -> None:
    etcd = _one(base, "StatefulSet", "mesh-etcd")
    assert etcd["spec"]["replicas"] == 1
    headless = _one(base, "Service", etcd["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    container = _container(etcd)
    assert container["image"] == "quay.io/coreos/etcd:v3.5.17"
    (claim,) = etcd["spec"]["volumeClaimTemplates"]
    assert any(m["name"] == claim["metadata"]["name"] for m in container["volumeMounts"])
    assert {"startupProbe", "livenessProbe", "readinessProbe"} <= set(container)
    assert any(a.startswith("--initial-cluster=mesh-etcd-0=") for a in container["command"])


def test_services_and_budgets_select_their_pods(base: list[Doc]) -> None:
    pods = {w["metadata"]["name"]: w["spec"]["template"] for w in _workloads(base)}
    for workload in _workloads(base):
        labels = pods[workload["metadata"]["name"]]["metadata"]["labels"]
        assert _selects(workload["spec"]["selector"], labels), workload["metadata"]["name"]
    for service in [d for d in base if d["kind"] == "Service"]:
        chosen = [n for n, t in pods.items() if _selects(service["spec"]["selector"], t["metadata"]["labels"])]
        assert len(chosen) == 1, f"Service/{service['metadata']['name']} selects {chosen}"
        ports = {p["name"] for c in pods[chosen[0]]["spec"]["containers"] for p in c["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, f"Service/{service['metadata']['name']}: {port}"
    for budget in [d for d in base if d["kind"] == "PodDisruptionBudget"]:
        chosen = [n for n, t in pods.items() if _selects(budget["spec"]["selector"], t["metadata"]["labels"])]
        assert chosen == [budget["metadata"]["name"]]
    assert _one(base, "PodDisruptionBudget", "mesh-router")["spec"]["maxUnavailable"] == 1
    assert _one(base, "PodDisruptionBudget", "mesh-runtime")["spec"]["maxUnavailable"] == 1
    # an unready runtime pod never blocks a drain (one budget covers every runtime's pods)
    runtime_budget = _one(base, "PodDisruptionBudget", "mesh-runtime")["spec"]
    assert runtime_budget["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    assert "unhealthyPodEvictionPolicy" in k8s_client.V1PodDisruptionBudgetSpec.attribute_map.values()


def test_monitoring_scrapes_routers_and_runtimes_and_ships_the_dashboard(base: list[Doc]) -> None:
    monitoring = _kustomize(DEPLOY / "monitoring")
    (monitor,) = [d for d in monitoring if d["kind"] == "ServiceMonitor"]
    assert monitor["metadata"]["namespace"] == NAMESPACE
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    scraped = {s["metadata"]["name"] for s in base
               if s["kind"] == "Service" and _selects(monitor["spec"]["selector"], s["metadata"]["labels"])}
    assert scraped == {"mesh-router", "mesh-runtime"}
    for name in scraped:
        ports = {p["name"]: p["port"] for p in _one(base, "Service", name)["spec"]["ports"]}
        assert ports["metrics"] == 2112

    (dashboard,) = [d for d in monitoring if d["kind"] == "ConfigMap"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["namespace"] == NAMESPACE
    (text,) = dashboard["data"].values()
    assert json.loads(text) == json.loads((DEPLOY / "grafana" / "mesh-dashboard.json").read_text())
    assert json.loads(text)["uid"] == "mesh-serving"


def _pods(base: list[Doc]) -> list[tuple[str, Doc]]:
    """(name, pod template spec) of every workload, the bootstrap Job's included."""
    return [(d["metadata"]["name"], d["spec"]["template"]) for d in base if d["kind"] in ("Deployment",
                                                                                           "StatefulSet", "Job")]


def test_every_pod_meets_the_restricted_pod_security_standard(base: list[Doc]) -> None:
    namespace = _one(base, "Namespace", NAMESPACE)
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for name, template in _pods(base):
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"]["drop"] == ["ALL"], name
            assert context["readOnlyRootFilesystem"] is True, name
        for volume in pod.get("volumes", []):
            if "emptyDir" in volume:
                assert volume["emptyDir"].get("sizeLimit"), f"{name}: emptyDir {volume['name']} without a limit"


def test_network_policies_cover_every_pod_and_name_real_ports(base: list[Doc]) -> None:
    policies = [d for d in base if d["kind"] == "NetworkPolicy"]
    for name, template in _pods(base):
        labels = template["metadata"]["labels"]
        mine = [p for p in policies if _selects(p["spec"]["podSelector"], labels)]
        assert len(mine) == 1, f"{name}: {len(mine)} policies"
        ports = {port["name"] for c in template["spec"]["containers"] for port in c.get("ports", [])}
        for rule in mine[0]["spec"]["ingress"]:
            for port in rule.get("ports", []):
                assert port["port"] in ports, f"{name}: policy names port {port['port']}, pod has {ports}"
    runtime = _one(base, "NetworkPolicy", "mesh-runtime")["spec"]["ingress"]
    (grpc_rule,) = [r for r in runtime if {"port": "grpc"} in r.get("ports", [])]
    callers = {peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for peer in grpc_rule["from"]}
    assert callers == {"mesh-router", "mesh-runtime"}
    etcd = _one(base, "NetworkPolicy", "mesh-etcd")["spec"]["ingress"]
    (client_rule,) = [r for r in etcd if {"port": "client"} in r.get("ports", [])]
    callers = {peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for peer in client_rule["from"]}
    assert callers == {"mesh-router", "mesh-runtime", "mesh-etcd-bootstrap"}
    assert _one(base, "NetworkPolicy", "mesh-controller")["spec"]["ingress"] == []
    # Runtimes pull models from object storage wherever it is: their egress stays open.
    assert "Egress" not in _one(base, "NetworkPolicy", "mesh-runtime")["spec"]["policyTypes"]


def test_certificates_name_the_etcd_users_and_the_allowed_peers(base: list[Doc]) -> None:
    from mesh.registry.bootstrap import PERMISSIONS

    certificates = {d["spec"]["secretName"]: d["spec"] for d in base if d["kind"] == "Certificate"}
    secrets = {}
    for name, template in _pods(base):
        for volume in template["spec"].get("volumes", []):
            if "secret" in volume and volume["secret"]["secretName"] in certificates:
                secrets[name] = volume["secret"]["secretName"]
    common_names = {name: certificates[secret]["commonName"] for name, secret in secrets.items()}
    # The mesh's components are etcd users with the bootstrap's roles; the Job is root.
    assert common_names["mesh-router"] in PERMISSIONS and common_names["mesh-runtime"] in PERMISSIONS
    assert common_names["mesh-etcd-bootstrap"] == "root"
    assert "mesh-controller" not in secrets  # no etcd user, no certificate: it talks to routers
    env = _env(_container(_one(base, "StatefulSet", "mesh-runtime")))
    assert set(env["MESH_TLS_ALLOWED_PEERS"].split(",")) == {common_names["mesh-router"],
                                                             common_names["mesh-runtime"]}
    # Routers dial runtimes by pod IP and check this name in their certificate.
    assert "mesh-runtime" in certificates["mesh-runtime-tls"]["dnsNames"]
    etcd = _container(_one(base, "StatefulSet", "mesh-etcd"))["command"]
    assert "--client-cert-auth=true" in etcd and "--peer-client-cert-auth=true" in etcd
    assert all(not a.startswith("--listen-client-urls=http:") for a in etcd)
