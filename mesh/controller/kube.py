"""The Kubernetes side of the controller: the only module that imports ``kubernetes``.

The official client is synchronous, so the watch runs in a thread of its own (:class:`PredictorWatcher`)
and hands events to the event loop through a callback (``loop.call_soon_threadsafe``); the few
other calls (status patches) run in worker threads (``asyncio.to_thread``).

The watch is the usual list-then-watch: list (which gives the collection's resourceVersion), hand
the whole list over as one SYNC event (the controller compares it with what it knew, so deletions
missed while not watching are noticed), then watch from that version with bookmarks, so that a
resumed watch starts from a recent version even when nothing changed. Watches end by design (the
server's timeout, ``watch_timeout_s``, or a dropped connection): the next one resumes from the last
version seen. A version too old for the server (410 Gone, as an ERROR event or an HTTP status)
means events were lost: relist. Any other failure is retried after an exponential back-off capped
at ``backoff_max_s``, logged once per failure, never fatal: the API server being away for a while
is normal. ``stop()`` ends the thread within a second or so: it sets a flag and shuts down the open
watch's socket (``Watch.stop``).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog
import urllib3
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from mesh.controller.events import WatchEvent
from mesh.controller.queue import Backoff
from mesh.errors import InvalidArgument, Unavailable
from mesh.settings import ControllerSettings

log = structlog.get_logger(__name__)

GROUP = "serving.kserve.io"
VERSION = "v1alpha1"
PLURAL = "predictors"
ISVC_VERSION = "v1beta1"
ISVC_PLURAL = "inferenceservices"
SR_PLURAL = "servingruntimes"
CSR_PLURAL = "clusterservingruntimes"
IG_PLURAL = "inferencegraphs"
_CALL_TIMEOUT = (5.0, 30.0)  # (connect, read) seconds of one ordinary API call


class KubeConfigError(InvalidArgument):
    """The Kubernetes client configuration cannot be loaded (a start-up error, exit code 2)."""


class KubeApiError(Unavailable):
    """The API server failed a call or could not be reached (retried with back-off)."""


class Gone(Exception):
    """The watch's resourceVersion is too old (410): relist."""


def api_client(settings: ControllerSettings) -> client.ApiClient:
    """A client configured from, in this order: ``api_server`` (no authentication), an explicit
    ``kubeconfig``, the in-cluster service account (``KUBERNETES_SERVICE_HOST`` set), the default
    kubeconfig (``KUBECONFIG`` or ``~/.kube/config``)."""
    conf = client.Configuration()
    if settings.api_server:
        source = f"api_server {settings.api_server}"
        conf.host = settings.api_server.rstrip("/")
    else:
        try:
            # The loaders are unannotated in kubernetes.
            if settings.kubeconfig:
                source = f"kubeconfig {settings.kubeconfig}"
                config.load_kube_config(  # type: ignore[no-untyped-call]
                    config_file=settings.kubeconfig, client_configuration=conf)
            elif os.environ.get("KUBERNETES_SERVICE_HOST"):
                source = "in-cluster service account"
                config.load_incluster_config(client_configuration=conf)  # type: ignore[no-untyped-call]
            else:
                source = "default kubeconfig"
                config.load_kube_config(client_configuration=conf)  # type: ignore[no-untyped-call]
        except Exception as exc:  # the loaders raise many kinds (ConfigException, OSError, YAML errors...)
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise KubeConfigError(f"cannot load the Kubernetes configuration ({source}): {first}") from None
    return client.ApiClient(conf)


