"""Runtime workloads (mesh.controller.workloads): the StatefulSet rendered for each kind of runtime,
its name, replicas and owner, the HPA of a runtime annotated for one, and the reconcile against
in-memory stores with a fake clock."""

from __future__ import annotations

import asyncio
import copy
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh.controller.kube import Refused
from mesh.controller.runtimes import InvalidRuntime, RuntimeCatalog, ServingRuntime, parse_runtime
from mesh.controller.workloads import (
    HASH_ANNOTATION,
    MANAGED_BY,
    RuntimeUsage,
    Workloads,
    quantity_bytes,
    render_hpa,
    render_workload,
    spec_hash,
    workload_name,
)
from mesh.errors import Unavailable
from mesh.settings import ControllerSettings, load_settings
from tests.unit.test_deploy_autoscaling import _as_model, _unknown_fields

ROOT = Path(__file__).resolve().parents[2]
NS = "mesh-serving"
SETTINGS = ControllerSettings(runtime_image="example/mesh:9", pods_per_runtime=2, scale_to_zero_grace_s=60.0)


def shipped(name: str) -> ServingRuntime:
    """One of deploy/runtimes' ClusterServingRuntimes."""
    rt = parse_runtime(yaml.safe_load((ROOT / "deploy" / "runtimes" / f"{name}.yaml").read_text()))
    assert rt is not None and not rt.error, rt
    return rt


def runtime(name: str, *, namespace: str = "", generation: int = 1, **spec: Any) -> ServingRuntime:
    body = {"multiModel": True, "supportedModelFormats": [{"name": "sklearn", "autoSelect": True}],
            "builtInAdapter": {"serverType": "mesh"}, "containers": [{"name": "mesh", "image": "example/mesh:1"}],
            **spec}
    meta: dict[str, Any] = {"name": name, "generation": generation}
    if namespace:
        meta["namespace"] = namespace
    rt = parse_runtime({"metadata": meta, "spec": body})
    assert rt is not None
    return rt


def with_uid(rt: ServingRuntime, uid: str) -> ServingRuntime:
    return replace(rt, uid=uid)  # metadata.uid, as the catalog keeps it


def autoscaled(rt: ServingRuntime, autoscaler: str = "hpa", **scale: int | str) -> ServingRuntime:
    """``rt`` annotated as KServe's runtimes ask for an autoscaler (``min=``, ``max=``: the bounds)."""
    annotations = {"serving.kserve.io/autoscalerClass": autoscaler}
    annotations |= {f"serving.kserve.io/{k}-scale": str(v) for k, v in scale.items()}
    return replace(rt, annotations=annotations)


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "<ref>") for e in container["env"]}


def runtime_settings(container: dict[str, Any]) -> Any:
    """What the mesh runtime in that container reads: deploy/base/mesh.toml and its environment."""
    env = {k: v for k, v in env_of(container).items() if v != "<ref>"}
    env["MESH_CONFIG"] = str(ROOT / "deploy" / "base" / "mesh.toml")
    return load_settings(env=env)


