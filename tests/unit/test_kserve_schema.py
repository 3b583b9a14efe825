"""Every InferenceService, ServingRuntime and ClusterServingRuntime the repository ships or tests
with, and our hand-written CRDs, checked against KServe's own types (issue 16): those of KServe
0.12.0's Python SDK, the version modelmesh-serving pins, read by tests/support/kserve_types.py.

Which objects:

- shipped: every YAML document under deploy/ of those kinds, and the YAML blocks of README.md,
  docs/ and deploy/ Markdown of those kinds, found when the tests are collected (a new runtime file
  is covered without a change here);
- tested with: the objects the controller, conversion and runtime tests build, made with their own
  builder functions and the arguments those tests pass (tests/integration/test_controller_isvc.py,
  test_controller_runtimes.py, tests/unit/test_isvc.py, test_runtimes.py, and modelmesh-serving's
  runtimes of test_deploy_runtimes.py), statuses the controller writes included;
- modelmesh-serving's quickstart InferenceServices, from docs/kserve-notes.md section 8's table.

Left out on purpose: the objects those tests build to be refused (test_isvc's specs that cannot be
served, test_runtimes' and test_deploy_runtimes' malformed runtimes, test_controller_isvc's bad
specs, test_controller_runtimes' runtime with a readinessProbe), and test_deploy_runtimes' runtime
with fields of newer KServe versions (hostIPC, schedulerName, workerSpec), which 0.12 lacks.

The CRDs: every property our deploy/crd files declare must be a field of KServe's type at that
path, of the same JSON type, so that they coexist with KServe's and never accept by name what
KServe's would refuse. Where they keep fields as written (x-kubernetes-preserve-unknown-fields)
they check nothing, and nothing is compared.

Without the SDK (scripts/install-test-deps installs it) these tests fail, naming the command.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from mesh.controller import isvc as isvc_mapping
from mesh.controller.predictor import Failure, VModelState, predictor_status
from tests.integration import test_controller_isvc as controller_isvc
from tests.integration import test_controller_runtimes as controller_runtimes
from tests.support import kserve_types
from tests.support.kserve_types import KINDS, crd_problems, validate, validator_for
from tests.unit import test_deploy_runtimes as deploy_runtimes
from tests.unit import test_isvc as unit_isvc
from tests.unit import test_runtimes as unit_runtimes

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
Doc = dict[str, Any]

# modelmesh-serving's quickstart as docs/kserve-notes.md section 8 gives it: the InferenceService
# of its docs/quickstart.md, and the status `kubectl describe` shows once it is served.
ROUTER_GRPC = "grpc://modelmesh-serving.modelmesh-serving:8033"
READY_STATUS: Doc = {
    "url": ROUTER_GRPC,
    "address": {"url": ROUTER_GRPC},
    "components": {"predictor": {"url": ROUTER_GRPC, "grpcUrl": ROUTER_GRPC,
                                 "restUrl": "http://modelmesh-serving.modelmesh-serving:8008"}},
    "conditions": [{"type": "PredictorReady", "status": "True", "lastTransitionTime": "2026-12-06T09:00:00Z"},
                   {"type": "Ready", "status": "True", "lastTransitionTime": "2026-12-06T09:00:00Z"}],
    "modelStatus": {"transitionStatus": "UpToDate", "states": {"activeModelState": "Loaded", "targetModelState": ""},
                    "copies": {"failedCopies": 0, "totalCopies": 2}},
}


def quickstart_isvc(name: str, model: Doc, annotations: dict[str, str] | None = None) -> Doc:
    return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
            "metadata": {"name": name, "annotations": {"serving.kserve.io/deploymentMode": "ModelMesh",
                                                       **(annotations or {})}},
            "spec": {"predictor": {"model": model}}}


KNOWN_GOOD = {**quickstart_isvc("example-sklearn-isvc", {
    "modelFormat": {"name": "sklearn"}, "storage": {"key": "localMinIO", "path": "sklearn/mnist-svm.joblib"}}),
    "status": READY_STATUS}


# --- the checker itself -------------------------------------------------------------------------

def test_a_known_good_inferenceservice_passes() -> None:
    assert validate(KNOWN_GOOD) == []
    assert validator_for("InferenceService")(KNOWN_GOOD) == []


def _changed(obj: Doc, dotted: str, value: Any) -> Doc:
    out = copy.deepcopy(obj)
    *parents, last = dotted.split(".")
    node = out
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    node[last] = value
    return out


_RUNTIME = unit_runtimes.runtime("mesh-runtime", [unit_runtimes.fmt("sklearn")])


@pytest.mark.parametrize(("obj", "expected"), [
    pytest.param(_changed(KNOWN_GOOD, "spec.predictor.model.storge", {"key": "localMinIO"}),
                 ["spec.predictor.model.storge: not a field of V1beta1ModelSpec"], id="misspelt-field"),
    pytest.param(_changed(KNOWN_GOOD, "spec.predictor.model.storage.key", 5),
                 ["spec.predictor.model.storage.key: a string expected, got 5"], id="wrong-type"),
    pytest.param(_changed(KNOWN_GOOD, "spec.predictor.model.storage", "localMinIO"),
                 ["spec.predictor.model.storage: an object expected, got 'localMinIO'"], id="string-for-object"),
    pytest.param(_changed(KNOWN_GOOD, "metadata.annotations", {"a": 1}),
                 ["metadata.annotations[a]: a string expected, got 1"], id="map-value"),
    pytest.param(_changed(KNOWN_GOOD, "metadata.labelz", {}), ["metadata.labelz: not a field of V1ObjectMeta"],
                 id="metadata"),
    pytest.param(_changed(KNOWN_GOOD, "status.modelStatus.copies.failedCopies", "0"),
                 ["status.modelStatus.copies.failedCopies: an integer expected, got '0'"], id="status"),
    pytest.param(_changed(KNOWN_GOOD, "status.modelStatus.copies.totalCopies", True),
                 ["status.modelStatus.copies.totalCopies: an integer expected, got True"], id="bool-for-int"),
    pytest.param(_changed(_RUNTIME, "spec.containers.0.env", [{"name": "A", "valu": "1"}]),
                 ["spec.containers[0].env[0].valu: not a field of V1EnvVar"], id="kubernetes-type"),
    pytest.param(_changed(_RUNTIME, "spec.protocolVersions", "grpc-v2"),
                 ["spec.protocolVersions: a list expected, got 'grpc-v2'"], id="string-for-list"),
    pytest.param(_changed(_RUNTIME, "spec.containers.0.resources", {"limits": {"cpu": 2, "memory": "1Gi"}}), [],
                 id="quantities-are-numbers-or-strings"),
    pytest.param({**KNOWN_GOOD, "apiVersion": "serving.kserve.io/v1alpha1"},
                 ["apiVersion: 'serving.kserve.io/v1beta1' expected, got 'serving.kserve.io/v1alpha1'"],
                 id="wrong-version"),
    pytest.param({**KNOWN_GOOD, "kind": "Predictor"},
                 ["kind: 'Predictor' is not one of KServe's InferenceService, ServingRuntime, ClusterServingRuntime, "
                      "InferenceGraph"],
                 id="unknown-kind"),
])
def test_problems_are_reported_with_their_paths(obj: Doc, expected: list[str]) -> None:
    assert validate(obj) == expected


def test_a_validator_checks_the_kind_it_was_made_for() -> None:
    check = validator_for("ServingRuntime")
    assert check({k: v for k, v in _RUNTIME.items() if k not in ("apiVersion", "kind")}) == []
    assert check(_RUNTIME) == ["kind: 'ServingRuntime' expected, got 'ClusterServingRuntime'"]
    with pytest.raises(KeyError):
        validator_for("Predictor")


def test_every_type_the_three_kinds_reach_is_known() -> None:
    reached = kserve_types.reachable_types()  # raises UnknownType for a name that resolves nowhere
    assert {"V1beta1ModelSpec", "V1alpha1SupportedModelFormat", "V1Container", "V1beta1ModelStatus",
            "KnativeDevServingPkgApisServingV1TrafficTarget"} <= reached


def test_the_sdks_knative_types_are_corrected_to_their_json() -> None:
    """KServe's status as its controller writes it: URLs and times as strings, traffic targets, an
    address with a name. The SDK describes these otherwise (kserve_types.CORRECTIONS)."""
    status = {**READY_STATUS, "address": {"url": ROUTER_GRPC, "name": "http"},
              "components": {"predictor": {"url": "http://m.example.com", "traffic": [
                  {"tag": "prev", "revisionName": "m-predictor-00001", "latestRevision": False, "percent": 10,
                   "url": "http://prev-m.example.com"}]}},
              "modelStatus": {"transitionStatus": "InvalidSpec", "lastFailureInfo": {
                  "reason": "InvalidPredictorSpec", "message": "bad", "time": "2026-12-06T09:00:00Z"}}}
    overhead = {"overhead": {"cpu": "100m", "memory": 1048576}}
    obj = _changed({**KNOWN_GOOD, "status": status}, "spec.predictor", {**KNOWN_GOOD["spec"]["predictor"], **overhead})
    assert validate(obj) == []
    for name, fixed in kserve_types.CORRECTIONS.items():  # each still differs from what the SDK says
        assert kserve_types.sdk_fields(name) != fixed, name


def test_without_the_sdk_the_check_fails_saying_how_to_install_it(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(kserve_types.SdkMissing, match="scripts/install-test-deps"):
        validate(KNOWN_GOOD)


# --- what the repository ships ------------------------------------------------------------------

_KIND_LINE = re.compile(rf"^kind:\s*({'|'.join(KINDS)})\s*$", re.M)
_YAML_BLOCK = re.compile(r"```ya?ml\n(.*?)```", re.S)


def _ours(doc: Any) -> bool:
    return isinstance(doc, dict) and doc.get("kind") in KINDS


def _label(where: str, doc: Doc) -> str:
    return f"{where}:{doc['kind']}/{(doc.get('metadata') or {}).get('name', '?')}"


def _shipped() -> list[tuple[str, Doc]]:
    found = []
    for path in sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")]):
        where = str(path.relative_to(ROOT))
        found += [(_label(where, d), d) for d in yaml.safe_load_all(path.read_text()) if _ours(d)]
    for path in sorted({ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *DEPLOY.rglob("*.md")}):
        where = str(path.relative_to(ROOT))
        for block in _YAML_BLOCK.findall(path.read_text()):
            if _KIND_LINE.search(block):  # a block of ours must parse (an error here fails collection)
                found += [(_label(where, d), d) for d in yaml.safe_load_all(block) if _ours(d)]
    return found


SHIPPED = _shipped()


def test_the_shipped_objects_are_found() -> None:
    """The search finds each kind where it is known to be (a broken search would pass everything)."""
    assert {label.split(":")[1].split("/")[0] for label, _ in SHIPPED} == set(KINDS)
    assert any(label.startswith("deploy/runtimes/") for label, _ in SHIPPED)
    assert any(label.startswith(("README.md:", "deploy/README.md:")) for label, _ in SHIPPED)


@pytest.mark.parametrize("obj", [d for _, d in SHIPPED], ids=[label for label, _ in SHIPPED])
def test_every_shipped_object_has_kserves_fields(obj: Doc) -> None:
    assert validate(obj) == []


# --- what the tests build -----------------------------------------------------------------------

def _statuses() -> dict[str, Doc]:
    """The statuses mesh.controller.isvc writes, as tests/unit/test_isvc.py builds them."""
    urls = {"grpc_url": "grpc://r:8033", "rest_url": "http://r:8008", "now": "2026-12-06T09:00:00Z"}
    loaded = isvc_mapping.isvc_status(predictor_status(unit_isvc._loaded(), now_ms=0, grpc_endpoint="grpc://r:8033"),
                                      previous=None, **urls)
    invalid = isvc_mapping.isvc_status(predictor_status(
        VModelState(status="NOT_FOUND"), failure=Failure("InvalidPredictorSpec", "bad", "m__isvc-1"), now_ms=0),
        previous=None, **urls)
    waiting = isvc_mapping.isvc_status(predictor_status(
        VModelState(status="NOT_FOUND"), failure=Failure("NoSupportingRuntime", "no runtime for xgboost",
                                                         "m__isvc-1", location="rt-a"), now_ms=0),
        previous=invalid, **urls)
    return {"loaded": loaded, "invalid-spec": invalid, "no-supporting-runtime": waiting}


def _built_by_tests() -> dict[str, Doc]:
    ci, cr, ui, ur, dr = controller_isvc, controller_runtimes, unit_isvc, unit_runtimes, deploy_runtimes
    model: Any = SimpleNamespace(file=Path("/models/sklearn/model.joblib"))  # model_form reads only .file
    objs: dict[str, Doc] = {
        "controller_isvc/quickstart": ci.isvc(ci.NAME, ci.model_form(model)),
        "controller_isvc/framework": ci.isvc("framework", {"sklearn": {"storageUri": str(model.file)}}),
        "controller_isvc/file-uri": ci.isvc("file-uri", {"model": {"modelFormat": {"name": "sklearn"},
                                                                   "storageUri": f"file://{model.file}"}}),
        "controller_isvc/no-annotation": ci.isvc("kserve-owned", ci.model_form(model), annotations=None),
        "controller_isvc/serverless": ci.isvc("serverless", ci.model_form(model),
                                              annotations={"serving.kserve.io/deploymentMode": "Serverless"}),
        "controller_runtimes/named-runtime": ci.isvc("on-triton", {"model": {
            "modelFormat": {"name": "onnx"}, "runtime": "triton-2.x", "storage": {"path": "/models/m.onnx"}}}),
        "controller_runtimes/mesh-runtime": cr.cluster_runtime("mesh-runtime", ["sklearn", "xgboost"]),
        "controller_runtimes/triton": cr.cluster_runtime("triton-2.x", ["onnx", "tensorflow"], server="triton"),
        "unit_isvc/storage-uri-runtime-protocol": ui._isvc(
            {"model": {"modelFormat": {"name": "onnx", "version": "1"}, "runtime": "triton-2.x",
                       "protocolVersion": "grpc-v2", "storageUri": "s3://bucket/onnx/mnist.onnx"}},
            {**ui.MODELMESH, isvc_mapping.SECRET_KEY_ANNOTATION: "localMinIO",
             isvc_mapping.SCHEMA_PATH_ANNOTATION: "s.json"}),
        "unit_isvc/framework-with-annotation": ui._isvc({"sklearn": {"storageUri": "s3://b/m.joblib"}},
                                                        {**ui.MODELMESH, isvc_mapping.RUNTIME_ANNOTATION: "x"}),
        "unit_runtimes/mlserver": ur.runtime(
            "mlserver-1.x", [ur.fmt("sklearn", "0"), ur.fmt("xgboost", "1"), ur.fmt("lightgbm", "3")], server="",
            protocolVersions=["grpc-v2"], grpcEndpoint="port:8085", grpcDataEndpoint="port:8001",
            builtInAdapter={"serverType": "mlserver", "runtimeManagementPort": 8001, "memBufferBytes": 134217728,
                            "modelLoadingTimeoutMillis": 90000},
            containers=[{"name": "mlserver", "image": "seldonio/mlserver:1.3.2",
                         "env": [{"name": "MLSERVER_HOST", "value": "127.0.0.1"}]}]),
        "unit_runtimes/triton": ur.runtime("triton-2.x", [ur.fmt("onnx", "1"), ur.fmt("sklearn", "0", auto=False)],
                                           server="triton"),
        "unit_runtimes/single-model": ur.runtime("kserve-sklearnserver", [ur.fmt("sklearn", "1")], multiModel=False),
        "unit_runtimes/spi": ur.runtime("custom", [ur.fmt("my-format")], server="",
                                        containers=[{"name": "server", "image": "x"}], grpcEndpoint="port:9000"),
        "unit_runtimes/namespaced": ur.runtime("team", [ur.fmt("sklearn", priority=5)], namespace="team-a"),
    }
    # test_controller_runtimes' runtime of a namespace, made as that test makes it
    own = cr.cluster_runtime("team-runtime", [])
    own.update(kind="ServingRuntime", metadata={"name": "team-runtime", "namespace": ci.NS})
    own["spec"]["supportedModelFormats"] = [{"name": "sklearn", "autoSelect": True, "priority": 5}]
    objs["controller_runtimes/namespace-runtime"] = own
    for name in dr.MMS_RUNTIMES:
        objs[f"deploy_runtimes/modelmesh-serving/{name}"] = dr._mms_runtime(name)
        objs[f"deploy_runtimes/modelmesh-serving/{name}/namespaced"] = dr._namespaced(dr._mms_runtime(name))
    for name, status in _statuses().items():
        objs[f"unit_isvc/quickstart/status-{name}"] = {**ui.QUICKSTART, "status": status}
    return objs


BUILT = _built_by_tests()


@pytest.mark.parametrize("obj", BUILT.values(), ids=BUILT.keys())
def test_every_object_the_tests_build_has_kserves_fields(obj: Doc) -> None:
    assert validate(obj) == []


# --- modelmesh-serving's quickstart -------------------------------------------------------------

def _quickstart() -> dict[str, Doc]:
    """docs/kserve-notes.md section 8: the eight example InferenceServices from the table's values,
    and docs/quickstart.md's example-sklearn-isvc in its two forms, served."""
    notes = (ROOT / "docs" / "kserve-notes.md").read_text()
    section = notes[notes.index("\n## 8. Quickstart examples"):]
    rows = re.findall(r"^\| example-[\w-]+-isvc\.yaml \| ([\w-]+) \| (\w+) \| (\S+) \| (\S+) \|", section, re.M)
    objs = {}
    for name, fmt, runtime, path in rows:
        model: Doc = {"modelFormat": {"name": fmt}, "storage": {"key": "localMinIO", "path": path}}
        if runtime != "—":
            model["runtime"] = runtime
        objs[name] = quickstart_isvc(name, model)
    uri = {"modelFormat": {"name": "sklearn"}, "storageUri": "s3://modelmesh-example-models/sklearn/mnist-svm.joblib"}
    objs["example-sklearn-isvc (storage)"] = KNOWN_GOOD
    objs["example-sklearn-isvc (storageUri)"] = {
        **quickstart_isvc("example-sklearn-isvc", uri, {"serving.kserve.io/secretKey": "localMinIO"}),
        "status": READY_STATUS}
    return objs


