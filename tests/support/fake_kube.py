"""A FAKE Kubernetes API server for custom resources (``Predictor``, ``InferenceService``,
``ServingRuntime``, ``ClusterServingRuntime``) and the two built-in ones the controller writes
(``StatefulSet``, ``Event``), for tests only.

Why a fake: no kube-apiserver (nor etcd-backed control plane such as kind or k3s) can be installed
on the machines these tests run on, yet the controller must be tested through the real client
library (the official ``kubernetes`` package) speaking the real REST paths and watch protocol.
This server implements just enough of the API server for that, in one process, on 127.0.0.1.

Which resources: those given as ``resources`` (:class:`Resource`: group, version, plural, kind,
CRD file, whether namespaced, whether with the status subresource), like CRDs installed in the
cluster. The default is :data:`PREDICTORS` alone (``serving.kserve.io/v1alpha1``, plural
``predictors``); ``FakeKubeApiServer(resources=(PREDICTORS, INFERENCE_SERVICES))`` adds
InferenceServices (``serving.kserve.io/v1beta1``, plural ``inferenceservices``). Also defined:
:data:`SERVING_RUNTIMES`, :data:`CLUSTER_SERVING_RUNTIMES` (cluster-scoped; neither has the status
subresource, as KServe's CRDs), and the built-in :data:`STATEFULSETS` (``apps/v1``, at
``/apis/apps/v1``, with the status subresource), :data:`EVENTS` (core ``v1``, at ``/api/v1``,
no status subresource, no schema), :data:`HPAS` (``autoscaling/v2`` HorizontalPodAutoscalers, a store
like StatefulSets) and :data:`NAMESPACES` (core ``v1``, cluster-scoped; a test
writes its labels and ``status.phase``). Built-in resources are served only as far as this page says
(no defaulting, no controllers: a StatefulSet runs no pods, its status is what a test writes). A
resource not served answers 404 on every path, as a cluster without its CRD does. All resources
share one revision counter, as etcd's is shared. For each resource ``R`` (``{base}`` =
``/apis/{group}/{version}``, or ``/api/{version}`` for the core group):

- ``GET {base}[/namespaces/{ns}]/R``: a ``<Kind>List`` whose ``metadata.resourceVersion`` is the
  global revision counter, as a string. A cluster-scoped resource has no ``namespaces/{ns}``
  segment in any path; its objects have no namespace (stored under ``""``).
- The same with ``watch=true|1``: newline-delimited JSON events (ADDED, MODIFIED, DELETED,
  BOOKMARK, ERROR) of that resource, in a chunked response. With ``resourceVersion=N`` it replays
  every change after N, then follows live changes; without one (or ``0``) it first sends an ADDED
  event per existing object. It ends after ``timeoutSeconds`` (capped by ``max_watch_s``), as real
  servers end watches. ``allowWatchBookmarks=true`` adds a BOOKMARK (only
  ``metadata.resourceVersion``) every ``bookmark_interval_s``. A version older than the compacted
  history gets one ERROR event with a 410 ``Expired`` Status, and the stream ends (what a real
  server does on an HTTP 200 watch).
- ``GET/POST/PUT/PATCH/DELETE`` on ``{base}/namespaces/{ns}/R[/{name}]``: POST sets uid,
  creationTimestamp, generation 1 and resourceVersion (a ``metadata.generateName`` without a
  name gets a random 5-character suffix); a spec change bumps generation (a change of labels or
  annotations does not, as for real objects; without the status subresource a status change
  does too, as for real custom resources); writes to the main resource ignore ``.status`` when
  the resource has the status subresource, and store it otherwise; PUT needs ``metadata.resourceVersion`` and a stale
  one is 409 Conflict; PATCH takes JSON merge patches (``application/merge-patch+json``; also
  plain ``application/json``), and honours a ``metadata.resourceVersion`` in the patch as a
  precondition. Errors are ``Status`` bodies with the real reasons (NotFound, AlreadyExists,
  Conflict, Invalid, BadRequest, Expired).
- ``{base}/namespaces/{ns}/R/{name}/status`` GET/PUT/PATCH: only ``.status`` changes;
  resourceVersion moves, generation does not. 404 for a resource without the status subresource.
- Schema validation (``validate=True``, the default): if the resource's CRD file exists
  (``deploy/crd/serving.kserve.io_<plural>.yaml``; built-in resources have none),
  every written object, status writes included, is checked against that version's
  ``openAPIV3Schema`` with ``jsonschema`` (422 ``Invalid`` when it fails); without the file
  anything is accepted. Unknown fields are accepted (the API server would prune them or, with
  strict field validation, refuse them; tests/unit/test_deploy.py checks the strict reading).
  InferenceServices, ServingRuntimes and ClusterServingRuntimes are also checked against KServe's
  own types (tests/support/kserve_types.py: KServe 0.12.0's SDK, field names and JSON types), so
  a field KServe does not define is refused even where our CRDs keep unknown fields.

What it does not: authentication and RBAC, built-in resources other than the two above (and
those only as stores: no defaulting, no pods, no garbage collection by owner references), API
discovery (``/apis``), JSON patch and server-side apply, field selectors and set-based label
selectors (``labelSelector`` takes comma-joined ``k=v``, ``k==v``, ``k!=v``, ``k``, ``!k``; on a
watch it filters events by the object's current labels, without the DELETED a real server sends
for an object leaving the selection), paginated lists (``limit``/``continue``), finalizers and
graceful deletion (DELETE removes at once), schema defaulting and pruning, the
``x-kubernetes-*`` schema extensions, protobuf encoding.

Test hooks: :meth:`compact` (forget history: older versions get 410), :meth:`end_watches` (close
open watch streams now), :meth:`hold_watches` (no watch runs inside the block), :meth:`fail_next`
(the next requests answer an error), :attr:`requests` (every request's method, path, query and
body), :meth:`objects` (a snapshot of the stored objects), and :meth:`put` / :meth:`delete` /
:meth:`get` to change and read objects without going through HTTP. Those take a ``resource``;
without one, :meth:`put` picks it by the object's ``apiVersion`` and ``kind`` and the others use
the first resource served (Predictors by default), so single-resource tests need not name it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.support import kserve_types

_CRD_DIR = Path(__file__).resolve().parents[2] / "deploy" / "crd"


@dataclass(frozen=True)
class Resource:
    """A resource as its CRD (or, for a built-in one, the API server) declares it."""

    group: str  # "" for the core group (Events)
    version: str
    plural: str
    kind: str
    crd_file: Path | None  # its CRD: the schema writes are validated against, if the file exists
    namespaced: bool = True
    status_subresource: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def prefix(self) -> str:
        return f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"


PREDICTORS = Resource("serving.kserve.io", "v1alpha1", "predictors", "Predictor",
                      _CRD_DIR / "serving.kserve.io_predictors.yaml")
INFERENCE_SERVICES = Resource("serving.kserve.io", "v1beta1", "inferenceservices", "InferenceService",
                              _CRD_DIR / "serving.kserve.io_inferenceservices.yaml")
SERVING_RUNTIMES = Resource("serving.kserve.io", "v1alpha1", "servingruntimes", "ServingRuntime",
                            _CRD_DIR / "serving.kserve.io_servingruntimes.yaml", status_subresource=False)
CLUSTER_SERVING_RUNTIMES = Resource("serving.kserve.io", "v1alpha1", "clusterservingruntimes",
                                    "ClusterServingRuntime", _CRD_DIR / "serving.kserve.io_clusterservingruntimes.yaml",
                                    namespaced=False, status_subresource=False)
INFERENCE_GRAPHS = Resource("serving.kserve.io", "v1alpha1", "inferencegraphs", "InferenceGraph",
                            _CRD_DIR / "serving.kserve.io_inferencegraphs.yaml")
STATEFULSETS = Resource("apps", "v1", "statefulsets", "StatefulSet", None)
HPAS = Resource("autoscaling", "v2", "horizontalpodautoscalers", "HorizontalPodAutoscaler", None)
EVENTS = Resource("", "v1", "events", "Event", None, status_subresource=False)
NAMESPACES = Resource("", "v1", "namespaces", "Namespace", None, namespaced=False, status_subresource=False)

# The Predictor resource's names, as before several resources were served.
GROUP = PREDICTORS.group
VERSION = PREDICTORS.version
PLURAL = PREDICTORS.plural
KIND = PREDICTORS.kind
API_VERSION = PREDICTORS.api_version
CRD_FILE = PREDICTORS.crd_file


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    body: Any = None  # the parsed JSON body of writes
    injected: int = 0  # the error code fail_next() made it answer, 0 if none


class ApiError(Exception):
    """Answered as a ``Status`` body with this HTTP code and reason."""

    def __init__(self, code: int, reason: str, message: str, name: str = "",
                 resource: Resource | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.name = code, reason, message, name
        self.resource = resource

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                "message": self.message, "reason": self.reason, "code": self.code}
        if self.name and self.resource is not None:
            body["details"] = {"name": self.name, "group": self.resource.group, "kind": self.resource.plural}
        return body


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _load_schema(resource: Resource, validate: bool) -> dict[str, Any] | None:
    if not validate or resource.crd_file is None or not resource.crd_file.exists():
        return None
    import yaml

    crd = yaml.safe_load(resource.crd_file.read_text())
    for version in crd["spec"]["versions"]:
        if version["name"] == resource.version:
            schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
            return schema
    return None


_NOT_FOUND = "the server could not find the requested resource"


class FakeKubeApiServer:
    """Start with :meth:`start` (or ``with FakeKubeApiServer() as api:``); :attr:`url` is its address."""

    def __init__(self, *, resources: tuple[Resource, ...] = (PREDICTORS,), validate: bool = True,
                 bookmark_interval_s: float = 1.0, max_watch_s: float = 60.0) -> None:
        if not resources or len({(r.group, r.version, r.plural) for r in resources}) != len(resources):
            raise ValueError("resources must be given, each once")
        self.resources = tuple(resources)
        self.bookmark_interval_s = bookmark_interval_s
        self.max_watch_s = max_watch_s
        self._schemas = {r: _load_schema(r, validate) for r in self.resources}
        self._cond = threading.Condition()
        self._rv = 1
        self._objects: dict[tuple[Resource, str, str], dict[str, Any]] = {}  # (resource, ns, name)
        self._history: list[tuple[int, str, Resource, dict[str, Any]]] = []  # (rv, event type, resource, object)
        self._oldest_rv = 1  # watches from an older version get 410 Gone
        self._watch_epoch = 0
        self._watches_held = False
        self._stopping = False
        self._failures: list[tuple[int, str, str]] = []  # (code, method, path suffix)
        self._requests: list[Request] = []
        self._sockets: set[socket.socket] = set()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- life cycle ---------------------------------------------------------------------------
    def start(self) -> FakeKubeApiServer:
        handler = type("Handler", (_Handler,), {"api": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-kube-apiserver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            sockets = list(self._sockets)
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        for sock in sockets:  # idle keep-alive connections and watches end now, not at exit
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> FakeKubeApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._httpd is not None, "not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    # --- test hooks ---------------------------------------------------------------------------
    def compact(self) -> None:
        """Forget the history: watches from any version before now get 410 Gone."""
        with self._cond:
            self._history.clear()
            self._oldest_rv = self._rv

    def end_watches(self) -> None:
        """Close every open watch stream (clients must resume or relist)."""
        with self._cond:
            self._watch_epoch += 1
            self._cond.notify_all()

    @contextlib.contextmanager
    def hold_watches(self) -> Iterator[None]:
        """Inside the block, open watches are ended and new ones wait (as in a network partition):
        changes made meanwhile reach watchers only when the block ends, or never if compacted."""
        with self._cond:
            self._watches_held = True
            self._watch_epoch += 1
            self._cond.notify_all()
        try:
            yield
        finally:
            with self._cond:
                self._watches_held = False
                self._cond.notify_all()

    def fail_next(self, n: int, code: int = 500, *, method: str = "", path_suffix: str = "") -> None:
        """The next ``n`` requests (watches included; only those with this method and path ending,
        when given) answer ``code`` with a Status body."""
        with self._cond:
            self._failures.extend([(code, method.upper(), path_suffix)] * n)

    @property
    def requests(self) -> list[Request]:
        with self._cond:
            return list(self._requests)

    def count(self, method: str, path_suffix: str = "", since: int = 0) -> int:
        """Requests with this method whose path ends with ``path_suffix``, from index ``since`` on."""
        return sum(1 for r in self.requests[since:] if r.method == method and r.path.endswith(path_suffix))

    def _served(self, resource: Resource | None) -> Resource:
        if resource is None:
            return self.resources[0]
        if resource not in self.resources:
            raise ValueError(f"{resource.plural}.{resource.group}/{resource.version} is not served here")
        return resource

    def resource_of(self, obj: dict[str, Any]) -> Resource:
        """The served resource an object's ``apiVersion`` and ``kind`` name (the first resource if
        it names none)."""
        api_version, kind = obj.get("apiVersion"), obj.get("kind")
        if api_version is None and kind is None:
            return self.resources[0]
        for r in self.resources:
            if (api_version, kind) == (r.api_version, r.kind):
                return r
        raise ValueError(f"{kind} {api_version} is not served here")

    def objects(self, resource: Resource | None = None) -> list[dict[str, Any]]:
        """The stored objects of ``resource`` (default: the first served), by namespace and name."""
        r = self._served(resource)
        with self._cond:
            return [copy.deepcopy(o) for (res, ns, name), o in sorted(self._objects.items(), key=_order)
                    if res == r]

    def get(self, namespace: str, name: str, resource: Resource | None = None) -> dict[str, Any] | None:
        """The stored object (``namespace`` "" for a cluster-scoped resource), or None."""
        with self._cond:
            obj = self._objects.get((self._served(resource), namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    @property
    def resource_version(self) -> int:
        with self._cond:
            return self._rv

    def put(self, obj: dict[str, Any], resource: Resource | None = None) -> dict[str, Any]:
        """Create or replace (unconditionally) an object, as if a user applied it; its resource is
        ``resource``, else the one its ``apiVersion`` and ``kind`` name."""
        r = self._served(resource) if resource is not None else self.resource_of(obj)
        meta = obj.get("metadata", {})
        ns, name = meta.get("namespace", "default") if r.namespaced else "", meta["name"]
        with self._cond:
            current = self._objects.get((r, ns, name))
            if current is None:
                return self._create(r, ns, obj)
            body = copy.deepcopy(obj)
            body.setdefault("metadata", {})["resourceVersion"] = current["metadata"]["resourceVersion"]
            return self._replace(r, ns, name, body, status_only=False)

    def delete(self, namespace: str, name: str, resource: Resource | None = None) -> None:
        r = self._served(resource)
        with self._cond:
            self._delete(r, namespace, name)

    # --- store (called with the lock held) ----------------------------------------------------
    def _record(self, kind: str, resource: Resource, obj: dict[str, Any]) -> None:
        self._history.append((self._rv, kind, resource, copy.deepcopy(obj)))
        self._cond.notify_all()

    def _bump(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _validate(self, r: Resource, obj: dict[str, Any]) -> None:
        schema = self._schemas[r]
        if schema is None:
            return
        if r.group == "serving.kserve.io" and r.kind in kserve_types.KINDS:
            problems = kserve_types.validator_for(r.kind)(obj)
            if problems:
                name = obj.get("metadata", {}).get("name", "")
                raise ApiError(422, "Invalid", f'{r.kind}.{r.group} "{name}" is invalid against KServe\'s '
                               f'types: {"; ".join(problems)}', name, r)
        import jsonschema

        errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(obj), key=lambda e: list(e.path))
        if errors:
            name = obj.get("metadata", {}).get("name", "")
            causes = "; ".join(f"{'.'.join(str(p) for p in e.path) or '<root>'}: {e.message}" for e in errors)
            raise ApiError(422, "Invalid", f'{r.kind}.{r.group} "{name}" is invalid: {causes}', name, r)

    def _create(self, r: Resource, ns: str, body: dict[str, Any]) -> dict[str, Any]:
        meta = body.get("metadata") or {}
        name = meta.get("name") or (meta.get("generateName") and meta["generateName"] + uuid.uuid4().hex[:5])
        if not name:
            raise ApiError(422, "Invalid", f"{r.kind}.{r.group} is invalid: metadata.name: Required value")
        if r.namespaced and meta.get("namespace", ns) != ns:
            raise ApiError(400, "BadRequest", "the namespace of the provided object does not match "
                                              "the namespace sent on the request")
        if (r, ns, name) in self._objects:
            raise ApiError(409, "AlreadyExists", f'{r.plural}.{r.group} "{name}" already exists', name, r)
        obj = copy.deepcopy(body)
        obj["apiVersion"], obj["kind"] = r.api_version, r.kind
        if r.status_subresource:
            obj.pop("status", None)  # status is written through the subresource only
        keep = {k: v for k, v in meta.items() if k in ("labels", "annotations", "ownerReferences", "generateName")}
        where = {"namespace": ns} if r.namespaced else {}  # cluster-scoped objects have none
        obj["metadata"] = {**keep, "name": name, **where, "uid": str(uuid.uuid4()), "generation": 1,
                           "creationTimestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
        self._validate(r, obj)
        obj["metadata"]["resourceVersion"] = self._bump()
        self._objects[(r, ns, name)] = obj
        self._record("ADDED", r, obj)
        return obj

    def _existing(self, r: Resource, ns: str, name: str) -> dict[str, Any]:
        obj = self._objects.get((r, ns, name))
        if obj is None:
            raise ApiError(404, "NotFound", f'{r.plural}.{r.group} "{name}" not found', name, r)
        return obj

    def _replace(self, r: Resource, ns: str, name: str, body: dict[str, Any], *,
                 status_only: bool) -> dict[str, Any]:
        current = self._existing(r, ns, name)
        wanted = (body.get("metadata") or {}).get("resourceVersion")
        if not wanted:
            raise ApiError(422, "Invalid", f'{r.kind}.{r.group} "{name}" is invalid: metadata.resourceVersion: '
                                           "Invalid value: 0x0: must be specified for an update", name, r)
        return self._update(r, current, body, status_only=status_only, expected_rv=str(wanted))

    def _update(self, r: Resource, current: dict[str, Any], body: dict[str, Any], *, status_only: bool,
                expected_rv: str | None) -> dict[str, Any]:
        name = current["metadata"]["name"]
        if expected_rv is not None and expected_rv != current["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {r.plural}.{r.group} "{name}": the '
                                            "object has been modified; please apply your changes to the latest "
                                            "version and try again", name, r)
        obj = copy.deepcopy(current)
        ns = current["metadata"].get("namespace", "")
        if status_only:
            if "status" in body and body["status"] is not None:
                obj["status"] = copy.deepcopy(body["status"])
            else:
                obj.pop("status", None)
        else:
            if "spec" in body:
                obj["spec"] = copy.deepcopy(body["spec"])
            else:
                obj.pop("spec", None)
            if not r.status_subresource:  # .status is part of the object
                if body.get("status") is not None:
                    obj["status"] = copy.deepcopy(body["status"])
                else:
                    obj.pop("status", None)
            meta = body.get("metadata") or {}
            for key in ("labels", "annotations", "ownerReferences"):
                if key in meta and meta[key] is not None:
                    obj["metadata"][key] = copy.deepcopy(meta[key])
                else:
                    obj["metadata"].pop(key, None)
            changed = obj.get("spec") != current.get("spec") or (
                not r.status_subresource and obj.get("status") != current.get("status"))
            if changed:
                obj["metadata"]["generation"] = current["metadata"]["generation"] + 1
        if obj == current:
            return obj  # a no-op write changes nothing, not even the resourceVersion (as etcd)
        self._validate(r, obj)
        obj["metadata"]["resourceVersion"] = self._bump()
        self._objects[(r, ns, name)] = obj
        self._record("MODIFIED", r, obj)
        return obj

    def _patch(self, r: Resource, ns: str, name: str, patch: Any, *, status_only: bool) -> dict[str, Any]:
        current = self._existing(r, ns, name)
        if not isinstance(patch, dict):
            raise ApiError(400, "BadRequest", "a merge patch must be a JSON object", name, r)
        expected = (patch.get("metadata") or {}).get("resourceVersion")
        merged = merge_patch(current, patch)
        return self._update(r, current, merged, status_only=status_only,
                            expected_rv=str(expected) if expected else None)

    def _delete(self, r: Resource, ns: str, name: str) -> dict[str, Any]:
        obj = copy.deepcopy(self._existing(r, ns, name))
        del self._objects[(r, ns, name)]
        obj["metadata"]["resourceVersion"] = self._bump()
        self._record("DELETED", r, obj)
        return obj

    def _list(self, r: Resource, ns: str | None, selector: str = "") -> dict[str, Any]:
        items = [copy.deepcopy(o) for (res, n, _), o in sorted(self._objects.items(), key=_order)
                 if res == r and (ns is None or n == ns) and _selects(selector, o)]
        return {"apiVersion": r.api_version, "kind": f"{r.kind}List",
                "metadata": {"resourceVersion": str(self._rv)}, "items": items}

    # --- watch ----------------------------------------------------------------------------------
    def _watch(self, r: Resource, ns: str | None, query: dict[str, str]) -> Iterator[dict[str, Any]]:
        """Events of one resource for one watch request; ends on timeout, end_watches(), stop() or 410."""
        timeout = min(float(query.get("timeoutSeconds") or self.max_watch_s), self.max_watch_s)
        bookmarks = query.get("allowWatchBookmarks", "").lower() in ("true", "1")
        start = time.monotonic()
        deadline = start + timeout
        next_bookmark = start + self.bookmark_interval_s
        rv_text = query.get("resourceVersion", "")
        selector = query.get("labelSelector", "")
        with self._cond:
            while self._watches_held and not self._stopping:
                self._cond.wait(0.1)
            epoch = self._watch_epoch
            if rv_text in ("", "0"):
                backlog = [{"type": "ADDED", "object": o} for o in self._list(r, ns, selector)["items"]]
                sent = self._rv
            else:
                try:
                    sent = int(rv_text)
                except ValueError:
                    backlog = [_error(400, "BadRequest", f"invalid resource version: {rv_text!r}")]
                    sent = -1
                else:
                    backlog = []
                    if sent < self._oldest_rv:
                        backlog = [_error(410, "Expired", f"too old resource version: {sent} ({self._oldest_rv})")]
                        sent = -1
        yield from backlog
        if sent < 0:
            return
        while True:
            expired = ""
            with self._cond:
                while True:
                    if self._stopping or self._watch_epoch != epoch:
                        return
                    if sent < self._oldest_rv:  # compacted before this watch was sent what it missed
                        expired = f"too old resource version: {sent} ({self._oldest_rv})"
                        break
                    events = [(kind, o) for rv, kind, res, o in self._history if rv > sent and res == r
                              and (ns is None or o["metadata"].get("namespace", "") == ns)
                              and _selects(selector, o)]
                    sent = self._rv  # every change in scope up to now is in ``events``
                    now = time.monotonic()
                    if events or now >= deadline or (bookmarks and now >= next_bookmark):
                        break
                    wake = min(deadline, next_bookmark) if bookmarks else deadline
                    self._cond.wait(max(0.0, wake - now))
            if expired:
                yield _error(410, "Expired", expired)
                return
            for kind, obj in events:
                yield {"type": kind, "object": obj}
            now = time.monotonic()
            if now >= deadline:
                return
            if bookmarks and now >= next_bookmark:
                next_bookmark = now + self.bookmark_interval_s
                yield {"type": "BOOKMARK", "object": {"kind": r.kind, "apiVersion": r.api_version,
                                                      "metadata": {"resourceVersion": str(sent)}}}


def _selects(selector: str, obj: dict[str, Any]) -> bool:
    """Whether the object's labels match an equality-based label selector ("" matches all)."""
    labels = obj.get("metadata", {}).get("labels") or {}
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = (x.strip() for x in term.split("!=", 1))
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = (x.strip() for x in term.replace("==", "=").split("=", 1))
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term not in labels:
            return False
    return True