def test_mesh_runtime_is_one_mesh_container_like_the_base_runtime() -> None:
    rt = shipped("mesh-runtime")
    sts = render_workload(rt, SETTINGS, NS)
    base = yaml.safe_load_all((ROOT / "deploy" / "base" / "runtime.yaml").read_text())
    base_sts = next(d for d in base if d["kind"] == "StatefulSet")
    base_pod, pod = base_sts["spec"]["template"]["spec"], sts["spec"]["template"]["spec"]
    assert sts["metadata"]["name"] == "mesh-rt-mesh-runtime" and sts["metadata"]["namespace"] == NS
    assert sts["spec"]["replicas"] == 2 and sts["spec"]["serviceName"] == "mesh-runtime"
    [mesh] = pod["containers"]
    [base_c] = base_pod["containers"]
    assert mesh["name"] == "mesh" and mesh["image"] == "ghcr.io/mesh-serving/mesh:0.1.0"
    assert mesh["command"] == ["mesh", "serve", "runtime"]
    assert mesh["resources"] == rt.spec["containers"][0]["resources"]
    for key in ("readinessProbe", "livenessProbe", "lifecycle", "ports", "securityContext", "workingDir"):
        assert mesh[key] == base_c[key], key
    for key in ("securityContext", "automountServiceAccountToken", "terminationGracePeriodSeconds", "volumes"):
        assert pod[key] == base_pod[key], key
    assert sorted(mesh["volumeMounts"], key=str) == sorted(base_c["volumeMounts"], key=str)
    assert {e["name"]: e for e in base_c["env"]}.items() <= {e["name"]: e for e in mesh["env"]}.items()
    labels = sts["metadata"]["labels"]
    assert labels["app.kubernetes.io/name"] == "mesh-runtime" and labels[MANAGED_BY] == "mesh-controller"
    assert labels["serving.kserve.io/runtime"] == "mesh-runtime"
    assert labels["app.kubernetes.io/part-of"] == "mesh-serving"
    assert sts["spec"]["selector"]["matchLabels"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    # the runtime's own settings loader takes the environment as rendered
    rs = runtime_settings(mesh).runtime
    assert rs.labels == ("rt:mesh-runtime",) and rs.supported_types == rt.mesh_types() and not rs.server
    assert rs.workers == 2 and rs.capacity_bytes == 0  # mesh.toml's workers, capacity_fraction of the limit
    assert "ownerReferences" not in sts["metadata"]  # no uid known


def test_mlserver_runs_beside_a_mesh_runtime_sharing_the_repository() -> None:
    rt = shipped("mlserver-1.x")
    sts = render_workload(rt, SETTINGS, NS)
    pod = sts["spec"]["template"]["spec"]
    mesh, server = pod["containers"]
    assert mesh["name"] == "mesh-runtime" and mesh["image"] == "example/mesh:9"
    written = rt.spec["containers"][0]
    assert {k: server[k] for k in written} | {"volumeMounts": server["volumeMounts"]} == {
        **written, "volumeMounts": server["volumeMounts"]}  # as written: env, resources...
    assert {"name": "models", "mountPath": "/models"} in server["volumeMounts"]
    assert {"name": "storage-cache", "mountPath": "/var/cache/mesh-storage", "readOnly": True} in server["volumeMounts"]
    rs = runtime_settings(mesh).runtime
    assert rs.server == "mlserver" and rs.server_address == "127.0.0.1:8001" and rs.workers == 0
    assert rs.server_repository == "/models/_mlserver_models"  # its MLSERVER_MODELS_DIR
    assert rs.server_types == ("lightgbm", "sklearn", "xgboost") and rs.labels == ("rt:mlserver-1.x",)
    assert rs.capacity_bytes == 1024**3 - 134217728  # the server's memory request minus memBufferBytes
    assert rs.load_timeout_s == 90.0
    assert sts["metadata"]["name"].startswith("mesh-rt-mlserver-1-x-")  # '.' replaced: hashed


def test_triton_repository_comes_from_its_arguments() -> None:
    rt = shipped("triton-2.x")
    mesh, server = render_workload(rt, SETTINGS, NS)["spec"]["template"]["spec"]["containers"]
    assert server["args"] == rt.spec["containers"][0]["args"] and server["livenessProbe"]
    rs = runtime_settings(mesh).runtime
    assert rs.server == "triton" and rs.server_repository == "/models/_triton_models"
    assert rs.max_concurrent_loads == 2  # its maxLoadingConcurrency annotation
    elsewhere = copy.deepcopy(dict(rt.spec))
    elsewhere["containers"][0]["args"] = ["tritonserver --model-repository=/opt/repo"]
    with pytest.raises(ValueError, match="must be under /models/"):
        render_workload(replace(rt, spec=elsewhere), SETTINGS, NS)


def test_spi_server_gets_the_runtime_types_and_the_endpoint() -> None:
    rt = runtime("custom", builtInAdapter=None, grpcEndpoint="port:9000",
                 containers=[{"name": "server", "image": "example/spi:1"}],
                 supportedModelFormats=[{"name": "custom-format", "autoSelect": True}])
    assert rt.server_type == "spi" and not rt.error
    mesh, server = render_workload(rt, SETTINGS, NS)["spec"]["template"]["spec"]["containers"]
    rs = runtime_settings(mesh).runtime
    assert (rs.server, rs.server_address, rs.server_types) == ("spi", "127.0.0.1:9000", ("custom-format",))
    assert not rs.server_repository and rs.capacity_bytes == 0  # no memory request: the runtime's own rule
    assert {"name": "models", "mountPath": "/models"} in server["volumeMounts"]


def test_pod_fields_volumes_and_claims_are_copied() -> None:
    rt = runtime("rt", nodeSelector={"gpu": "yes"}, tolerations=[{"key": "gpu", "operator": "Exists"}],
                 imagePullSecrets=[{"name": "pull"}], labels={"team": "a", "app.kubernetes.io/name": "mine"},
                 annotations={"note": "x"}, volumes=[{"name": "claim", "persistentVolumeClaim": {"claimName": "data"}}],
                 affinity={"nodeAffinity": {}},
                 builtInAdapter={"serverType": "mesh", "memBufferBytes": 1024**3},
                 containers=[{"name": "mesh", "image": "example/mesh:1", "resources": {"limits": {"memory": "4Gi"}},
                              "env": [{"name": "EXTRA", "value": "1"}, {"name": "MESH_RUNTIME_LABELS", "value": "x"}]}])
    pod_template = render_workload(rt, SETTINGS, NS)["spec"]["template"]
    pod = pod_template["spec"]
    assert pod["nodeSelector"] == {"gpu": "yes"} and pod["imagePullSecrets"] == [{"name": "pull"}]
    assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists"}] and pod["affinity"] == {"nodeAffinity": {}}
    labels = pod_template["metadata"]["labels"]
    assert labels["team"] == "a" and labels["app.kubernetes.io/name"] == "mesh-runtime"  # ours win
    assert pod_template["metadata"]["annotations"]["note"] == "x"
    assert {"name": "claim", "persistentVolumeClaim": {"claimName": "data"}} in pod["volumes"]
    [mesh] = pod["containers"]
    assert {"name": "claim", "mountPath": "/pvc_mounts/data", "readOnly": True} in mesh["volumeMounts"]
    env = env_of(mesh)
    assert env["EXTRA"] == "1" and env["MESH_RUNTIME_LABELS"] == "rt:rt"  # theirs, but not over ours
    assert env["MESH_RUNTIME_CAPACITY_BYTES"] == str(3 * 1024**3)  # memBufferBytes kept out of the limit
    bad = runtime("rt", volumes=[{"name": "models", "emptyDir": {}}])
    with pytest.raises(ValueError, match="are the mesh runtime's"):
        render_workload(bad, SETTINGS, NS)


def test_names_are_dns_labels_and_never_collide() -> None:
    cluster = workload_name(runtime("a-b-c"))
    assert cluster == "mesh-rt-a-b-c"
    names = {workload_name(runtime("a-b-c", namespace="x")), workload_name(runtime("c", namespace="a-b")),
             workload_name(runtime("b-c", namespace="a")), cluster, workload_name(runtime("a.b.c")),
             workload_name(runtime("a" * 200)), workload_name(runtime("a" * 199 + "b"))}
    assert len(names) == 7
    for name in names:
        assert len(name) <= 52 and name.replace("-", "").isalnum() and name == name.lower(), name
    assert workload_name(runtime("b-c", namespace="a")).startswith("mesh-rt-a-b-c-")


def test_replicas_owner_references_and_the_hash() -> None:
    assert render_workload(runtime("rt", replicas=5), SETTINGS, NS)["spec"]["replicas"] == 5
    assert render_workload(runtime("rt", replicas=0), SETTINGS, NS)["spec"]["replicas"] == 0
    cluster, local, other = (with_uid(runtime("rt"), "u-1"), with_uid(runtime("rt", namespace=NS), "u-2"),
                             with_uid(runtime("rt", namespace="elsewhere"), "u-3"))
    refs = {rt.ref: render_workload(rt, SETTINGS, NS)["metadata"].get("ownerReferences")
            for rt in (cluster, local, other)}
    assert refs["rt"] == [{"apiVersion": "serving.kserve.io/v1alpha1", "kind": "ClusterServingRuntime", "name": "rt",
                           "uid": "u-1", "controller": True, "blockOwnerDeletion": False}]
    assert refs[f"{NS}/rt"][0]["kind"] == "ServingRuntime" and refs["elsewhere/rt"] is None
    one, two = render_workload(runtime("rt"), SETTINGS, NS), render_workload(runtime("rt", replicas=7), SETTINGS, NS)
    assert one["metadata"]["annotations"][HASH_ANNOTATION] == spec_hash(two)  # replicas are not in the hash
    changed = render_workload(runtime("rt", nodeSelector={"a": "b"}), SETTINGS, NS)
    assert changed["metadata"]["annotations"][HASH_ANNOTATION] != spec_hash(one)


def test_quantities() -> None:
    assert quantity_bytes("4Gi") == 4 * 1024**3 and quantity_bytes("512M") == 512_000_000
    assert quantity_bytes("1e9") == 10**9 and quantity_bytes("1.5Gi") == int(1.5 * 1024**3)
    assert quantity_bytes("100") == 100 and quantity_bytes("512m") is None and quantity_bytes(None) is None


def test_usage_counts_and_its_version_moves_only_when_a_runtime_starts_or_stops_being_used() -> None:
    usage = RuntimeUsage()
    usage.set("a", "rt")
    usage.set("b", "rt")
    assert usage.count("rt") == 2 and usage.version == 1
    usage.set("a", "rt")
    usage.set("a", None)
    assert usage.count("rt") == 1 and usage.version == 1
    usage.set("b", "other")
    assert usage.count("rt") == 0 and usage.count("other") == 1 and usage.version == 3
    usage.set("missing", None)
    assert usage.version == 3


class Store:
    """An in-memory WorkloadStore or HpaStore (and EventSink) that can fail its next calls; ``calls``
    may be another store's, the calls then named ``<kind> <call>``."""

    def __init__(self, calls: list[tuple[str, str]] | None = None, kind: str = "") -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, str]] = [] if calls is None else calls
        self.kind = kind
        self.events: list[dict[str, Any]] = []
        self.fail: list[tuple[str, Exception]] = []  # (call, error): the next such call fails
        self.rv = 0

    def _call(self, what: str, name: str) -> None:
        self.calls.append((f"{self.kind} {what}" if self.kind else what, name))
        for i, (call, error) in enumerate(self.fail):
            if call == what:
                del self.fail[i]
                raise error

    def list(self) -> list[dict[str, Any]]:
        self._call("list", "")
        return [copy.deepcopy(o) for o in self.objects.values()]

    def create(self, body: dict[str, Any]) -> None:
        name = body["metadata"]["name"]
        self._call("create", name)
        if name in self.objects:
            raise Refused("exists", 409)
        self.rv += 1
        self.objects[name] = {**copy.deepcopy(body), "metadata": {**body["metadata"], "resourceVersion": str(self.rv),
                                                                 "uid": f"uid-{name}"}}

    def replace(self, name: str, body: dict[str, Any]) -> None:
        self._call("replace", name)
        assert body["metadata"]["resourceVersion"] == self.objects[name]["metadata"]["resourceVersion"]
        self.rv += 1
        self.objects[name] = {**copy.deepcopy(body), "metadata": {**body["metadata"], "resourceVersion": str(self.rv)}}

    def scale(self, name: str, replicas: int) -> None:
        self._call("scale", name)
        self.objects[name]["spec"]["replicas"] = replicas

    def delete(self, name: str, uid: str) -> None:
        self._call("delete", name)
        self.objects.pop(name, None)

    def create_event(self, namespace: str, body: dict[str, Any]) -> None:
        self._call("event", namespace)
        self.events.append(body)