class PredictorApi:
    """Blocking calls on Predictors (or, with ``version``/``plural``, InferenceServices and
    ServingRuntimes) in one namespace ("" = all namespaces), or on a cluster-scoped resource
    (``cluster``: ClusterServingRuntimes); run them in threads."""

    def __init__(self, api_client: client.ApiClient, namespace: str = "", *, version: str = VERSION,
                 plural: str = PLURAL, cluster: bool = False) -> None:
        self._client = api_client
        self._api = client.CustomObjectsApi(api_client)
        self.namespace = "" if cluster else namespace
        self.version = version
        self.plural = plural
        self.cluster = cluster

    @property
    def host(self) -> str:
        return str(self._client.configuration.host)

    def _list_call(self, **kwargs: Any) -> Any:
        if self.cluster:
            return self._api.list_cluster_custom_object(GROUP, self.version, self.plural, **kwargs)
        if self.namespace:
            return self._api.list_namespaced_custom_object(GROUP, self.version, self.namespace, self.plural, **kwargs)
        return self._api.list_custom_object_for_all_namespaces(GROUP, self.version, self.plural, **kwargs)

    def list(self) -> tuple[list[dict[str, Any]], str]:
        """Every Predictor, and the collection's resourceVersion to watch from."""
        result = self._list_call(_request_timeout=_CALL_TIMEOUT)
        return list(result.get("items") or []), str(result["metadata"]["resourceVersion"])

    def watch(self, w: watch.Watch, resource_version: str, timeout_s: int) -> Any:
        """The events of one watch request (a generator); raises :class:`Gone` on 410."""
        return _watch_stream(w, self._list_call, resource_version, timeout_s)

    def patch_status(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any] | None:
        """Merge-patch the status subresource; None if the Predictor is gone."""
        try:
            result = self._api.patch_namespaced_custom_object_status(
                GROUP, self.version, namespace, self.plural, name, patch, _request_timeout=_CALL_TIMEOUT)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise KubeApiError(f"status of {namespace}/{name}: the API server answered {exc.status} "
                               f"{exc.reason}: {_message(exc)}") from None
        except urllib3.exceptions.HTTPError as exc:
            raise KubeApiError(f"status of {namespace}/{name}: API server {self.host} unreachable: {exc}") from None
        return result if isinstance(result, dict) else None

    def close(self) -> None:
        self._client.close()  # type: ignore[no-untyped-call]  # unannotated in kubernetes


class NamespaceApi:
    """Blocking list and watch of Namespaces (for ``controller.namespace_label``), in the shape
    :class:`PredictorWatcher` takes."""

    plural = "namespaces"

    def __init__(self, api_client: client.ApiClient) -> None:
        self._client = api_client
        self._api = client.CoreV1Api(api_client)

    @property
    def host(self) -> str:
        return str(self._client.configuration.host)

    def list(self) -> tuple[list[dict[str, Any]], str]:
        result: Any = self._api.list_namespace(_request_timeout=_CALL_TIMEOUT, _preload_content=False)
        body = json.loads(result.data)  # the raw response: plain dicts, as the custom objects' lists
        return list(body.get("items") or []), str(body["metadata"]["resourceVersion"])

    def watch(self, w: watch.Watch, resource_version: str, timeout_s: int) -> Any:
        return _watch_stream(w, self._api.list_namespace, resource_version, timeout_s)


def _watch_stream(w: watch.Watch, list_call: Callable[..., Any], resource_version: str, timeout_s: int) -> Any:
    """The events of one watch request of ``list_call`` from ``resource_version`` (a generator,
    bookmarks on); raises :class:`Gone` on 410."""
    stream = w.stream(  # type: ignore[no-untyped-call]  # unannotated in kubernetes
        list_call, resource_version=resource_version, allow_watch_bookmarks=True,
        timeout_seconds=timeout_s, _request_timeout=(_CALL_TIMEOUT[0], timeout_s + 30.0))
    try:
        yield from stream
    except ApiException as exc:
        if exc.status == 410:
            raise Gone(str(exc.reason)) from None
        raise


def _message(exc: ApiException) -> str:
    """The message of the Status body, if the error has one."""
    try:
        return str(json.loads(exc.body or "{}").get("message") or "")
    except (ValueError, AttributeError):
        return ""


def _describe(exc: Exception) -> str:
    if isinstance(exc, ApiException):
        return f"the API server answered {exc.status} {exc.reason}: {_message(exc)}"
    return (f"{type(exc).__name__}: {exc}".splitlines() or [""])[0]


