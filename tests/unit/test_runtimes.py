"""ServingRuntimes and ClusterServingRuntimes: parsing, checks and KServe's selection
(mesh.controller.runtimes), and a Predictor's registration through them."""

from __future__ import annotations

from typing import Any

import pytest

from mesh.controller.events import WatchEvent
from mesh.controller.predictor import NoRuntime, registration
from mesh.controller.runtimes import (
    MESH,
    MLSERVER,
    SPI,
    TRITON,
    RuntimeCatalog,
    ServingRuntime,
    parse_runtime,
)


def runtime(name: str, formats: list[dict[str, Any]], *, namespace: str = "", server: str = "mesh",
            created: str = "2026-01-01T00:00:00Z", **spec: Any) -> dict[str, Any]:
    kind = "ServingRuntime" if namespace else "ClusterServingRuntime"
    body: dict[str, Any] = {"multiModel": True, "supportedModelFormats": formats, **spec}
    if server and "containers" not in spec:
        port = {} if server == "mesh" else {"runtimeManagementPort": 8001}
        body["builtInAdapter"] = {"serverType": server, **port}
        body["containers"] = [{"name": server, "image": f"example/{server}:1"}]
    meta: dict[str, Any] = {"name": name, "creationTimestamp": created, "generation": 1}
    if namespace:
        meta["namespace"] = namespace
    return {"apiVersion": "serving.kserve.io/v1alpha1", "kind": kind, "metadata": meta, "spec": body}


def fmt(name: str, version: str = "", auto: bool = True, priority: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "autoSelect": auto}
    if version:
        out["version"] = version
    if priority is not None:
        out["priority"] = priority
    return out


def catalog(*objs: dict[str, Any]) -> RuntimeCatalog:
    c = RuntimeCatalog()
    for obj in objs:
        parsed = parse_runtime(obj)
        assert parsed is not None
        c.put(parsed)
    return c


def picked(c: RuntimeCatalog, namespace: str, name: str, version: str = "", **kw: str) -> str:
    sel = c.select(namespace, name, version, **kw)
    assert sel.runtime is not None, sel.message
    return sel.runtime.ref


# --- parsing ------------------------------------------------------------------------------------

def test_modelmesh_serving_builtin_runtimes_parse_as_written() -> None:
    """mlserver-1.x and triton-2.x as modelmesh-serving ships them (docs/kserve-notes.md section 5)."""
    mlserver = runtime("mlserver-1.x", [fmt("sklearn", "0"), fmt("xgboost", "1"), fmt("lightgbm", "3")],
                       server="", protocolVersions=["grpc-v2"], grpcEndpoint="port:8085",
                       grpcDataEndpoint="port:8001",
                       builtInAdapter={"serverType": "mlserver", "runtimeManagementPort": 8001,
                                       "memBufferBytes": 134217728, "modelLoadingTimeoutMillis": 90000},
                       containers=[{"name": "mlserver", "image": "seldonio/mlserver:1.3.2",
                                    "env": [{"name": "MLSERVER_HOST", "value": "127.0.0.1"}]}])
    rt = parse_runtime(mlserver)
    assert rt is not None and not rt.error, rt
    assert (rt.server_type, rt.server_port, rt.mem_buffer_bytes, rt.loading_timeout_ms) == (MLSERVER, 8001,
                                                                                            134217728, 90000)
    assert rt.kind == "ClusterServingRuntime" and rt.ref == "mlserver-1.x" and rt.label == "rt:mlserver-1.x"
    assert rt.mesh_types() == ("lightgbm", "sklearn", "xgboost")
    triton = parse_runtime(runtime("triton-2.x", [fmt("onnx", "1"), fmt("pytorch", "1"), fmt("tensorflow", "2"),
                                                  fmt("sklearn", "0", auto=False)], server="triton"))
    assert triton is not None and not triton.error and triton.server_type == TRITON
    assert triton.mesh_types() == ("onnx", "sklearn", "tensorflow", "torchscript")


def test_single_model_runtimes_are_kserves_and_ignored() -> None:
    obj = runtime("kserve-sklearnserver", [fmt("sklearn", "1")])
    obj["spec"]["multiModel"] = False
    assert parse_runtime(obj) is None
    del obj["spec"]["multiModel"]
    assert parse_runtime(obj) is None


