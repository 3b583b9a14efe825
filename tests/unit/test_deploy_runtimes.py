"""deploy/crd's ServingRuntime CRDs and deploy/runtimes, the built-in runtimes run by the controller.

The CRDs are checked as tests/unit/test_deploy.py checks the Predictor's (its helpers: structural
rules, strict field validation made explicit), with one more rule of the API server: an object
marked ``x-kubernetes-preserve-unknown-fields`` keeps fields it does not list, so it is not closed.
modelmesh-serving's built-in runtimes are rebuilt here from docs/kserve-notes.md section 5's table
(they are described there, not vendored) and must validate; so must every runtime shipped.

The shipped runtimes are also read as the controller reads them (``mesh.controller.runtimes``):
they must be valid, and selection over them must send each format where deploy/runtimes says.
The overlay is checked on what ``kubectl kustomize`` builds from an overlay of one's own that uses
deploy/runtimes as a Component, as deploy/README.md tells users to.
"""

from __future__ import annotations

import copy
import json
import os
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh.controller.predictor import NO_SUPPORTING_RUNTIME
from mesh.controller.runtimes import (
    MESH,
    MLSERVER,
    RESERVED_PORTS,
    TRITON,
    RuntimeCatalog,
    ServingRuntime,
    parse_runtime,
)
from mesh.runtime.loaders import get_loader
from mesh.settings import load_settings
from tests.unit.test_deploy import (
    DEPLOY,
    NAMESPACE,
    ROOT,
    Doc,
    _container,
    _env,
    _error_text,
    _kustomize,
    _mesh_toml,
    _one,
    _structural_problems,
    _validator,
)

CRDS = {"ServingRuntime": DEPLOY / "crd" / "serving.kserve.io_servingruntimes.yaml",
        "ClusterServingRuntime": DEPLOY / "crd" / "serving.kserve.io_clusterservingruntimes.yaml"}
RUNTIMES = DEPLOY / "runtimes"
SHIPPED = ("mesh-runtime", "mlserver-1.x", "triton-2.x")
CONTROLLER_ACCOUNT = {"kind": "ServiceAccount", "name": "mesh-controller", "namespace": NAMESPACE}

# docs/kserve-notes.md section 5: modelmesh-serving's built-in ClusterServingRuntimes (image,
# protocolVersions, grpcDataEndpoint, serverType, runtimeManagementPort, formats as
# (name, version, autoSelect)). All are multiModel with grpcEndpoint "port:8085",
# memBufferBytes 134217728 and modelLoadingTimeoutMillis 90000.
MMS_RUNTIMES: dict[str, tuple[str, list[str], str, str, int, list[tuple[str, str, bool]]]] = {
    "mlserver-1.x": ("seldonio/mlserver:1.3.2", ["grpc-v2"], "port:8001", "mlserver", 8001,
                     [("sklearn", "0", True), ("xgboost", "1", True), ("lightgbm", "3", True)]),
    "triton-2.x": ("nvcr.io/nvidia/tritonserver:23.04-py3", ["grpc-v2"], "port:8001", "triton", 8001,
                   [("keras", "2", True), ("onnx", "1", True), ("pytorch", "1", True), ("tensorflow", "1", True),
                    ("tensorflow", "2", True), ("tensorrt", "7", True), ("sklearn", "0", False),
                    ("xgboost", "1", False), ("lightgbm", "3", False)]),
    "ovms-1.x": ("openvino/model_server:2022.2", ["grpc-v1"], "port:8001", "ovms", 8888,
                 [("openvino_ir", "opset1", True), ("onnx", "1", False)]),
    "torchserve-0.x": ("pytorch/torchserve:0.7.1-cpu", [], "port:7070", "torchserve", 7071,
                       [("pytorch-mar", "0", True)]),
}
MMS_ANNOTATIONS = {"triton-2.x": {"maxLoadingConcurrency": "2"}}