class PredictorWatcher:
    """A thread that lists and watches Predictors forever and delivers :class:`WatchEvent` s."""

    def __init__(self, api: PredictorApi | NamespaceApi, deliver: Callable[[WatchEvent], None], *,
                 timeout_s: int = 300,
                 backoff_max_s: float = 30.0) -> None:
        self.api = api
        self.deliver = deliver
        self.timeout_s = max(1, int(timeout_s))
        self.backoff = Backoff(0.5, backoff_max_s)
        self._stopped = threading.Event()
        # reused: each stream() is one watch request
        self._watch = watch.Watch()  # type: ignore[no-untyped-call]  # unannotated in kubernetes
        self._thread = threading.Thread(target=self._run, name="predictor-watch", daemon=True)
        self.relists = 0  # how many lists since start (1 + recoveries from 410 or errors)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stopped.set()
        deadline = time.monotonic() + timeout_s
        while self._thread.is_alive() and time.monotonic() < deadline:
            # shuts the open watch's socket down (again, if one started meanwhile)
            self._watch.stop()  # type: ignore[no-untyped-call]  # unannotated in kubernetes
            self._thread.join(0.1)

    def _run(self) -> None:
        version: str | None = None
        missing = False  # the resource type is not installed (its CRD): told once, listed again later
        while not self._stopped.is_set():
            try:
                if version is None:
                    items, version = self.api.list()
                    self.relists += 1
                    missing = False
                    self.deliver(WatchEvent("SYNC", objects=items))
                version = self._watch_once(version)
                self.backoff.reset()
            except Gone as exc:
                log.info("watch version expired; listing again", reason=str(exc))
                version = None
            except ApiException as exc:
                if self._stopped.is_set():
                    break
                if exc.status == 403 and version is None and self.relists:
                    # Listed before, refused now (RBAC being changed?): keep what was known rather
                    # than report every object gone (a managed runtime's pods would be deleted).
                    self._retry(exc)
                    continue
                if exc.status in (403, 404) and version is None:
                    # No such resource type on this cluster (InferenceServices without KServe's or
                    # our CRD), or no permission to read it (a Role without ServingRuntimes): none
                    # can be read, so the controller is in sync with an empty list; it lists again,
                    # slowly, and picks them up once the CRD (or the permission) is there.
                    if not missing:
                        why = ("not served by this API server (no CRD)" if exc.status == 404
                               else "not readable: the controller's RBAC does not grant list/watch")
                        log.warning(f"{self.api.plural} are {why}; checking again every backoff_max_s",
                                    api_server=self.api.host)
                        self.deliver(WatchEvent("SYNC", objects=[]))
                        missing = True
                    self._stopped.wait(self.backoff.cap)
                    continue
                self._retry(exc)
            except Exception as exc:
                if self._stopped.is_set():
                    break
                self._retry(exc)

    def _retry(self, exc: Exception) -> None:
        delay = self.backoff.next()
        log.warning(f"{self.api.plural} list/watch failed; retrying", error=_describe(exc), retry_in_s=delay,
                    api_server=self.api.host)
        # Resume from the last version seen (a 410 then says whether events were lost).
        self._stopped.wait(delay)

    def _watch_once(self, version: str) -> str:
        """One watch request, to its end; the last version seen (BOOKMARKs included)."""
        for event in self.api.watch(self._watch, version, self.timeout_s):
            if self._stopped.is_set():
                break
            kind = event.get("type")
            obj = event.get("raw_object") or {}
            seen = (obj.get("metadata") or {}).get("resourceVersion")
            if seen:
                version = str(seen)
            if kind in ("ADDED", "MODIFIED", "DELETED"):
                self.deliver(WatchEvent(kind, object=obj))
        return version