class Events:
    def __init__(self, store: Store) -> None:
        self.store = store

    def create(self, namespace: str, body: dict[str, Any]) -> None:
        self.store.create_event(namespace, body)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def setup(*runtimes: ServingRuntime, **overrides: Any) -> tuple[Workloads, Store, RuntimeCatalog, RuntimeUsage, Clock]:
    store, catalog, usage, clock = Store(), RuntimeCatalog(), RuntimeUsage(), Clock()
    for rt in runtimes:
        catalog.put(rt)
    settings = replace(SETTINGS, **overrides)
    w = Workloads(settings, store, Events(store), catalog, usage, namespace=NS, clock=clock,
                  hpas=Store(store.calls, "hpa"))
    return w, store, catalog, usage, clock


def hpas_of(w: Workloads) -> Store:
    assert isinstance(w.hpas, Store)
    return w.hpas


def replicas(store: Store) -> dict[str, int]:
    return {name: o["spec"]["replicas"] for name, o in store.objects.items()}


async def test_used_runtimes_run_and_scale_to_zero_after_the_grace_period() -> None:
    w, store, _, usage, clock = setup(runtime("a"), runtime("b", replicas=3))
    assert await w.reconcile() and store.objects == {}  # nobody uses them: nothing runs
    usage.set(("Predictor", "ns", "p1"), "a")
    usage.set(("Predictor", "ns", "p2"), "b")
    assert await w.reconcile()
    assert replicas(store) == {"mesh-rt-a": 2, "mesh-rt-b": 3}
    calls = len(store.calls)
    assert await w.reconcile() and store.calls[calls:] == [("list", ""), ("hpa list", "")]  # in sync: no writes
    usage.set(("Predictor", "ns", "p1"), None)
    assert await w.reconcile() and replicas(store)["mesh-rt-a"] == 2  # within the grace period
    assert w.next_deadline() == clock.now + 60
    clock.now += 59
    assert await w.reconcile() and replicas(store)["mesh-rt-a"] == 2
    clock.now += 1
    assert await w.reconcile() and replicas(store) == {"mesh-rt-a": 0, "mesh-rt-b": 3}
    assert await w.reconcile() and w.next_deadline() is None  # at zero: nothing to wait for
    usage.set(("Predictor", "ns", "p3"), "a")  # its first model: back up at once
    assert await w.reconcile() and replicas(store)["mesh-rt-a"] == 2