def _mms_runtime(name: str) -> Doc:
    image, protocols, data, server, port, formats = MMS_RUNTIMES[name]
    spec: Doc = {
        "supportedModelFormats": [{"name": n, "version": v, "autoSelect": a} for n, v, a in formats],
        "multiModel": True,
        "grpcEndpoint": "port:8085",
        "grpcDataEndpoint": data,
        "containers": [{"name": server, "image": image}],
        "builtInAdapter": {"serverType": server, "runtimeManagementPort": port, "memBufferBytes": 134217728,
                           "modelLoadingTimeoutMillis": 90000},
    }
    if protocols:
        spec["protocolVersions"] = protocols
    metadata: Doc = {"name": name}
    if name in MMS_ANNOTATIONS:
        metadata["annotations"] = MMS_ANNOTATIONS[name]
    return {"apiVersion": "serving.kserve.io/v1alpha1", "kind": "ClusterServingRuntime", "metadata": metadata,
            "spec": spec}


def _shipped() -> dict[str, Doc]:
    docs = [d for p in sorted(RUNTIMES.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]
    return {d["metadata"]["name"]: d for d in docs if d.get("kind") == "ClusterServingRuntime"}


def _namespaced(runtime: Doc, namespace: str = "team-a") -> Doc:
    """The same runtime as a ServingRuntime of ``namespace``."""
    doc = copy.deepcopy(runtime)
    doc["kind"] = "ServingRuntime"
    doc["metadata"]["namespace"] = namespace
    return doc


# --- the CRDs ----------------------------------------------------------------------------------

def _crd(kind: str) -> Doc:
    crd: Doc = yaml.safe_load(CRDS[kind].read_text())
    return crd


def _schema(kind: str) -> Doc:
    (version,) = _crd(kind)["spec"]["versions"]
    schema: Doc = version["schema"]["openAPIV3Schema"]
    return schema


def _keep_preserved(node: Any) -> Any:
    """The schema with every object marked x-kubernetes-preserve-unknown-fields open to fields it
    does not list, as the API server keeps them (test_deploy's ``_strict`` then closes the others)."""
    if isinstance(node, list):
        return [_keep_preserved(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _keep_preserved(v) for k, v in node.items()}
    if node.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in node:
        out["additionalProperties"] = True
    return out


def _errors(kind: str, obj: Doc) -> str:
    return _error_text(list(_validator(_keep_preserved(_schema(kind))).iter_errors(obj)))


@pytest.mark.parametrize(("kind", "plural", "scope"), [("ServingRuntime", "servingruntimes", "Namespaced"),
                                                       ("ClusterServingRuntime", "clusterservingruntimes", "Cluster")])
def test_the_runtime_crds_have_kserves_names_and_are_structural(kind: str, plural: str, scope: str) -> None:
    crd = _crd(kind)
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["metadata"]["name"] == f"{plural}.serving.kserve.io"
    spec = crd["spec"]
    assert (spec["group"], spec["scope"]) == ("serving.kserve.io", scope)
    assert spec["names"] == {"kind": kind, "listKind": f"{kind}List", "plural": plural, "singular": plural[:-1]}
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert "subresources" not in version  # KServe's has none: its status is empty
    assert version["additionalPrinterColumns"] == [
        {"name": "Disabled", "type": "boolean", "jsonPath": ".spec.disabled"},
        {"name": "ModelType", "type": "string", "jsonPath": ".spec.supportedModelFormats[*].name"},
        {"name": "Containers", "type": "string", "jsonPath": ".spec.containers[*].name"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]
    schema = version["schema"]["openAPIV3Schema"]
    assert _structural_problems(schema, "openAPIV3Schema") == []
    assert schema["properties"]["status"] == {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    fields = schema["properties"]["spec"]["properties"]
    assert set(fields) >= {"supportedModelFormats", "multiModel", "disabled", "protocolVersions", "grpcEndpoint",
                           "grpcDataEndpoint", "httpDataEndpoint", "replicas", "storageHelper", "builtInAdapter",
                           "containers", "volumes", "nodeSelector", "affinity", "tolerations", "labels",
                           "annotations", "imagePullSecrets"}
    assert set(fields["builtInAdapter"]["properties"]) == {"serverType", "runtimeManagementPort", "memBufferBytes",
                                                           "modelLoadingTimeoutMillis", "env"}


def test_both_kinds_share_one_schema() -> None:
    assert _schema("ServingRuntime")["properties"] == _schema("ClusterServingRuntime")["properties"]


def test_the_runtime_crds_are_not_installed_by_the_base_or_the_overlay(overlay: list[Doc]) -> None:
    """They would replace KServe's where KServe is installed."""
    assert "servingruntimes" not in (DEPLOY / "kustomization.yaml").read_text()
    assert not [r for r in yaml.safe_load((RUNTIMES / "kustomization.yaml").read_text())["resources"] if "crd" in r]
    assert [d["metadata"]["name"] for d in overlay if d["kind"] == "CustomResourceDefinition"] == [
        "predictors.serving.kserve.io"]


@pytest.mark.parametrize("name", [*SHIPPED, *MMS_RUNTIMES])
def test_every_shipped_and_modelmesh_serving_runtime_validates_as_either_kind(name: str) -> None:
    runtime = _shipped()[name] if name in SHIPPED else _mms_runtime(name)
    assert _errors("ClusterServingRuntime", runtime) == ""
    assert _errors("ServingRuntime", _namespaced(runtime)) == ""


def test_kserve_fields_beyond_the_typed_ones_are_kept() -> None:
    """Newer KServe spec fields and a container's other fields apply unchanged (preserved, not refused)."""
    runtime = _mms_runtime("mlserver-1.x")
    runtime["spec"].update({"hostIPC": False, "schedulerName": "custom", "workerSpec": {"pipelineParallelSize": 2},
                            "volumes": [{"name": "cache", "emptyDir": {"sizeLimit": "1Gi"}}],
                            "affinity": {"nodeAffinity": {}}, "tolerations": [{"key": "gpu", "effect": "NoSchedule"}],
                            "nodeSelector": {"pool": "cpu"}, "imagePullSecrets": [{"name": "registry"}]})
    runtime["spec"]["containers"][0].update({
        "livenessProbe": {"exec": {"command": ["true"]}}, "ports": [{"containerPort": 8001, "name": "grpc"}],
        "resources": {"limits": {"memory": "1Gi", "cpu": 5}},
        "env": [{"name": "A", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]})
    assert _errors("ClusterServingRuntime", runtime) == ""


_DELETE = object()


@pytest.mark.parametrize(("dotted", "value", "field"), [
    ("spec.containers", _DELETE, "containers"),
    ("spec.containers", [{"image": "seldonio/mlserver:1.3.2"}], "name"),
    ("spec.supportedModelFormats", [{"version": "1", "autoSelect": True}], "name"),
    ("spec.supportedModelFormats", [{"name": "sklearn", "autoSelect": True, "priority": 0}], "priority"),
    ("spec.supportedModelFormats", [{"name": "sklearn", "autoSelect": "yes"}], "autoSelect"),
    ("spec.supportedModelFormats", [{"name": "sklearn", "flavour": "x"}], "flavour"),
    ("spec.multiModel", "true", "multiModel"),
    ("spec.protocolVersions", "grpc-v2", "protocolVersions"),
    ("spec.builtInAdapter", {"serverType": "mlserver", "runtimeManagementPort": "8001"}, "runtimeManagementPort"),
    ("spec.builtInAdapter", {"serverType": "mlserver", "port": 8001}, "port"),
    ("spec.builtInAdapter", {"serverType": "mlserver", "env": [{"value": "1"}]}, "name"),
    ("spec.containers", [{"name": "mlserver", "ports": [{"name": "grpc"}]}], "containerPort"),
    ("spec.replicas", "2", "replicas"),
])
@pytest.mark.parametrize("kind", list(CRDS))
def test_a_malformed_runtime_is_refused_naming_the_field(kind: str, dotted: str, value: Any, field: str) -> None:
    runtime = _mms_runtime("mlserver-1.x")
    *parents, last = dotted.split(".")
    node = runtime
    for key in parents:
        node = node[key]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = copy.deepcopy(value)
    if kind == "ServingRuntime":
        runtime = _namespaced(runtime)
    errors = _errors(kind, runtime)
    assert errors, f"{dotted} = {value!r} was accepted"
    assert field in errors


# --- the shipped runtimes, as the controller reads them ----------------------------------------

def test_the_shipped_runtimes_are_the_mesh_and_modelmesh_servings_mlserver_and_triton() -> None:
    assert sorted(_shipped()) == sorted(SHIPPED)  # not ovms or torchserve: mesh-serving does not run them
    for name in ("ovms-1.x", "torchserve-0.x"):
        runtime = parse_runtime(_mms_runtime(name))
        assert runtime is not None and "not supported" in runtime.error


@pytest.mark.parametrize("name", ["mlserver-1.x", "triton-2.x"])
def test_mlserver_and_triton_carry_modelmesh_servings_values(name: str) -> None:
    """So that models naming them (`runtime: triton-2.x`) are served as before."""
    shipped, theirs = _shipped()[name], _mms_runtime(name)
    assert shipped["metadata"].get("annotations") == theirs["metadata"].get("annotations")
    for key, value in theirs["spec"].items():
        if key != "containers":
            assert shipped["spec"][key] == value, key
    (container,) = shipped["spec"]["containers"]
    assert {k: container[k] for k in ("name", "image")} == theirs["spec"]["containers"][0]


def _read(name: str, created: str = "") -> ServingRuntime:
    doc = _shipped()[name]
    doc["metadata"]["creationTimestamp"] = created
    runtime = parse_runtime(doc)
    assert runtime is not None, f"{name} is not a multi-model runtime"
    assert runtime.error == "", f"{name}: {runtime.error}"
    return runtime


def test_every_shipped_runtime_is_valid_for_the_controller() -> None:
    mesh, mlserver, triton = (_read(n) for n in SHIPPED)
    assert (mesh.server_type, mesh.ref, mesh.namespace) == (MESH, "mesh-runtime", "")
    assert (mlserver.server_type, mlserver.server_port) == (MLSERVER, 8001)
    assert (triton.server_type, triton.server_port) == (TRITON, 8001)
    for runtime in (mlserver, triton):
        assert (runtime.mem_buffer_bytes, runtime.loading_timeout_ms) == (134217728, 90000)


def test_the_mesh_runtime_lists_what_the_mesh_image_loads(base: list[Doc]) -> None:
    runtime = _read("mesh-runtime")
    assert {f.name for f in runtime.formats} >= {"sklearn", "xgboost", "lightgbm", "onnx", "pytorch"}
    for model_type in runtime.mesh_types():
        get_loader(model_type)
    assert all(f.auto_select and f.priority >= 1 for f in runtime.formats)
    assert set(runtime.protocols) == {"grpc-v2", "v2"}
    # Each version is the major version of the library pinned for the image (pyproject.toml).
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = dict(spec.split("==") for spec in [*project["dependencies"], *project["optional-dependencies"]["runtimes"]]
                if "==" in spec)
    library = {"sklearn": "scikit-learn", "xgboost": "xgboost-cpu", "lightgbm": "lightgbm", "onnx": "onnxruntime",
               "pytorch": "torch"}
    for f in runtime.formats:
        if f.name in library:
            assert f.version == pins[library[f.name]].split(".")[0], f.name
    # The container's resources and image are the base's fixed runtime's.
    (container,) = runtime.spec["containers"]
    fixed = _container(_one(base, "StatefulSet", "mesh-runtime"))
    assert (container["resources"], container["image"]) == (fixed["resources"], fixed["image"])


def test_no_server_container_takes_a_port_of_the_mesh_runtime() -> None:
    for name in SHIPPED:
        for container in _shipped()[name]["spec"]["containers"]:
            text = yaml.safe_dump(container)
            assert not [p for p in RESERVED_PORTS if re.search(rf"\b{p}\b", text)], (name, container["name"])
    env = _env(_shipped()["mlserver-1.x"]["spec"]["containers"][0])
    ports = [int(v) for k, v in env.items() if k.startswith("MLSERVER_") and k.endswith("_PORT")]
    assert len(set(ports)) == len(ports) and 8080 not in ports
    assert int(env["MLSERVER_GRPC_PORT"]) == _read("mlserver-1.x").server_port
    # MLServer's own gotchas, as modelmesh-serving sets them.
    assert env["MLSERVER_HOST"] == "127.0.0.1"
    assert env["MLSERVER_LOAD_MODELS_AT_STARTUP"] == "false"
    assert env["MLSERVER_MODEL_NAME"] and env["MLSERVER_GRPC_MAX_MESSAGE_LENGTH"] == "-1"
    args = " ".join(_shipped()["triton-2.x"]["spec"]["containers"][0]["args"])
    assert "--model-control-mode=explicit" in args and "--grpc-port" not in args  # Triton's gRPC: 8001


def _catalog(*names: str, extra: tuple[ServingRuntime, ...] = ()) -> RuntimeCatalog:
    """The runtimes, each created after the one before it: the mesh's is the oldest, so that it wins
    by its priority, not by being newer (or by its name)."""
    catalog = RuntimeCatalog()
    for day, name in enumerate(names, start=1):
        catalog.put(_read(name, created=f"2026-01-{day:02}T00:00:00Z"))
    for runtime in extra:
        catalog.put(runtime)
    return catalog


def _chosen(catalog: RuntimeCatalog, fmt: str, version: str = "", **kwargs: str) -> str | None:
    selection = catalog.select("team-a", fmt, version, **kwargs)
    return selection.runtime.ref if selection.runtime else None


@pytest.mark.parametrize(("fmt", "version", "kwargs", "expected"), [
    # the mesh's loaders win what they load, over MLServer's and Triton's auto-selection
    ("sklearn", "", {}, "mesh-runtime"),
    ("xgboost", "", {}, "mesh-runtime"),
    ("lightgbm", "", {}, "mesh-runtime"),
    ("onnx", "", {}, "mesh-runtime"),
    ("pytorch", "", {}, "mesh-runtime"),
    ("onnx", "1", {}, "mesh-runtime"),
    ("sklearn", "", {"protocol": "v2"}, "mesh-runtime"),
    # what the mesh does not load goes to Triton, as in modelmesh-serving
    ("keras", "", {}, "triton-2.x"),
    ("tensorflow", "2", {}, "triton-2.x"),
    # a version the mesh does not list goes to the runtime listing it
    ("xgboost", "1", {}, "mlserver-1.x"),
    ("pytorch", "1", {}, "triton-2.x"),
    # a named runtime is used, also for a format it lists without autoSelect (the quickstart's FIL model)
    ("xgboost", "", {"runtime": "triton-2.x"}, "triton-2.x"),
    ("sklearn", "", {"runtime": "mlserver-1.x"}, "mlserver-1.x"),
    ("sklearn", "", {"runtime": "mesh-runtime"}, "mesh-runtime"),
    ("sklearn", "", {"runtime": "ovms-1.x"}, None),
    ("pytorch-mar", "", {}, None),
])
def test_selection_over_the_shipped_runtimes(fmt: str, version: str, kwargs: dict[str, str],
                                            expected: str | None) -> None:
    assert _chosen(_catalog(*SHIPPED), fmt, version, **kwargs) == expected


def test_without_the_mesh_runtime_mlserver_and_triton_serve_as_in_modelmesh_serving() -> None:
    catalog = _catalog("mlserver-1.x", "triton-2.x")
    for fmt in ("sklearn", "xgboost", "lightgbm"):
        assert _chosen(catalog, fmt) == "mlserver-1.x"
    for fmt in ("keras", "onnx", "pytorch", "tensorflow", "tensorrt"):
        assert _chosen(catalog, fmt) == "triton-2.x"
    # They speak gRPC only: a model asking for REST (v2) has no runtime there.
    selection = catalog.select("team-a", "sklearn", protocol="v2")
    assert (selection.runtime, selection.reason) == (None, NO_SUPPORTING_RUNTIME)


def test_a_users_runtime_with_a_higher_priority_or_in_the_namespace_wins() -> None:
    mine = copy.deepcopy(_shipped()["mlserver-1.x"])
    mine["metadata"]["name"] = "my-mlserver"
    mine["spec"]["supportedModelFormats"] = [{"name": "sklearn", "autoSelect": True, "priority": 2}]
    mine_runtime = parse_runtime(mine)
    assert mine_runtime is not None and not mine_runtime.error
    assert _chosen(_catalog(*SHIPPED, extra=(mine_runtime,)), "sklearn") == "my-mlserver"
    # A ServingRuntime of the namespace named like a ClusterServingRuntime replaces it there.
    override = parse_runtime(_namespaced(_shipped()["mlserver-1.x"]))
    assert override is not None and not override.error
    assert _chosen(_catalog(*SHIPPED, extra=(override,)), "sklearn", runtime="mlserver-1.x") == "team-a/mlserver-1.x"


# --- the overlay -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base() -> list[Doc]:
    return _kustomize(DEPLOY)


@pytest.fixture(scope="module")
def overlay(tmp_path_factory: pytest.TempPathFactory) -> list[Doc]:
    """An overlay of one's own, outside deploy/, using deploy/runtimes as a Component (deploy/README.md)."""
    folder = tmp_path_factory.mktemp("overlay")
    deploy = os.path.relpath(DEPLOY, folder)
    (folder / "kustomization.yaml").write_text(f"resources:\n  - {deploy}\ncomponents:\n  - {deploy}/runtimes\n")
    return _kustomize(folder)


def _key(doc: Doc) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


def test_the_overlay_replaces_the_fixed_runtime_by_the_shipped_runtimes(base: list[Doc], overlay: list[Doc]) -> None:
    # The overlay keeps mesh-config's plain name (the controller's pods mount it by that name).
    hashed = next(d["metadata"]["name"] for d in base if d["kind"] == "ConfigMap"
                  and d["metadata"]["name"].startswith("mesh-config-"))
    base = json.loads(json.dumps(base).replace(f'"{hashed}"', '"mesh-config"'))
    assert [d for d in overlay if _key(d) == ("StatefulSet", "mesh-runtime")] == []
    assert [d["metadata"]["name"] for d in overlay if d["kind"] == "StatefulSet"] == ["mesh-etcd"]
    # What the controller's runtime pods still need from the base stays.
    for kind in ("Service", "NetworkPolicy", "PodDisruptionBudget", "Certificate"):
        assert _one(overlay, kind, "mesh-runtime") == _one(base, kind, "mesh-runtime")
    runtimes = {d["metadata"]["name"]: d for d in overlay if d["kind"] == "ClusterServingRuntime"}
    assert runtimes == _shipped()  # cluster-scoped: kustomize gave them no namespace
    # Everything else of the base is unchanged, but the controller's Deployment (its environment).
    added = {("Role", "mesh-controller-runtimes"), ("RoleBinding", "mesh-controller-runtimes"),
             ("ClusterRole", "mesh-serving-controller-runtimes"),
             ("ClusterRoleBinding", "mesh-serving-controller-runtimes")}
    assert {_key(d) for d in overlay} == ({_key(d) for d in base} - {("StatefulSet", "mesh-runtime")}) | added | {
        ("ClusterServingRuntime", n) for n in SHIPPED}
    for doc in base:
        if _key(doc) not in {("StatefulSet", "mesh-runtime"), ("Deployment", "mesh-controller")}:
            assert _one(overlay, *_key(doc)) == doc, _key(doc)


def test_the_overlay_has_the_controller_run_the_runtimes(overlay: list[Doc], tmp_path: Path) -> None:
    controller = _container(_one(overlay, "Deployment", "mesh-controller"))
    env = _env(controller)
    assert env["MESH_CONTROLLER_MANAGE_RUNTIMES"] == "true"
    assert env["MESH_CONTROLLER_WORKLOAD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    config = tmp_path / "mesh.toml"
    config.write_text(_mesh_toml(overlay))
    settings = load_settings(config, env={k: v if isinstance(v, str) else NAMESPACE for k, v in env.items()})
    cs = settings.controller
    assert (cs.manage_runtimes, cs.serving_runtimes, cs.workload_namespace) == (True, True, NAMESPACE)
    # The mesh runtime beside MLServer and Triton is the mesh's image, as the mesh-runtime's own.
    (mesh,) = _shipped()["mesh-runtime"]["spec"]["containers"]
    assert cs.runtime_image == controller["image"] == mesh["image"]


def _grants(docs: list[Doc]) -> set[tuple[str, str, str, str]]:
    """(scope, API group, resource, verb) the controller's ServiceAccount is granted: scope is the
    namespace of a Role, "*" for a ClusterRole."""
    roles = {_key(d): d for d in docs if d["kind"] in ("Role", "ClusterRole")}
    out = set()
    for binding in docs:
        if binding["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        if CONTROLLER_ACCOUNT not in binding["subjects"]:
            continue
        role = roles[binding["roleRef"]["kind"], binding["roleRef"]["name"]]
        scope = binding["metadata"].get("namespace", "*") if binding["kind"] == "RoleBinding" else "*"
        assert role["metadata"].get("namespace") in (None, scope)
        out |= {(scope, g, r, v) for rule in role["rules"]
                for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    return out


def test_the_overlay_grants_the_controller_what_running_runtimes_takes(base: list[Doc], overlay: list[Doc]) -> None:
    granted = _grants(overlay)
    reads = ("get", "list", "watch")
    wanted = {(NAMESPACE, "serving.kserve.io", "servingruntimes", v) for v in reads}
    wanted |= {("*", "serving.kserve.io", "clusterservingruntimes", v) for v in reads}
    wanted |= {(NAMESPACE, "apps", "statefulsets", v) for v in (*reads, "create", "patch", "update", "delete")}
    wanted |= {(NAMESPACE, "autoscaling", "horizontalpodautoscalers", v)
               for v in ("list", "create", "patch", "update", "delete")}
    wanted |= {(NAMESPACE, "", "events", v) for v in ("create", "patch")}
    assert wanted <= granted
    # Nothing else: the base's grants, and cluster-wide only the reading of ClusterServingRuntimes;
    # and nothing the base grants already.
    assert granted == _grants(base) | wanted
    added = [d for d in overlay if d["kind"].endswith(("Role", "RoleBinding")) and d not in base]
    assert not _grants(added) & _grants(base)
    assert _one(overlay, "Role", "mesh-controller") == _one(base, "Role", "mesh-controller")


def test_the_readmes_own_runtime_example_is_valid_and_selected_as_it_says() -> None:
    readme = (DEPLOY / "README.md").read_text()
    section = readme[readme.index("\n## ServingRuntimes\n"):]
    section = section[:section.find("\n## ", 1) if "\n## " in section[1:] else len(section)]  # to the next one
    (example,) = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", section, re.S)]
    assert _errors("ServingRuntime", example) == ""
    runtime = parse_runtime(example)
    assert runtime is not None and runtime.error == "" and runtime.namespace == NAMESPACE
    catalog = _catalog(*SHIPPED, extra=(runtime,))
    assert catalog.select(NAMESPACE, "sklearn").runtime == runtime  # its priority 2 beats the mesh's 1
    assert catalog.select("elsewhere", "sklearn").runtime == _read("mesh-runtime", created="2026-01-01T00:00:00Z")
    assert catalog.select(NAMESPACE, "huggingface").runtime is None  # not auto-selected ...
    assert catalog.select(NAMESPACE, "huggingface", runtime="mlserver-hf").runtime == runtime  # ... but named


def test_the_runtime_pods_find_mesh_config_by_its_plain_name(overlay: list[Doc]) -> None:
    """The controller's StatefulSets mount ``mesh-config`` (mesh.controller.workloads); the overlay
    keeps that name (no content hash), while the base alone hashes it."""
    names = {d["metadata"]["name"] for d in overlay if d["kind"] == "ConfigMap"}
    assert "mesh-config" in names
    from mesh.controller.workloads import render_workload
    from mesh.settings import Settings

    runtime = _read("mesh-runtime", created="2026-01-01T00:00:00Z")
    pod = render_workload(runtime, Settings().controller, NAMESPACE)["spec"]["template"]["spec"]
    assert {v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v} <= names