def _order(item: tuple[tuple[Resource, str, str], dict[str, Any]]) -> tuple[str, str, str]:
    (r, ns, name), _ = item
    return r.plural, ns, name


def _error(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {},
                                        "status": "Failure", "reason": reason, "code": code, "message": message}}


class _Handler(BaseHTTPRequestHandler):
    api: FakeKubeApiServer
    protocol_version = "HTTP/1.1"
    timeout = 30  # an idle keep-alive connection is closed after this

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read the request log instead
        pass

    def setup(self) -> None:
        super().setup()
        with self.api._cond:
            self.api._sockets.add(self.connection)

    def finish(self) -> None:
        with self.api._cond:
            self.api._sockets.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_PATCH(self) -> None:
        self._serve("PATCH")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def _send(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not raw:
            return None
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ApiError(400, "BadRequest", f"the request body is not JSON: {exc}") from None

    def _serve(self, method: str) -> None:
        api = self.api
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        try:
            body = self._body()  # read even when unused (a DELETE's options): the connection is kept alive
        except ApiError as exc:
            self._send(exc.code, exc.status())
            return
        with api._cond:
            failure = None
            for i, (code, only_method, suffix) in enumerate(api._failures):
                if (not only_method or only_method == method) and parts.path.endswith(suffix):
                    failure = code
                    del api._failures[i]
                    break
            api._requests.append(Request(method, parts.path, query, body, failure or 0))
        try:
            if failure is not None:
                raise ApiError(failure, "InternalError" if failure >= 500 else "BadRequest",
                               f"injected failure {failure}")
            resource, ns, name, sub = self._route(parts.path)
            if method == "GET" and name is None and query.get("watch", "").lower() in ("true", "1"):
                self._stream(api._watch(resource, ns, query))
                return
            code, result = self._dispatch(method, resource, ns, name, sub, body, query)
        except ApiError as exc:
            code, result = exc.code, exc.status()
        self._send(code, result)

    def _route(self, path: str) -> tuple[Resource, str | None, str | None, str | None]:
        """(resource, namespace or None for all, name or None for the collection, subresource or None);
        the namespace of a cluster-scoped resource is ""."""
        for r in self.api.resources:
            if not path.startswith(r.prefix + "/"):
                continue
            parts = path[len(r.prefix) + 1:].strip("/").split("/")
            if parts == [r.plural] and r.namespaced:
                return r, None, None, None
            ns = ""
            if r.namespaced:
                if len(parts) < 3 or parts[0] != "namespaces":
                    continue
                ns, parts = parts[1], parts[2:]
            if parts[0] != r.plural or len(parts) > 3:
                continue
            name = parts[1] if len(parts) >= 2 else None
            sub = parts[2] if len(parts) == 3 else None
            if sub is not None and (sub != "status" or not r.status_subresource):
                raise ApiError(404, "NotFound", _NOT_FOUND)
            return r, ns, name, sub
        raise ApiError(404, "NotFound", _NOT_FOUND)

    def _dispatch(self, method: str, r: Resource, ns: str | None, name: str | None, sub: str | None,
                  body: Any, query: dict[str, str]) -> tuple[int, dict[str, Any]]:
        api = self.api
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip()
        with api._cond:
            if name is None:
                if method == "GET":
                    return 200, api._list(r, ns, query.get("labelSelector", ""))
                if method == "POST" and ns is not None:
                    if not isinstance(body, dict):
                        raise ApiError(400, "BadRequest", "the request body must be an object")
                    return 201, api._create(r, ns, body)
                raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on the collection")
            assert ns is not None
            if method == "GET":
                return 200, copy.deepcopy(api._existing(r, ns, name))
            if method == "DELETE" and sub is None:
                return 200, api._delete(r, ns, name)
            if method == "PUT":
                if not isinstance(body, dict):
                    raise ApiError(400, "BadRequest", "the request body must be an object")
                return 200, copy.deepcopy(api._replace(r, ns, name, body, status_only=sub == "status"))
            if method == "PATCH":
                if content_type not in ("application/merge-patch+json", "application/json"):
                    raise ApiError(415, "UnsupportedMediaType",
                                   f"the fake API server takes merge patches only, not {content_type!r}")
                return 200, copy.deepcopy(api._patch(r, ns, name, body, status_only=sub == "status"))
        raise ApiError(405, "MethodNotAllowed", f"{method} is not supported here")

    def _stream(self, events: Iterator[dict[str, Any]]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        # the connection stays open after a watch that ended cleanly, as a real API server's does:
        # a client pools it, and closing it here made the next request on it (a POST, which is not
        # retried) meet a closed socket
        try:
            for event in events:
                line = json.dumps(event).encode() + b"\n"
                self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            pass  # the client went away


__all__ = ["API_VERSION", "CLUSTER_SERVING_RUNTIMES", "CRD_FILE", "EVENTS", "GROUP", "HPAS", "INFERENCE_GRAPHS",
           "INFERENCE_SERVICES", "KIND", "NAMESPACES",
           "PLURAL", "PREDICTORS", "SERVING_RUNTIMES", "STATEFULSETS", "VERSION", "FakeKubeApiServer", "Request",
           "Resource", "merge_patch"]