class Refused(KubeApiError):
    """The API server refused a write as written: 409 (exists, or changed meanwhile) or 422 (invalid,
    or a field it does not change in place); ``status`` says which."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _write_call(what: str, host: str, call: Callable[[], Any], *, missing_ok: bool = False) -> Any:
    """``call()``, its failures as :class:`Refused` or :class:`KubeApiError`; None on 404 if ``missing_ok``."""
    try:
        return call()
    except ApiException as exc:
        if exc.status == 404 and missing_ok:
            return None
        if exc.status in (409, 422):
            raise Refused(f"{what}: {_describe(exc)}", exc.status) from None
        raise KubeApiError(f"{what}: {_describe(exc)}") from None
    except urllib3.exceptions.HTTPError as exc:
        raise KubeApiError(f"{what}: API server {host} unreachable: {exc}") from None


class WorkloadApi:
    """Blocking calls on the StatefulSets of one namespace that carry the label ``selector`` (the
    controller's own: mesh.controller.workloads); bodies and results are plain dicts. A StatefulSet
    already gone is no error for scale and delete (the next list says so); replace of one gone is."""

    def __init__(self, api_client: client.ApiClient, namespace: str, selector: str) -> None:
        self._client = api_client
        self._apps = client.AppsV1Api(api_client)
        self.namespace = namespace
        self.selector = selector

    @property
    def host(self) -> str:
        return str(self._client.configuration.host)

    def list(self) -> list[dict[str, Any]]:
        result: Any = _write_call(f"list StatefulSets in {self.namespace}", self.host,
                                  lambda: self._apps.list_namespaced_stateful_set(
                                      self.namespace, label_selector=self.selector, _preload_content=False,
                                      _request_timeout=_CALL_TIMEOUT))
        return list(json.loads(result.data).get("items") or [])  # the raw response: plain dicts, as written

    def create(self, body: dict[str, Any]) -> None:
        sts = client.V1StatefulSet.from_dict(body)
        assert sts is not None
        _write_call(f"create StatefulSet {self.namespace}/{body['metadata']['name']}", self.host,
                    lambda: self._apps.create_namespaced_stateful_set(self.namespace, sts,
                                                                      _request_timeout=_CALL_TIMEOUT))

    def replace(self, name: str, body: dict[str, Any]) -> None:
        """PUT: ``body.metadata.resourceVersion`` is the precondition (409 if it changed)."""
        sts = client.V1StatefulSet.from_dict(body)
        assert sts is not None
        _write_call(f"replace StatefulSet {self.namespace}/{name}", self.host,
                    lambda: self._apps.replace_namespaced_stateful_set(name, self.namespace, sts,
                                                                       _request_timeout=_CALL_TIMEOUT))

    def scale(self, name: str, replicas: int) -> None:
        # A merge patch: the client's default for a dict would be a JSON patch, which needs a list.
        _write_call(f"scale StatefulSet {self.namespace}/{name}", self.host,
                    lambda: self._apps.patch_namespaced_stateful_set(
                        name, self.namespace, {"spec": {"replicas": replicas}},
                        _content_type="application/merge-patch+json", _request_timeout=_CALL_TIMEOUT),
                    missing_ok=True)

    def delete(self, name: str, uid: str = "") -> None:
        """Delete (its pods after it, in the background); with ``uid``, only that very object."""
        options = client.V1DeleteOptions(propagation_policy="Background",
                                          preconditions=client.V1Preconditions(uid=uid) if uid else None)
        _write_call(f"delete StatefulSet {self.namespace}/{name}", self.host,
                    lambda: self._apps.delete_namespaced_stateful_set(
                        name, self.namespace, body=options, _request_timeout=_CALL_TIMEOUT), missing_ok=True)


class EventApi:
    """Records core/v1 Events (a plain dict each)."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self._client = api_client
        self._core = client.CoreV1Api(api_client)

    def create(self, namespace: str, body: dict[str, Any]) -> None:
        event = client.CoreV1Event.from_dict(body)
        assert event is not None
        _write_call(f"create Event in {namespace}", str(self._client.configuration.host),
                    lambda: self._core.create_namespaced_event(namespace, event, _request_timeout=_CALL_TIMEOUT))


class HpaApi:
    """Blocking calls on the HorizontalPodAutoscalers (``autoscaling/v2``) of one namespace that carry
    the label ``selector``, as :class:`WorkloadApi` on StatefulSets: plain dicts, an HPA already gone
    is no error for delete."""

    def __init__(self, api_client: client.ApiClient, namespace: str, selector: str) -> None:
        self._autoscaling = client.AutoscalingV2Api(api_client)
        self.host = str(api_client.configuration.host)  # for messages
        self.namespace, self.selector = namespace, selector

    def list(self) -> list[dict[str, Any]]:
        result: Any = _write_call(
            f"list HorizontalPodAutoscalers in {self.namespace}", self.host,
            lambda: self._autoscaling.list_namespaced_horizontal_pod_autoscaler(
                self.namespace, label_selector=self.selector, _preload_content=False, _request_timeout=_CALL_TIMEOUT))
        return list(json.loads(result.data).get("items") or [])  # plain dicts, as WorkloadApi's

    def create(self, body: dict[str, Any]) -> None:
        hpa = client.V2HorizontalPodAutoscaler.from_dict(body)
        assert hpa is not None
        _write_call(f"create HorizontalPodAutoscaler {self.namespace}/{body['metadata']['name']}", self.host,
                    lambda: self._autoscaling.create_namespaced_horizontal_pod_autoscaler(
                        self.namespace, hpa, _request_timeout=_CALL_TIMEOUT))

    def replace(self, name: str, body: dict[str, Any]) -> None:
        """PUT: ``body.metadata.resourceVersion`` is the precondition (409 if it changed)."""
        hpa = client.V2HorizontalPodAutoscaler.from_dict(body)
        assert hpa is not None
        _write_call(f"replace HorizontalPodAutoscaler {self.namespace}/{name}", self.host,
                    lambda: self._autoscaling.replace_namespaced_horizontal_pod_autoscaler(
                        name, self.namespace, hpa, _request_timeout=_CALL_TIMEOUT))

    def delete(self, name: str, uid: str = "") -> None:
        """With ``uid``, only that very object."""
        options = client.V1DeleteOptions(preconditions=client.V1Preconditions(uid=uid) if uid else None)
        _write_call(f"delete HorizontalPodAutoscaler {self.namespace}/{name}", self.host,
                    lambda: self._autoscaling.delete_namespaced_horizontal_pod_autoscaler(
                        name, self.namespace, body=options, _request_timeout=_CALL_TIMEOUT), missing_ok=True)


__all__ = ["CSR_PLURAL", "GROUP", "IG_PLURAL", "PLURAL", "SR_PLURAL", "VERSION", "EventApi", "Gone", "HpaApi",
           "KubeConfigError", "NamespaceApi", "PredictorApi", "PredictorWatcher", "Refused", "WatchEvent",
           "WorkloadApi", "api_client"]
