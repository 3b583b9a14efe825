"""The fake Kubernetes API server (tests/support/fake_kube.py), driven through the real official
client (``kubernetes.client.CustomObjectsApi`` and ``kubernetes.watch.Watch``).

Real: the client library, HTTP on 127.0.0.1, the watch protocol as the client parses it.
Fake: the API server itself (no kube-apiserver can be installed here); these tests pin down that
it behaves like the real one where the controller depends on it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import urllib3
from kubernetes import client, watch
from kubernetes.client.rest import ApiException

from tests.support.fake_kube import (
    CLUSTER_SERVING_RUNTIMES,
    EVENTS,
    GROUP,
    PLURAL,
    SERVING_RUNTIMES,
    STATEFULSETS,
    VERSION,
    FakeKubeApiServer,
)

NS = "default"


def predictor(name: str, model_type: str = "sklearn", path: str = "/models/a") -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Predictor", "metadata": {"name": name},
            "spec": {"modelType": {"name": model_type}, "path": path}}


STATUS = {"available": True, "activeModelState": "Loaded", "targetModelState": "",
          "transitionStatus": "UpToDate", "failedCopies": 0, "totalCopies": 1}


@pytest.fixture
def api() -> Iterator[FakeKubeApiServer]:
    with FakeKubeApiServer(bookmark_interval_s=0.2) as server:
        yield server


@pytest.fixture
def crs(api: FakeKubeApiServer) -> Iterator[client.CustomObjectsApi]:
    with client.ApiClient(client.Configuration(host=api.url)) as api_client:
        yield client.CustomObjectsApi(api_client)


def create(crs: client.CustomObjectsApi, body: dict[str, Any], ns: str = NS) -> dict[str, Any]:
    return crs.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)


def stream(crs: client.CustomObjectsApi, **kwargs: Any) -> list[dict[str, Any]]:
    return list(watch.Watch().stream(crs.list_namespaced_custom_object, GROUP, VERSION, NS, PLURAL, **kwargs))


def test_create_get_list_and_metadata(crs: client.CustomObjectsApi, api: FakeKubeApiServer) -> None:
    created = create(crs, predictor("a"))
    meta = created["metadata"]
    assert meta["generation"] == 1 and meta["uid"] and meta["creationTimestamp"].endswith("Z")
    assert meta["namespace"] == NS and int(meta["resourceVersion"]) > 0
    assert crs.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "a") == created
    create(crs, predictor("b"), ns="other")
    listed = crs.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL)
    assert listed["kind"] == "PredictorList" and [o["metadata"]["name"] for o in listed["items"]] == ["a"]
    assert listed["metadata"]["resourceVersion"] == str(api.resource_version)
    everywhere = crs.list_custom_object_for_all_namespaces(GROUP, VERSION, PLURAL)
    assert sorted(o["metadata"]["name"] for o in everywhere["items"]) == ["a", "b"]
    assert [(r.method, r.path) for r in api.requests][:2] == [
        ("POST", f"/apis/{GROUP}/{VERSION}/namespaces/{NS}/{PLURAL}"),
        ("GET", f"/apis/{GROUP}/{VERSION}/namespaces/{NS}/{PLURAL}/a")]


def test_errors_are_status_bodies_with_the_real_reasons(crs: client.CustomObjectsApi) -> None:
    create(crs, predictor("a"))
    with pytest.raises(ApiException) as err:
        create(crs, predictor("a"))
    assert err.value.status == 409 and '"reason": "AlreadyExists"' in err.value.body
    with pytest.raises(ApiException) as err:
        crs.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "missing")
    assert err.value.status == 404 and '"reason": "NotFound"' in err.value.body


def test_patch_bumps_generation_only_for_spec_changes(crs: client.CustomObjectsApi) -> None:
    create(crs, predictor("a"))
    patched = crs.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "a", {"spec": {"path": "/models/b"}})
    assert patched["spec"] == {"modelType": {"name": "sklearn"}, "path": "/models/b"}  # merged, not replaced
    assert patched["metadata"]["generation"] == 2
    labelled = crs.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "a",
                                                  {"metadata": {"labels": {"team": "x"}}})
    assert labelled["metadata"]["generation"] == 2 and labelled["metadata"]["labels"] == {"team": "x"}
    # writes to the main resource ignore .status (the CRD has the status subresource)
    ignored = crs.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "a", {"status": STATUS})
    assert "status" not in ignored


def test_status_subresource_changes_only_status(crs: client.CustomObjectsApi, api: FakeKubeApiServer) -> None:
    created = create(crs, predictor("a"))
    patched = crs.patch_namespaced_custom_object_status(
        GROUP, VERSION, NS, PLURAL, "a", {"status": STATUS, "spec": {"path": "/elsewhere"}})
    assert patched["status"] == STATUS
    assert patched["spec"] == created["spec"] and patched["metadata"]["generation"] == 1
    assert int(patched["metadata"]["resourceVersion"]) > int(created["metadata"]["resourceVersion"])
    rv = api.resource_version
    again = crs.patch_namespaced_custom_object_status(GROUP, VERSION, NS, PLURAL, "a", {"status": STATUS})
    assert api.resource_version == rv and again == patched  # a no-op write is no change
    cleared = crs.patch_namespaced_custom_object_status(
        GROUP, VERSION, NS, PLURAL, "a", {"status": {"lastFailureInfo": None, "available": False}})
    assert cleared["status"]["available"] is False and "lastFailureInfo" not in cleared["status"]
    assert crs.get_namespaced_custom_object_status(GROUP, VERSION, NS, PLURAL, "a")["status"] == cleared["status"]


def test_put_with_a_stale_resource_version_is_a_conflict(crs: client.CustomObjectsApi) -> None:
    created = create(crs, predictor("a"))
    crs.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "a", {"spec": {"path": "/models/b"}})
    stale = {**created, "spec": {"modelType": {"name": "onnx"}, "path": "/models/c"}}
    with pytest.raises(ApiException) as err:
        crs.replace_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "a", stale)
    assert err.value.status == 409 and '"reason": "Conflict"' in err.value.body
    fresh = crs.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "a")
    replaced = crs.replace_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "a", {**fresh, "spec": stale["spec"]})
    assert replaced["spec"]["modelType"]["name"] == "onnx" and replaced["metadata"]["generation"] == 3


def test_objects_are_validated_against_the_crd_schema(crs: client.CustomObjectsApi, api: FakeKubeApiServer) -> None:
    bad = predictor("a")
    bad["spec"]["gpu"] = "always"
    with pytest.raises(ApiException) as err:
        create(crs, bad)
    assert err.value.status == 422 and '"reason": "Invalid"' in err.value.body and "gpu" in err.value.body
    create(crs, predictor("a", model_type="no-such-type"))  # schema-valid, semantically not: the controller's job
    with pytest.raises(ApiException) as err:
        crs.patch_namespaced_custom_object_status(GROUP, VERSION, NS, PLURAL, "a",
                                                  {"status": {**STATUS, "transitionStatus": "Sideways"}})
    assert err.value.status == 422
    with FakeKubeApiServer(validate=False) as lax, client.ApiClient(client.Configuration(host=lax.url)) as c:
        client.CustomObjectsApi(c).create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, bad)
        assert lax.objects()[0]["spec"]["gpu"] == "always"


def test_watch_resumes_from_a_resource_version(crs: client.CustomObjectsApi, api: FakeKubeApiServer) -> None:
    create(crs, predictor("a"))
    rv = crs.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL)["metadata"]["resourceVersion"]
    crs.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "a", {"spec": {"path": "/models/b"}})
    create(crs, predictor("b"))
    create(crs, predictor("elsewhere"), ns="other")  # another namespace: not in this watch
    crs.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "b")
    events = stream(crs, resource_version=rv, timeout_seconds=1)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("MODIFIED", "a"), ("ADDED", "b"), ("DELETED", "b")]
    versions = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
    assert versions == sorted(versions) and versions[0] > int(rv)
    # without a version: the current objects as ADDED events first
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in stream(crs, timeout_seconds=1)] == [("ADDED", "a")]


def test_watch_follows_live_changes_and_sends_bookmarks(crs: client.CustomObjectsApi, api: FakeKubeApiServer) -> None:
    rv = crs.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL)["metadata"]["resourceVersion"]
    timer = threading.Timer(0.3, lambda: api.put({**predictor("late"), "metadata": {"name": "late", "namespace": NS}}))
    timer.start()
    started = time.monotonic()
    events = stream(crs, resource_version=rv, allow_watch_bookmarks=True, timeout_seconds=1)
    assert 0.9 < time.monotonic() - started < 3  # the server ends the watch after timeoutSeconds
    kinds = [e["type"] for e in events]
    assert "ADDED" in kinds and kinds.count("BOOKMARK") >= 2
    bookmark = next(e for e in events if e["type"] == "BOOKMARK" and kinds.index("ADDED") < events.index(e))
    assert set(bookmark["raw_object"]["metadata"]) == {"resourceVersion"}
    assert int(bookmark["raw_object"]["metadata"]["resourceVersion"]) >= api.resource_version


def test_a_compacted_version_gets_410_gone(crs: client.CustomObjectsApi, api: FakeKubeApiServer) -> None:
    create(crs, predictor("a"))
    old = crs.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL)["metadata"]["resourceVersion"]
    create(crs, predictor("b"))
    api.compact()
    with pytest.raises(ApiException) as err:
        stream(crs, resource_version=old, timeout_seconds=1)
    assert err.value.status == 410 and "too old resource version" in str(err.value.reason)
    # a fresh list gives a version that can be watched again
    rv = crs.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL)["metadata"]["resourceVersion"]
    assert stream(crs, resource_version=rv, timeout_seconds=1) == []


def test_end_watches_and_stop_close_open_streams(api: FakeKubeApiServer, crs: client.CustomObjectsApi) -> None:
    threading.Timer(0.3, api.end_watches).start()
    started = time.monotonic()
    assert stream(crs, resource_version=str(api.resource_version), timeout_seconds=30) == []
    assert time.monotonic() - started < 5
    # Watch.stop() from another thread unblocks a reader at once (it shuts the socket down)
    w = watch.Watch()
    threading.Timer(0.3, w.stop).start()
    started = time.monotonic()
    with pytest.raises(urllib3.exceptions.ProtocolError):  # what the client raises for a cut stream
        list(w.stream(crs.list_namespaced_custom_object, GROUP, VERSION, NS, PLURAL,
                      resource_version=str(api.resource_version), timeout_seconds=30))
    assert time.monotonic() - started < 5


def test_injected_failures_and_the_request_log(crs: client.CustomObjectsApi, api: FakeKubeApiServer) -> None:
    api.fail_next(2, code=503)
    for _ in range(2):
        with pytest.raises(ApiException) as err:
            crs.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL)
        assert err.value.status == 503
    assert crs.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL)["items"] == []
    create(crs, predictor("a"))
    crs.patch_namespaced_custom_object_status(GROUP, VERSION, NS, PLURAL, "a", {"status": STATUS})
    assert api.count("PATCH", "/status") == 1 and api.count("GET") == 3
    assert [o["metadata"]["name"] for o in api.objects()] == ["a"]
    watch_request = stream(crs, resource_version="1", timeout_seconds=1, allow_watch_bookmarks=True)
    assert watch_request  # replays the history since version 1
    assert api.requests[-1].query == {"watch": "true", "resourceVersion": "1", "timeoutSeconds": "1",
                                      "allowWatchBookmarks": "true"}


def cluster_runtime(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/v1alpha1", "kind": "ClusterServingRuntime", "metadata": {"name": name},
            "spec": {"multiModel": True, "containers": [{"name": "mesh", "image": "mesh:1"}], **spec}}


def test_cluster_scoped_resources_have_no_namespace() -> None:
    crsr = CLUSTER_SERVING_RUNTIMES
    with FakeKubeApiServer(resources=(crsr, SERVING_RUNTIMES), validate=False, bookmark_interval_s=0.2) as api, \
            client.ApiClient(client.Configuration(host=api.url)) as c:
        crs = client.CustomObjectsApi(c)
        created = crs.create_cluster_custom_object(GROUP, "v1alpha1", crsr.plural, cluster_runtime("a"))
        assert "namespace" not in created["metadata"] and created["metadata"]["generation"] == 1
        assert api.requests[-1].path == f"/apis/{GROUP}/v1alpha1/clusterservingruntimes"
        listed = crs.list_cluster_custom_object(GROUP, "v1alpha1", crsr.plural)
        assert listed["kind"] == "ClusterServingRuntimeList"
        assert [o["metadata"]["name"] for o in listed["items"]] == ["a"]
        rv = listed["metadata"]["resourceVersion"]
        assert crs.get_cluster_custom_object(GROUP, "v1alpha1", crsr.plural, "a") == created
        assert api.get("", "a", crsr) == created
        # no status subresource: .status is stored with the object, and a status change bumps generation
        patched = crs.patch_cluster_custom_object(GROUP, "v1alpha1", crsr.plural, "a", {"status": {"x": 1}})
        assert patched["status"] == {"x": 1} and patched["metadata"]["generation"] == 2
        with pytest.raises(ApiException) as err:
            crs.get_cluster_custom_object_status(GROUP, "v1alpha1", crsr.plural, "a")
        assert err.value.status == 404
        # a namespaced path to a cluster-scoped resource does not exist
        with pytest.raises(ApiException) as err:
            crs.list_namespaced_custom_object(GROUP, "v1alpha1", NS, crsr.plural)
        assert err.value.status == 404
        api.put(cluster_runtime("b"), crsr)
        crs.delete_cluster_custom_object(GROUP, "v1alpha1", crsr.plural, "a")
        events = list(watch.Watch().stream(crs.list_cluster_custom_object, GROUP, "v1alpha1", crsr.plural,
                                           resource_version=rv, timeout_seconds=1))
        assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
            ("MODIFIED", "a"), ("ADDED", "b"), ("DELETED", "a")]
        # a namespaced runtime beside it: its own resource, in its namespace
        crs.create_namespaced_custom_object(GROUP, "v1alpha1", NS, SERVING_RUNTIMES.plural,
                                            {**cluster_runtime("a"), "kind": "ServingRuntime"})
        assert [o["metadata"]["name"] for o in api.objects(crsr)] == ["b"]
        assert api.objects(SERVING_RUNTIMES)[0]["metadata"]["namespace"] == NS


def statefulset(name: str, replicas: int = 1) -> dict[str, Any]:
    labels = {"app": name}
    return {"apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "test"}},
            "spec": {"replicas": replicas, "serviceName": name, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels},
                                  "spec": {"containers": [{"name": "c", "image": "busybox"}]}}}}


def test_statefulsets_through_the_apps_api() -> None:
    with FakeKubeApiServer(resources=(STATEFULSETS,)) as api, \
            client.ApiClient(client.Configuration(host=api.url)) as c:
        apps = client.AppsV1Api(c)
        created = apps.create_namespaced_stateful_set(NS, statefulset("a"))
        assert created.metadata.generation == 1 and created.spec.replicas == 1
        assert api.requests[-1].path == f"/apis/apps/v1/namespaces/{NS}/statefulsets"
        patched = apps.patch_namespaced_stateful_set("a", NS, {"spec": {"replicas": 0}},
                                                     _content_type="application/merge-patch+json")
        assert patched.spec.replicas == 0 and patched.metadata.generation == 2
        # the client's default for a dict is a JSON patch, which the fake (like this body on a real
        # server) refuses: callers must name the merge patch
        with pytest.raises(ApiException) as err:
            apps.patch_namespaced_stateful_set("a", NS, {"spec": {"replicas": 2}})
        assert err.value.status == 415
        # the status subresource: writes to the main resource ignore .status
        apps.patch_namespaced_stateful_set_status("a", NS, {"status": {"replicas": 0, "readyReplicas": 0}},
                                                  _content_type="application/merge-patch+json")
        fresh = apps.read_namespaced_stateful_set("a", NS)
        assert fresh.status.replicas == 0 and fresh.metadata.generation == 2
        api.put({**statefulset("b"), "metadata": {"name": "b", "namespace": NS}}, STATEFULSETS)  # no labels
        listed = apps.list_namespaced_stateful_set(NS, label_selector="app.kubernetes.io/managed-by=test")
        assert [s.metadata.name for s in listed.items] == ["a"]
        assert [s.metadata.name for s in apps.list_stateful_set_for_all_namespaces(
            label_selector="!app.kubernetes.io/managed-by").items] == ["b"]
        assert len(apps.list_namespaced_stateful_set(NS, label_selector="app.kubernetes.io/managed-by!=x").items) == 2
        # a body on DELETE (options) is read, so the kept-alive connection serves the next request
        apps.delete_namespaced_stateful_set("a", NS, body=client.V1DeleteOptions(propagation_policy="Foreground"))
        assert [o["metadata"]["name"] for o in api.objects(STATEFULSETS)] == ["b"]
        with pytest.raises(ApiException) as err:
            apps.read_namespaced_stateful_set("a", NS)
        assert err.value.status == 404


def test_events_through_the_core_api() -> None:
    with FakeKubeApiServer(resources=(EVENTS,)) as api, client.ApiClient(client.Configuration(host=api.url)) as c:
        core = client.CoreV1Api(c)
        event = client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name="rt."), type="Warning", reason="InvalidServingRuntime",
            message="spec.containers is required", involved_object=client.V1ObjectReference(
                api_version=f"{GROUP}/v1alpha1", kind="ServingRuntime", namespace=NS, name="rt"))
        created = core.create_namespaced_event(NS, event)
        assert created.metadata.name.startswith("rt.") and len(created.metadata.name) == len("rt.") + 5
        assert api.requests[-1].path == f"/api/v1/namespaces/{NS}/events"
        stored = api.objects(EVENTS)
        assert [(o["apiVersion"], o["kind"], o["reason"]) for o in stored] == [
            ("v1", "Event", "InvalidServingRuntime")]
        assert [e.reason for e in core.list_namespaced_event(NS).items] == ["InvalidServingRuntime"]