QUICKSTART = _quickstart()


def test_the_quickstart_table_gives_eight_examples() -> None:
    assert len(QUICKSTART) == 8 + 2
    assert QUICKSTART["example-xgboost-mushroom-fil"]["spec"]["predictor"]["model"] == {
        "modelFormat": {"name": "xgboost"}, "runtime": "triton-2.x",
        "storage": {"key": "localMinIO", "path": "xgboost/mushroom-fil"}}


@pytest.mark.parametrize("obj", QUICKSTART.values(), ids=QUICKSTART.keys())
def test_modelmesh_servings_quickstart_has_kserves_fields(obj: Doc) -> None:
    assert validate(obj) == []


# --- our CRDs -----------------------------------------------------------------------------------

CRDS = {d["spec"]["names"]["kind"]: p for p in sorted((DEPLOY / "crd").glob("serving.kserve.io_*.yaml"))
        for d in [yaml.safe_load(p.read_text())] if d["spec"]["names"]["kind"] in KINDS}


def test_each_kind_has_a_hand_written_crd() -> None:
    assert set(CRDS) == set(KINDS)


@pytest.mark.parametrize("kind", CRDS, ids=CRDS)
def test_our_crd_declares_nothing_kserves_types_lack(kind: str) -> None:
    problems = crd_problems(yaml.safe_load(CRDS[kind].read_text()))
    assert problems == [], f"{CRDS[kind].name} declares what KServe {kserve_types.KSERVE_VERSION} does not:\n" + \
        "\n".join(problems)