@pytest.mark.parametrize(("change", "expected"), [
    ({"containers": []}, "spec.containers is required"),
    ({"containers": [{"name": "Bad_Name", "image": "x"}]}, "must be a DNS label"),
    ({"containers": [{"name": "mesh"}]}, "spec.containers[0].image is required"),
    ({"containers": [{"name": "mesh", "image": "x", "readinessProbe": {}}]}, "readinessProbe is not allowed"),
    ({"containers": [{"name": "mesh", "image": "x", "ports": [{"containerPort": 2112}]}]}, "reserved"),
    ({"containers": [{"name": "mesh-runtime", "image": "x"}]}, "reserved for the mesh runtime"),
    ({"supportedModelFormats": [{"autoSelect": True}]}, "supportedModelFormats[0].name is required"),
    ({"supportedModelFormats": [{"name": "sklearn", "autoSelect": True, "priority": 0}]}, "priority must be"),
    ({"supportedModelFormats": [{"name": "sklearn", "priority": 2}]}, "without autoSelect"),
    ({"supportedModelFormats": [{"name": "tensorflow", "autoSelect": True}]}, "serverType mesh loads"),
    ({"builtInAdapter": {"serverType": "ovms"}}, "'ovms' is not supported"),
    ({"builtInAdapter": {"serverType": "nginx"}}, "serverType must be one of"),
    ({"builtInAdapter": {"serverType": "triton", "runtimeManagementPort": 8001}}, "needs a container named 'triton'"),
    ({"builtInAdapter": None}, "builtInAdapter or spec.grpcEndpoint is required"),
    ({"builtInAdapter": None, "grpcEndpoint": "unix:/tmp/s"}, "must be 'port:N'"),
    ({"disabled": "yes"}, "spec.disabled must be true or false"),
    ({"replicas": -1}, "spec.replicas must be an integer"),
])
def test_an_invalid_runtime_is_kept_with_the_field_named(change: dict[str, Any], expected: str) -> None:
    obj = runtime("bad", [fmt("sklearn")])
    obj["spec"].update(change)
    rt = parse_runtime(obj)
    assert rt is not None and expected in rt.error, rt
    c = RuntimeCatalog()
    c.put(rt)
    sel = c.select("ns", "sklearn", runtime="bad")
    assert sel.runtime is None and sel.reason == "RuntimeNotRecognized" and expected in sel.message
    assert c.select("ns", "sklearn").reason == "NoSupportingRuntime"  # never auto-selected


def test_an_spi_runtime_serves_its_formats_through_grpc_endpoint() -> None:
    rt = parse_runtime(runtime("custom", [fmt("my-format")], server="",
                               containers=[{"name": "server", "image": "x"}], grpcEndpoint="port:9000"))
    assert rt is not None and not rt.error and (rt.server_type, rt.server_port) == (SPI, 9000)
    assert rt.mesh_types() == ("my-format",)


# --- selection ----------------------------------------------------------------------------------

def test_auto_selection_by_format_version_priority_and_scope() -> None:
    c = catalog(runtime("mesh-runtime", [fmt("sklearn", priority=2), fmt("onnx", priority=2)]),
                runtime("mlserver-1.x", [fmt("sklearn", "0", priority=1), fmt("xgboost", "1")], server="mlserver"),
                runtime("triton-2.x", [fmt("onnx", "1"), fmt("xgboost", "1", auto=False)], server="triton"))
    assert picked(c, "ns", "sklearn") == "mesh-runtime"  # the higher priority
    assert picked(c, "ns", "sklearn", "0") == "mlserver-1.x"  # mesh-runtime lists no version 0
    assert picked(c, "ns", "SKLearn") == "mesh-runtime"  # formats compare in lower case
    assert picked(c, "ns", "onnx") == "mesh-runtime"
    assert picked(c, "ns", "xgboost") == "mlserver-1.x"  # triton lists it without autoSelect
    assert picked(c, "ns", "xgboost", runtime="triton-2.x") == "triton-2.x"  # named: every format counts
    sel = c.select("ns", "keras")
    assert sel.runtime is None and sel.reason == "NoSupportingRuntime"
    assert "keras" in sel.message and "onnx, sklearn, xgboost" in sel.message

    # A namespace's own runtime of the same priority comes before the cluster's; one of the same
    # name overrides the cluster's there (and only there).
    c.put(parse_runtime(runtime("mine", [fmt("sklearn", priority=2)], namespace="team-a")))  # type: ignore[arg-type]
    assert picked(c, "team-a", "sklearn") == "team-a/mine"
    assert picked(c, "team-b", "sklearn") == "mesh-runtime"
    c.put(parse_runtime(runtime("mesh-runtime", [fmt("onnx")], namespace="team-b")))  # type: ignore[arg-type]
    sel = c.select("team-b", "sklearn", runtime="mesh-runtime")
    assert sel.runtime is None and "ServingRuntime team-b/mesh-runtime does not support" in sel.message
    assert picked(c, "team-c", "sklearn", runtime="mesh-runtime") == "mesh-runtime"