async def test_scale_to_zero_off_keeps_replicas_and_a_restart_never_scales_up() -> None:
    w, store, _, usage, clock = setup(runtime("a"), scale_to_zero=False)
    usage.set("p", "a")
    await w.reconcile()
    usage.set("p", None)
    clock.now += 3600
    assert await w.reconcile() and replicas(store) == {"mesh-rt-a": 2}
    # a new controller finds it at zero, unused: it stays there, also within the grace period
    w2, store2, _, _, _ = setup(runtime("a"))
    store2.objects = copy.deepcopy(store.objects)
    store2.objects["mesh-rt-a"]["spec"]["replicas"] = 0
    assert await w2.reconcile() and replicas(store2) == {"mesh-rt-a": 0}


async def test_changes_replace_gone_or_disabled_runtimes_are_deleted_invalid_ones_kept() -> None:
    w, store, catalog, usage, _ = setup(runtime("a"), runtime("b"), runtime("c"))
    for ref in "abc":
        usage.set(ref, ref)
    await w.reconcile()
    store.objects["hand-made"] = {"metadata": {"name": "hand-made", "labels": {}}, "spec": {"replicas": 1}}
    catalog.put(runtime("a", generation=2, nodeSelector={"x": "y"}))
    catalog.put(runtime("b", generation=2, disabled=True))
    catalog.remove("", "c")
    assert await w.reconcile()
    assert sorted(store.objects) == ["hand-made", "mesh-rt-a"]
    assert store.objects["mesh-rt-a"]["spec"]["template"]["spec"]["nodeSelector"] == {"x": "y"}
    assert ("replace", "mesh-rt-a") in store.calls
    invalid = runtime("a", generation=3, containers=[])
    assert invalid.error
    catalog.put(invalid)
    store.fail = [("event", Unavailable("down"))]
    # An invalid edit leaves what runs as it was (the running pods keep serving), with an Event.
    assert not await w.reconcile() and sorted(store.objects) == ["hand-made", "mesh-rt-a"] and not store.events
    assert await w.reconcile()  # the Event again
    [event] = store.events
    assert event["reason"] == "InvalidServingRuntime" and event["message"] == invalid.error
    assert event["involvedObject"] == {"apiVersion": "serving.kserve.io/v1alpha1", "kind": "ClusterServingRuntime",
                                       "name": "a"} and event["metadata"]["namespace"] == NS
    assert await w.reconcile() and len(store.events) == 1  # once per generation
    catalog.put(replace(invalid, generation=4))
    assert await w.reconcile() and len(store.events) == 2