def test_the_crd_walk_finds_a_planted_mismatch() -> None:
    crd = yaml.safe_load(CRDS["InferenceService"].read_text())
    (version,) = crd["spec"]["versions"]
    props = version["schema"]["openAPIV3Schema"]["properties"]
    props["spec"]["properties"]["predictor"]["properties"]["model"]["properties"]["storge"] = {"type": "object"}
    props["status"]["properties"]["components"]["additionalProperties"]["properties"]["grpcUrl"] = {"type": "integer"}
    props["status"]["properties"]["conditions"]["items"]["properties"]["since"] = {"type": "string"}
    assert crd_problems(crd) == [
        "spec.predictor.model.storge: declared by the CRD, not a field of KServe's V1beta1ModelSpec",
        "status.components[*].grpcUrl: the CRD says integer, KServe says KnativeURL",
        "status.conditions[*].since: declared by the CRD, not a field of KServe's KnativeCondition",
    ]


def test_the_fake_api_server_refuses_what_kserves_types_do_not_define() -> None:
    """The FAKE API server (no kube-apiserver can run here) checks InferenceService writes against
    KServe's types too: a misspelt field that our CRD's open ``model`` object would keep is refused."""
    from tests.support.fake_kube import INFERENCE_SERVICES, ApiError, FakeKubeApiServer

    obj = {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
           "metadata": {"name": "m", "namespace": "ns"},
           "spec": {"predictor": {"model": {"modelFormat": {"name": "sklearn"}, "storageUri": "s3://b/m"}}}}
    with FakeKubeApiServer(resources=(INFERENCE_SERVICES,)) as api:
        api.put(obj)
        bad = {**obj, "spec": {"predictor": {"model": {"modelFormat": {"name": "sklearn"}, "storge": {}}}}}
        with pytest.raises(ApiError) as err:
            api.put(bad)
        assert err.value.code == 422 and "spec.predictor.model.storge" in err.value.message