def test_ties_go_to_the_newest_then_the_name() -> None:
    c = catalog(runtime("b", [fmt("sklearn")], created="2026-01-01T00:00:00Z"),
                runtime("a", [fmt("sklearn")], created="2026-01-01T00:00:00Z"),
                runtime("c", [fmt("sklearn")], created="2025-01-01T00:00:00Z"))
    assert picked(c, "ns", "sklearn") == "a"
    c.put(parse_runtime(runtime("d", [fmt("sklearn")], created="2026-06-01T00:00:00Z")))  # type: ignore[arg-type]
    assert picked(c, "ns", "sklearn") == "d"
    c.put(parse_runtime(runtime("e", [fmt("sklearn", priority=1)], created="2020-01-01T00:00:00Z")))  # type: ignore[arg-type]
    assert picked(c, "ns", "sklearn") == "e"  # a priority beats none


def test_named_runtime_failures_say_which() -> None:
    c = catalog(runtime("off", [fmt("sklearn")], disabled=True),
                runtime("grpc-only", [fmt("sklearn")], protocolVersions=["grpc-v1"]))
    assert "no ServingRuntime 'nope'" in c.select("ns", "sklearn", runtime="nope").message
    assert c.select("ns", "sklearn", runtime="nope").reason == "RuntimeNotRecognized"
    assert "is disabled" in c.select("ns", "sklearn", runtime="off").message
    assert picked(c, "ns", "sklearn") == "grpc-only"  # a disabled runtime is never picked
    sel = c.select("ns", "sklearn", runtime="grpc-only", protocol="grpc-v2")
    assert sel.runtime is None and "does not support protocol 'grpc-v2'" in sel.message
    assert picked(c, "ns", "sklearn", protocol="grpc-v1") == "grpc-only"


def test_the_catalog_follows_watch_events() -> None:
    c = RuntimeCatalog()
    ns_obj = runtime("mine", [fmt("sklearn")], namespace="team-a")
    changed = c.apply(WatchEvent("SYNC", objects=[ns_obj]), namespace_scoped=True)
    assert [r.ref for r in changed] == ["team-a/mine"] and c.version == 1
    cluster_obj = runtime("shared", [fmt("onnx")])
    c.apply(WatchEvent("SYNC", objects=[cluster_obj]), namespace_scoped=False)
    assert sorted(r.ref for r in c.all()) == ["shared", "team-a/mine"]
    assert c.apply(WatchEvent("MODIFIED", object=cluster_obj), namespace_scoped=False) == []  # no change
    version = c.version
    single = runtime("shared", [fmt("onnx")])
    single["spec"]["multiModel"] = False  # now KServe's: no longer ours
    c.apply(WatchEvent("MODIFIED", object=single), namespace_scoped=False)
    assert [r.ref for r in c.all()] == ["team-a/mine"] and c.version == version + 1
    c.apply(WatchEvent("DELETED", object=ns_obj), namespace_scoped=True)
    assert len(c) == 0
    # A relist of one kind replaces that kind only.
    c.apply(WatchEvent("ADDED", object=cluster_obj), namespace_scoped=False)
    c.apply(WatchEvent("SYNC", objects=[]), namespace_scoped=True)
    assert [r.ref for r in c.all()] == ["shared"]


# --- a Predictor through the catalog -----------------------------------------------------------

def predictor(model_type: str, *, runtime_name: str = "", version: str = "") -> dict[str, Any]:
    spec: dict[str, Any] = {"modelType": {"name": model_type}, "path": "models/m", "storage": {"key": "s3"}}
    if version:
        spec["modelType"]["version"] = version
    if runtime_name:
        spec["runtime"] = {"name": runtime_name}
    spec["storage"] = {"key": "s3", "path": spec.pop("path")}
    return {"metadata": {"namespace": "ns", "name": "m"}, "spec": spec}


def test_a_predictor_is_labelled_with_its_runtime_and_moves_with_it() -> None:
    c = catalog(runtime("mesh-runtime", [fmt("sklearn")]),
                runtime("triton-2.x", [fmt("tensorflow")], server="triton"))

    def select(namespace: str, name: str, version: str, rt: str, protocol: str) -> Any:
        return c.select(namespace, name, version, runtime=rt, protocol=protocol) if len(c) else None

    legacy = registration(predictor("sklearn"))
    reg = registration(predictor("sklearn"), select=select)
    assert reg.labels == ("rt:mesh-runtime",) and reg.runtime == "mesh-runtime" and reg.type == "sklearn"
    assert reg.model_id != legacy.model_id  # the runtime is part of the model's identity
    tf = registration(predictor("tensorflow"), select=select)
    assert (tf.type, tf.labels) == ("tensorflow", ("rt:triton-2.x",))  # a format only an external server knows
    with pytest.raises(NoRuntime) as err:
        registration(predictor("keras"), select=select)
    assert err.value.reason == "NoSupportingRuntime"
    with pytest.raises(NoRuntime) as err:
        registration(predictor("sklearn", runtime_name="missing"), select=select)
    assert err.value.reason == "RuntimeNotRecognized"

    c.put(ServingRuntime(namespace="ns", name="newer", formats=parse_runtime(  # type: ignore[union-attr]
        runtime("x", [fmt("sklearn", priority=5)])).formats, server_type=MESH))
    moved = registration(predictor("sklearn"), select=select)
    assert moved.labels == ("rt:ns/newer",) and moved.model_id != reg.model_id

    # Without runtimes the mapping is as before (legacy labels, built-in types only).
    assert registration(predictor("sklearn", runtime_name="x"), select=lambda *a: None).labels == ("rt:x",)