async def test_api_failures_are_reported_and_retried_on_the_next_pass() -> None:
    w, store, _, usage, clock = setup(runtime("a"), runtime("b"))
    usage.set("p", "a")
    usage.set("q", "b")
    store.fail = [("list", Unavailable("down"))]
    assert not await w.reconcile() and store.objects == {}
    store.fail = [("create", Unavailable("down"))]  # one fails, the other goes through
    assert not await w.reconcile() and list(store.objects) == ["mesh-rt-b"]
    assert await w.reconcile() and sorted(store.objects) == ["mesh-rt-a", "mesh-rt-b"]
    usage.set("p", None)
    store.fail = [("scale", Unavailable("down"))]
    clock.now += 60
    await w.reconcile()  # starts the grace period
    clock.now += 60
    assert not await w.reconcile() and replicas(store)["mesh-rt-a"] == 2
    assert await w.reconcile() and replicas(store)["mesh-rt-a"] == 0  # no new grace period after a failure


async def test_a_foreign_statefulset_of_the_same_name_is_left_alone() -> None:
    w, store, _, usage, _ = setup(autoscaled(runtime("a")))
    usage.set("p", "a")
    foreign = {"metadata": {"name": "mesh-rt-a", "labels": {"app": "mine"}}, "spec": {"replicas": 9}}
    store.objects["mesh-rt-a"] = foreign
    assert await w.reconcile() and store.objects["mesh-rt-a"] == foreign
    assert [c for c in store.calls if not c[0].endswith("list")] == [("create", "mesh-rt-a")]  # refused: exists
    assert hpas_of(w).objects == {}  # nor an HPA on it


async def test_a_runtime_scaled_by_another_autoscaler_keeps_the_replicas_it_was_given() -> None:
    w, store, _, usage, clock = setup(autoscaled(runtime("a"), "keda"))
    usage.set("p", "a")
    await w.reconcile()
    store.objects["mesh-rt-a"]["spec"]["replicas"] = 7  # KEDA's
    usage.set("p", None)
    clock.now += 3600
    assert await w.reconcile() and replicas(store) == {"mesh-rt-a": 7} and w.next_deadline() is None
    assert hpas_of(w).objects == {}  # only autoscalerClass hpa gets an HPA from the controller


async def test_run_waits_for_ready_then_follows_usage_changes() -> None:
    store, catalog, usage = Store(), RuntimeCatalog(), RuntimeUsage()
    catalog.put(runtime("a"))
    ready = asyncio.Event()
    w = Workloads(replace(SETTINGS, resync_s=30.0), store, Events(store), catalog, usage, namespace=NS,
                  hpas=Store(), poll_s=0.01, ready=[ready])
    task = asyncio.create_task(w.run())
    try:
        await asyncio.sleep(0.05)
        assert w.passes == 0
        ready.set()
        usage.set("p", "a")
        for _ in range(200):
            if store.objects:
                break
            await asyncio.sleep(0.01)
        assert replicas(store) == {"mesh-rt-a": 2}
    finally:
        task.cancel()



async def test_refusals_recreate_in_place_changes_and_tell_the_runtime_of_an_invalid_workload() -> None:
    w, store, catalog, usage, _ = setup(runtime("a"))
    usage.set("p", "a")
    await w.reconcile()
    catalog.put(runtime("a", generation=2, nodeSelector={"x": "y"}))
    # A refused change that touches no immutable field is an invalid one: what runs stays, an Event says why.
    store.fail = [("replace", Refused("spec.template.spec.nodeSelector: Invalid value", 422))]
    assert await w.reconcile() and "nodeSelector" not in store.objects["mesh-rt-a"]["spec"]["template"]["spec"]
    assert "left as it was" in store.events[-1]["message"]
    # One an earlier controller made with another selector cannot be changed in place: deleted, created again.
    store.objects["mesh-rt-a"]["spec"]["selector"] = {"matchLabels": {"old": "selector"}}
    store.fail = [("replace", Refused("selector: field is immutable", 422))]
    assert not await w.reconcile() and store.objects == {}  # deleted, to be created again
    assert await w.reconcile() and store.objects["mesh-rt-a"]["spec"]["template"]["spec"]["nodeSelector"] == {"x": "y"}
    store.objects.clear()
    store.events.clear()
    store.fail = [("create", Refused("spec.template: Invalid value", 422))]
    assert await w.reconcile() and store.objects == {}
    [event] = store.events
    assert event["message"] == "the API server refused its StatefulSet: spec.template: Invalid value"


# --- HorizontalPodAutoscalers (serving.kserve.io/autoscalerClass: hpa) ----------------------------


def hpa_of(rt: ServingRuntime) -> dict[str, Any]:
    return render_hpa(rt, SETTINGS, render_workload(rt, SETTINGS, NS))


def test_the_hpa_scales_the_statefulset_on_the_runtime_groups_signal_like_deploy_autoscaling() -> None:
    rt = with_uid(autoscaled(runtime("rt"), min=2, max=5), "u-1")
    sts = render_workload(rt, SETTINGS, NS)
    hpa = render_hpa(rt, SETTINGS, sts)
    assert _unknown_fields(hpa, "V2HorizontalPodAutoscaler", "hpa") == []
    model = _as_model(hpa, "V2HorizontalPodAutoscaler")  # raises on a missing required field
    assert (model.metadata.name, model.metadata.namespace) == ("mesh-rt-rt", NS)
    assert hpa["metadata"]["labels"] == sts["metadata"]["labels"] and hpa["metadata"]["labels"][MANAGED_BY]
    assert hpa["metadata"]["ownerReferences"] == sts["metadata"]["ownerReferences"]
    target = model.spec.scale_target_ref
    assert (target.api_version, target.kind, target.name) == ("apps/v1", "StatefulSet", "mesh-rt-rt")
    assert (model.spec.min_replicas, model.spec.max_replicas) == (2, 5)
    # deploy/autoscaling/hpa's metric and behaviour, with the runtime's group (its name) as selector
    shipped_hpa = yaml.safe_load((ROOT / "deploy" / "autoscaling" / "hpa" / "hpa.yaml").read_text())["spec"]
    [metric] = shipped_hpa["metrics"]
    metric["external"]["metric"]["selector"]["matchLabels"]["runtime"] = rt.ref
    assert hpa["spec"]["metrics"] == [metric] and hpa["spec"]["behavior"] == shipped_hpa["behavior"]
    assert hpa["metadata"]["annotations"][HASH_ANNOTATION] == spec_hash(hpa)
    assert spec_hash(hpa_of(autoscaled(runtime("rt"), min=2, max=6))) != spec_hash(hpa)