def test_the_runtime_keeps_its_uid_for_owner_references() -> None:
    obj = runtime("r", [fmt("sklearn")])
    obj["metadata"]["uid"] = "0f6c2d1e-uid"
    rt = parse_runtime(obj)
    assert rt is not None and rt.uid == "0f6c2d1e-uid"


def test_an_annotation_change_reaches_the_catalog() -> None:
    """Annotations do not move a runtime's generation, but the workload reads some of them."""
    c = RuntimeCatalog()
    obj = runtime("r", [fmt("sklearn")])
    c.apply(WatchEvent("ADDED", object=obj), namespace_scoped=False)
    obj["metadata"]["annotations"] = {"serving.kserve.io/autoscalerClass": "hpa"}
    changed = c.apply(WatchEvent("MODIFIED", object=obj), namespace_scoped=False)
    assert [r.annotations for r in changed] == [{"serving.kserve.io/autoscalerClass": "hpa"}]
    assert hash(changed[0]) == hash(changed[0])  # still hashable


def test_a_tenants_runtime_is_not_run_beside_the_mesh() -> None:
    """With the controller running runtimes in namespace mesh-serving, a ServingRuntime of another
    namespace is refused (it would run its author's image next to the mesh's certificates), and a
    runtime's containers never mount the mesh runtime's volumes, run privileged or reach the node."""
    c = RuntimeCatalog(run_namespace="mesh-serving")
    c.put(parse_runtime(runtime("mine", [fmt("sklearn", priority=9)], namespace="team-a")))  # type: ignore[arg-type]
    c.put(parse_runtime(runtime("ours", [fmt("sklearn")], namespace="mesh-serving")))  # type: ignore[arg-type]
    c.put(parse_runtime(runtime("shared", [fmt("sklearn")])))  # type: ignore[arg-type]
    sel = c.select("team-a", "sklearn", runtime="mine")
    assert sel.runtime is None and "ClusterServingRuntime" in sel.message and "'mesh-serving'" in sel.message
    assert picked(c, "team-a", "sklearn") == "shared"  # never auto-selected
    assert picked(c, "mesh-serving", "sklearn") == "mesh-serving/ours"

    for change, expected in (
            ({"volumeMounts": [{"name": "pki", "mountPath": "/steal"}]}, "mounts 'pki'"),
            ({"volumeMounts": [{"name": "storage-config", "mountPath": "/s"}]}, "mounts 'storage-config'"),
            ({"securityContext": {"privileged": True}}, "privileged"),
            ({"volumeMounts": 5}, "must be a list")):
        obj = runtime("bad", [fmt("sklearn")])
        obj["spec"]["containers"][0].update(change)
        assert expected in parse_runtime(obj).error  # type: ignore[union-attr]
    obj = runtime("bad", [fmt("sklearn")], volumes=[{"name": "root", "hostPath": {"path": "/"}}])
    assert "hostPath" in parse_runtime(obj).error  # type: ignore[union-attr]


def test_one_namespaces_runtime_does_not_change_how_anothers_models_go() -> None:
    c = catalog(runtime("mine", [fmt("sklearn")], namespace="team-a"))
    assert c.declares("team-a") and not c.declares("team-b")  # team-b: any runtime loading the type
    assert c.declares("team-b", runtime="nope") is False
    bad = runtime("broken", [fmt("sklearn")])
    bad["spec"]["containers"] = []
    c.put(parse_runtime(bad))  # type: ignore[arg-type]
    assert not c.declares("team-b") and c.declares("team-b", runtime="broken")  # named: told why it is invalid
    # The namespace's runtime comes first, whatever the cluster's priority (KServe's order).
    c.put(parse_runtime(runtime("shared", [fmt("sklearn", priority=9)])))  # type: ignore[arg-type]
    assert picked(c, "team-a", "sklearn") == "team-a/mine"
    assert picked(c, "team-b", "sklearn") == "shared"