def test_hpa_bounds_default_and_a_min_scale_of_zero_reads_as_one() -> None:
    def bounds(rt: ServingRuntime) -> tuple[int, int]:
        spec = hpa_of(rt)["spec"]
        return spec["minReplicas"], spec["maxReplicas"]

    assert bounds(autoscaled(runtime("rt"))) == (1, 10)
    assert bounds(autoscaled(runtime("rt"), min=0, max=3)) == (1, 3)  # the controller scales to zero
    assert bounds(autoscaled(runtime("rt"), min=12)) == (12, 12)
    assert bounds(autoscaled(runtime("rt", replicas=20))) == (1, 20)  # never below the runtime's own count
    assert bounds(autoscaled(runtime("rt"), min=" 3 ", max="1000")) == (3, 1000)


@pytest.mark.parametrize(("scale", "message"), [
    ({"min": "two"}, "annotation serving.kserve.io/min-scale: 'two' is not an integer from 0 to 1000"),
    ({"min": -1}, "annotation serving.kserve.io/min-scale: '-1' is not an integer from 0 to 1000"),
    ({"max": 1001}, "annotation serving.kserve.io/max-scale: '1001' is not an integer from 1 to 1000"),
    ({"max": 0}, "annotation serving.kserve.io/max-scale: '0' is not an integer from 1 to 1000"),
    ({"max": "2.5"}, "annotation serving.kserve.io/max-scale: '2.5' is not an integer from 1 to 1000"),
    ({"min": 5, "max": 3}, "annotations serving.kserve.io/min-scale (5) above serving.kserve.io/max-scale (3)"),
])
def test_bad_bounds_give_no_hpa(scale: dict[str, int | str], message: str) -> None:
    with pytest.raises(InvalidRuntime) as caught:
        hpa_of(autoscaled(runtime("rt"), **scale))
    assert str(caught.value).startswith(message) and "without a HorizontalPodAutoscaler" in str(caught.value)


def test_a_runtime_group_that_is_no_label_value_gets_no_hpa() -> None:
    for rt in (runtime("rt", namespace=NS), runtime("r" * 64)):
        with pytest.raises(InvalidRuntime, match=r"not a label value.*deploy/autoscaling/keda"):
            hpa_of(autoscaled(rt))


async def test_an_hpa_runtime_gets_its_hpa_after_its_pods_and_loses_it_before_scaling_to_zero() -> None:
    w, store, catalog, usage, clock = setup(autoscaled(runtime("a"), min=1, max=4), runtime("b"))
    hpas = hpas_of(w)
    usage.set("p", "a")
    usage.set("q", "b")
    assert await w.reconcile()
    assert replicas(store) == {"mesh-rt-a": 2, "mesh-rt-b": 2} and list(hpas.objects) == ["mesh-rt-a"]
    writes = [c for c in store.calls if not c[0].endswith("list")]
    assert writes.index(("create", "mesh-rt-a")) < writes.index(("hpa create", "mesh-rt-a"))
    assert hpas.objects["mesh-rt-a"]["spec"] == hpa_of(autoscaled(runtime("a"), min=1, max=4))["spec"]
    store.objects["mesh-rt-a"]["spec"]["replicas"] = 4  # the HPA's
    calls = len(store.calls)
    assert await w.reconcile() and replicas(store)["mesh-rt-a"] == 4
    assert store.calls[calls:] == [("list", ""), ("hpa list", "")]  # in sync: no writes
    catalog.put(autoscaled(runtime("a"), min=1, max=6))  # an annotation changed: the HPA is replaced
    assert await w.reconcile() and hpas.objects["mesh-rt-a"]["spec"]["maxReplicas"] == 6
    assert replicas(store)["mesh-rt-a"] == 4 and ("replace", "mesh-rt-a") not in store.calls

    usage.set("p", None)  # the last model goes: the HPA stays through the grace period, then goes first
    assert await w.reconcile() and "mesh-rt-a" in hpas.objects
    clock.now += 60
    calls = len(store.calls)
    assert await w.reconcile() and replicas(store)["mesh-rt-a"] == 0 and hpas.objects == {}
    assert store.calls[calls + 2:] == [("hpa delete", "mesh-rt-a"), ("scale", "mesh-rt-a")]
    assert await w.reconcile() and hpas.objects == {}  # at zero: no HPA
    usage.set("p", "a")  # its first model: its pods first, then the HPA
    calls = len(store.calls)
    assert await w.reconcile() and replicas(store)["mesh-rt-a"] == 2 and "mesh-rt-a" in hpas.objects
    assert store.calls[calls + 2:] == [("scale", "mesh-rt-a"), ("hpa create", "mesh-rt-a")]

    store.objects["mesh-rt-a"]["spec"]["replicas"] = 3
    catalog.put(runtime("a"))  # the annotation goes: so does the HPA, before the controller scales
    calls = len(store.calls)
    assert await w.reconcile() and hpas.objects == {} and replicas(store)["mesh-rt-a"] == 2
    assert store.calls[calls + 2:] == [("hpa delete", "mesh-rt-a"), ("scale", "mesh-rt-a")]
    catalog.put(autoscaled(runtime("a")))
    assert await w.reconcile() and "mesh-rt-a" in hpas.objects
    catalog.remove("", "a")  # the runtime goes: its HPA, then its StatefulSet
    calls = len(store.calls)
    assert await w.reconcile() and hpas.objects == {} and list(store.objects) == ["mesh-rt-b"]
    assert store.calls[calls + 2:] == [("hpa delete", "mesh-rt-a"), ("delete", "mesh-rt-a")]


async def test_a_runtime_whose_hpa_is_refused_gets_an_event_and_the_controllers_replicas() -> None:
    bad, local = autoscaled(runtime("a"), min=5, max=3), autoscaled(runtime("b", namespace=NS))
    w, store, _, usage, clock = setup(bad, local)
    usage.set("p", "a")
    usage.set("q", f"{NS}/b")
    assert await w.reconcile() and hpas_of(w).objects == {}
    assert sorted(replicas(store).values()) == [2, 2]
    messages = sorted(e["message"] for e in store.events)
    assert messages[0].startswith("annotations serving.kserve.io/min-scale (5) above")
    assert "not a label value" in messages[1] and store.events[0]["reason"] == "InvalidServingRuntime"
    assert await w.reconcile() and len(store.events) == 2  # once per generation
    usage.set("p", None)
    usage.set("q", None)
    clock.now += 60
    await w.reconcile()
    clock.now += 60
    assert await w.reconcile() and sorted(replicas(store).values()) == [0, 0]  # scaled to zero as any runtime


async def test_hpas_not_listed_leave_hpa_runtimes_for_the_next_pass() -> None:
    w, store, _, usage, _ = setup(autoscaled(runtime("a")), runtime("b"))
    hpas = hpas_of(w)
    usage.set("p", "a")
    usage.set("q", "b")
    hpas.fail = [("list", Unavailable("forbidden"))]
    assert not await w.reconcile() and list(store.objects) == ["mesh-rt-b"]
    assert await w.reconcile() and list(hpas.objects) == ["mesh-rt-a"]
    hpas.objects["mesh-rt-x"] = {"metadata": {"name": "mesh-rt-x", "labels": {}}, "spec": {}}  # not ours
    hpas.fail = [("delete", Unavailable("down"))]
    usage.set("p", None)
    w.settings = replace(w.settings, scale_to_zero_grace_s=0.0)
    assert not await w.reconcile() and replicas(store)["mesh-rt-a"] == 2  # never to zero under its HPA
    assert await w.reconcile() and replicas(store)["mesh-rt-a"] == 0 and list(hpas.objects) == ["mesh-rt-x"]


def test_hostile_quantities_are_no_number() -> None:
    """Quantities are a runtime author's text: nothing overflows or computes a huge power."""
    assert quantity_bytes("4Gi") == 4 * 2**30 and quantity_bytes("1e9") == 10**9 and quantity_bytes("1.5M") == 1_500_000
    for text in ("1e400", "1e30000000", "9" * 100, "99999999Ei", "", "abc", None):
        assert quantity_bytes(text) is None, text


async def test_a_runtime_that_breaks_rendering_costs_only_itself() -> None:
    """Whatever a runtime's spec breaks while it is rendered is that runtime's failure (an Event),
    never the pass's: the other runtimes go on, and the controller keeps running."""
    broken = runtime("broken", containers=[{"name": "mesh", "image": "x", "env": 5}])
    huge = runtime("huge", containers=[{"name": "mesh", "image": "x",
                                        "resources": {"limits": {"memory": "1e400"}}}])
    w, store, _, usage, _ = setup(broken, huge, runtime("fine"), runtime("refused"))
    for ref in ("broken", "huge", "fine", "refused"):
        usage.set(ref, ref)
    # the client's own model check refusing a body (not an API error): that runtime's failure too
    store.fail = [("create", ValueError("1 validation error for V1SecurityContext"))]
    await w.reconcile()
    await w.reconcile()
    assert {"mesh-rt-fine", "mesh-rt-huge"} <= set(store.objects) and "mesh-rt-broken" not in store.objects
    messages = {e["involvedObject"]["name"]: e["message"] for e in store.events}
    assert "cannot be run: TypeError" in messages["broken"]
    assert "cannot be written: ValueError: 1 validation error" in next(iter(
        m for n, m in messages.items() if n != "broken"))
