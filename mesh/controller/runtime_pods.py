"""The objects that run a ServingRuntime (:mod:`mesh.controller.workloads` keeps them): its
StatefulSet, its HorizontalPodAutoscaler, the Warning Event about it. Pure: no I/O.

**The pod** is deploy/base/runtime.yaml's (security context, probes on the health port 8086, the
``mesh-config`` ConfigMap, the ``mesh-runtime-tls`` certificate, the optional ``storage-config``
Secret, the models, storage-cache and tmp volumes) with ``MESH_RUNTIME_LABELS=rt:<ref>`` and
``MESH_RUNTIME_SUPPORTED_TYPES`` = the runtime's types, and per ``server_type``:

- ``mesh``: one container, the runtime's container ``mesh`` (its image, else
  ``controller.runtime_image``; its resources, env and volume mounts) running ``mesh serve runtime``.
- ``mlserver``, ``triton``: the runtime's containers as written, the server's completed with the
  shared volumes, and a container ``mesh-runtime`` (``controller.runtime_image``) driving the
  server on ``127.0.0.1:<runtimeManagementPort>`` through a repository in the ``models`` volume
  (``/models/_mlserver_models`` or ``/models/_triton_models``, modelmesh-serving's adapters'
  places, or the directory the container names: ``MLSERVER_MODELS_DIR``, ``--model-repository``).
- ``spi``: the runtime's containers and ``mesh-runtime`` with ``MESH_RUNTIME_SERVER=spi`` on
  ``grpcEndpoint``'s port.

Server containers also mount the storage cache (read-only) and the models volume, so they read
the files the mesh runtime pulled. The runtime's ``volumes`` are added to the pod (names of ours
are refused); each PersistentVolumeClaim among them is also mounted read-only at
``/pvc_mounts/<claim>`` (storage.pvc_mounts_dir, as deploy/storage-pvc does) in the mesh runtime
and the server. ``nodeSelector``, ``affinity`` (default: spread over nodes), ``tolerations``,
``imagePullSecrets``, ``labels`` and ``annotations`` are the pod's, as modelmesh-serving copies them.

**The adapter's settings** map onto the runtime's: ``modelLoadingTimeoutMillis`` is
``runtime.load_timeout_s``; ``memBufferBytes`` is the headroom kept out of the models' memory:
``runtime.capacity_bytes`` = the memory of the container that holds the models (requests, else
limits) minus it. With an external server that container is the server's, and the buffer
defaults to 128 MiB, what every modelmesh-serving runtime sets; with ``mesh`` and no buffer the
runtime keeps its own rule (``capacity_fraction`` of its limit). The annotation
``maxLoadingConcurrency`` is ``runtime.max_concurrent_loads``. ``builtInAdapter.env`` names
modelmesh-serving's adapter's variables and is not used.

**Names**: ``mesh-rt-<name>`` for a ClusterServingRuntime, ``mesh-rt-<namespace>-<name>-<hash>``
for a ServingRuntime (the hash of ``<namespace>/<name>``, since ``-`` joins ambiguously); any
name that had characters replaced or was cut to 52 characters (a StatefulSet's pods carry a
revision label of its name plus 11 characters, at most 63) ends with the hash too, so two
runtimes never share a name. Owner references point at the runtime only when it lives in the
workload namespace or is cluster-scoped (the API server refuses cross-namespace owners).

**HPAs** (KServe's and modelmesh-serving's annotations): a runtime run here whose
``serving.kserve.io/autoscalerClass`` is ``hpa`` gets an ``autoscaling/v2`` HorizontalPodAutoscaler
of its StatefulSet's name, labels and owner, on the routers' cache-aware signal
``mesh_runtime_replicas_desired{runtime="<ref>"}`` with deploy/autoscaling/hpa's metric (External,
``AverageValue`` 1: the replicas are the desired count) and behaviour (the signal holds its own
hysteresis). modelmesh-serving's HPA reads CPU or memory (``serving.kserve.io/metrics``,
``targetUtilizationPercentage``): those annotations are not read, the mesh's signal knows what the
models need. Bounds: ``serving.kserve.io/min-scale`` (default 1; 0 reads as 1, since a plain HPA
cannot go to zero: the controller's own scale-to-zero does that) and ``serving.kserve.io/max-scale``
(default the larger of min-scale, the runtime's replicas and 10, router.autoscale_max_replicas'
default), integers up to 1000. The HPA is ours to create, replace on a hash change and delete
(listed by the managed-by label, as the StatefulSets); while it is there the StatefulSet keeps the
replicas it sets. Scale to zero still happens: when the grace period ends the HPA is deleted
first, then the StatefulSet goes to 0; at the first model the StatefulSet comes back with its
replicas (within the bounds) first, then the HPA. It is also deleted first when the annotation
goes. Refused, with a Warning Event on the runtime (``InvalidServingRuntime``), no HPA and the
controller's own replicas: bad bounds (not integers, over 1000, min above max), and a
ServingRuntime: its group ``<namespace>/<name>`` is no label value, so no HPA selector can name
it; deploy/autoscaling/keda's ScaledObject can (PromQL), with another autoscalerClass than ``hpa``.

**Limit**: pods mount the ConfigMap named ``mesh-config`` as is; deploy/runtimes keeps that name
(``options: {disableNameSuffixHash: true}`` on its generator), so a changed mesh.toml reaches
runtime pods when they restart, not by itself.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any

import structlog

from mesh.controller.events import COMPONENT, warning_event
from mesh.controller.kube import GROUP, VERSION
from mesh.controller.runtimes import MESH, MLSERVER, SPI, TRITON, InvalidRuntime, ServingRuntime
from mesh.settings import ControllerSettings

log = structlog.get_logger(__name__)

MANAGED_BY = "app.kubernetes.io/managed-by"
CONTROLLER = COMPONENT  # the managed-by label value, and Events' source
SELECTOR = f"{MANAGED_BY}={CONTROLLER}"
RUNTIME_LABEL = "serving.kserve.io/runtime"
RUNTIME_NAMESPACE_LABEL = "serving.kserve.io/runtime-namespace"
WORKLOAD_LABEL = "mesh-serving.io/workload"  # the selector's own label: a runtime's name may not fit a label
HASH_ANNOTATION = "mesh-serving.io/spec-hash"
REF_ANNOTATION = "mesh-serving.io/runtime"
AUTOSCALER_ANNOTATION = "serving.kserve.io/autoscalerClass"
HPA_CLASS = "hpa"
MIN_SCALE_ANNOTATION = "serving.kserve.io/min-scale"
MAX_SCALE_ANNOTATION = "serving.kserve.io/max-scale"
DEFAULT_MAX_SCALE = 10  # router.autoscale_max_replicas' default: the signal's own upper bound
MAX_SCALE = 1000  # as spec.replicas
SIGNAL = "mesh_runtime_replicas_desired"  # the routers' per-group gauge (mesh/router/autoscale.py)
# deploy/autoscaling/hpa/hpa.yaml's: the signal holds its own hysteresis (up at once, down one
# replica per router.autoscale_hold_s), so the HPA follows it without a 5-minute window on top.
_HPA_BEHAVIOR: dict[str, Any] = {
    "scaleUp": {"stabilizationWindowSeconds": 0, "selectPolicy": "Max",
                "policies": [{"type": "Percent", "value": 100, "periodSeconds": 15},
                             {"type": "Pods", "value": 4, "periodSeconds": 15}]},
    "scaleDown": {"stabilizationWindowSeconds": 30, "selectPolicy": "Max",
                  "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}]},
}
INVALID_REASON = "InvalidServingRuntime"
SERVICE = "mesh-runtime"  # deploy/base's headless Service: it selects app.kubernetes.io/name=mesh-runtime
MAX_NAME = 52
DEFAULT_BUFFER_BYTES = 128 * 1024 * 1024
REPOSITORIES = {MLSERVER: "/models/_mlserver_models", TRITON: "/models/_triton_models"}
PVC_MOUNTS = "/pvc_mounts"
STORAGE_CACHE = "/var/cache/mesh-storage"
# The mesh runtime beside an external server holds no models: it needs memory for itself and the
# requests in flight only (the server's container holds the models and their capacity).
SIDECAR_RESOURCES = {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"memory": "512Mi"}}
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:e([0-9]+)|(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E))?$")
_POWERS = {"k": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4, "P": 1000**5, "E": 1000**6, "Ki": 1024,
           "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4, "Pi": 1024**5, "Ei": 1024**6}
_TRITON_REPOSITORY = re.compile(r"--model-repository[= ](\S+)")

_RESTRICTED = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}
_POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 10001, "fsGroup": 10001,
                 "seccompProfile": {"type": "RuntimeDefault"}}
_VOLUMES: list[dict[str, Any]] = [
    {"name": "config", "configMap": {"name": "mesh-config"}},
    {"name": "pki", "secret": {"secretName": "mesh-runtime-tls"}},
    {"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}},
    {"name": "models", "emptyDir": {"sizeLimit": "20Gi"}},
    {"name": "storage-config", "secret": {"secretName": "storage-config", "optional": True}},
    {"name": "storage-cache", "emptyDir": {"sizeLimit": "20Gi"}},
]
_MESH_MOUNTS: list[dict[str, Any]] = [
    {"name": "config", "mountPath": "/etc/mesh", "readOnly": True},
    {"name": "pki", "mountPath": "/etc/mesh-pki", "readOnly": True},
    {"name": "models", "mountPath": "/models"},
    {"name": "storage-config", "mountPath": "/storage-config", "readOnly": True},
    {"name": "storage-cache", "mountPath": STORAGE_CACHE},
    {"name": "tmp", "mountPath": "/tmp"},
]
# The server reads what the mesh runtime wrote: the repository's entries, the pulled models.
_SERVER_MOUNTS: list[dict[str, Any]] = [{"name": "models", "mountPath": "/models"},
                                        {"name": "storage-cache", "mountPath": STORAGE_CACHE, "readOnly": True}]
_MESH_ENV: list[dict[str, Any]] = [
    {"name": "MESH_CONFIG", "value": "/etc/mesh/mesh.toml"},
    {"name": "MESH_RUNTIME_ADVERTISE_HOST", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
    {"name": "MESH_RUNTIME_INSTANCE_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    {"name": "MESH_TLS_CERT_FILE", "value": "/etc/mesh-pki/tls.crt"},
    {"name": "MESH_TLS_KEY_FILE", "value": "/etc/mesh-pki/tls.key"},
    {"name": "MESH_TLS_CLIENT_CA_FILE", "value": "/etc/mesh-pki/ca.crt"},
    {"name": "MESH_TLS_CLIENT_AUTH", "value": "require"},
    {"name": "MESH_TLS_ALLOWED_PEERS", "value": "mesh-router,mesh-runtime"},
]


def _hash(text: str, n: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def workload_name(runtime: ServingRuntime) -> str:
    """The StatefulSet's name: a DNS label of at most 52 characters, one per runtime (module docstring)."""
    raw = f"mesh-rt-{runtime.namespace}-{runtime.name}" if runtime.namespace else f"mesh-rt-{runtime.name}"
    clean = re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", raw.lower())).strip("-")
    if clean == raw and len(clean) <= MAX_NAME and not runtime.namespace:
        return clean
    return f"{clean[:MAX_NAME - 9].rstrip('-')}-{_hash(runtime.ref)}"


def _label_value(text: str) -> str:
    """``text`` when it is a valid label value, else a valid one that names it uniquely."""
    if len(text) <= 63 and re.match(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$", text):
        return text
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '-', text)[:54].strip('-_.')}-{_hash(text)}"


def quantity_bytes(text: Any) -> int | None:
    """A Kubernetes memory quantity (``4Gi``, ``512M``, ``1e9``) in bytes; None if not one, or
    beyond 2**63 bytes (a quantity is text anyone writing a runtime controls: ``1e400`` must not
    overflow, ``1e30000000`` must not compute a 30-million-digit power)."""
    raw = str(text).strip() if text is not None else ""
    m = _QUANTITY.match(raw) if len(raw) <= 64 else None
    if not m or (m.group(2) and int(m.group(2)) > 18):
        return None
    exponent = 10 ** int(m.group(2)) if m.group(2) else _POWERS.get(m.group(3) or "", 1)
    value = int(Decimal(m.group(1)) * exponent)
    return value if value < 2**63 else None


def full_replicas(runtime: ServingRuntime, settings: ControllerSettings) -> int:
    return runtime.replicas if runtime.replicas is not None else settings.pods_per_runtime


def _field(spec: Mapping[str, Any], key: str, kind: type) -> Any:
    value = spec.get(key)
    if value is not None and not isinstance(value, kind):
        raise InvalidRuntime(f"spec.{key} must be {'an object' if kind is dict else 'a list'}")
    return copy.deepcopy(value) if value else None


def _env(ours: list[dict[str, Any]], theirs: Any) -> list[dict[str, Any]]:
    """Ours first; theirs after, except names we set (the pod's identity and TLS are not theirs to change)."""
    names = {e["name"] for e in ours}
    return [*ours, *(copy.deepcopy(dict(e)) for e in (theirs or [])
                     if isinstance(e, Mapping) and e.get("name") not in names)]


def _mounts(ours: list[dict[str, Any]], theirs: Any) -> list[dict[str, Any]]:
    """Theirs, plus ours whose volume or path they do not mount already."""
    theirs = [copy.deepcopy(m) for m in (theirs or []) if isinstance(m, Mapping)]
    taken = {m.get("name") for m in theirs} | {m.get("mountPath") for m in theirs}
    return [*theirs, *(m for m in ours if m["name"] not in taken and m["mountPath"] not in taken)]


def _repository(runtime: ServingRuntime, container: Mapping[str, Any]) -> str:
    if runtime.server_type == MLSERVER:
        named = next((e.get("value") for e in container.get("env") or [] if isinstance(e, Mapping)
                      and e.get("name") == "MLSERVER_MODELS_DIR"), None)
    else:
        m = _TRITON_REPOSITORY.search(" ".join(map(str, [*(container.get("command") or []),
                                                         *(container.get("args") or [])])))
        named = m.group(1) if m else None
    path = str(named or REPOSITORIES[runtime.server_type]).rstrip("/")
    if not path.startswith("/models/"):
        raise InvalidRuntime(f"the {runtime.server_type} container's model repository {path!r} must be under "
                             "/models/, the volume the mesh runtime writes the models' entries into")
    return path


def _capacity(runtime: ServingRuntime, holder: Mapping[str, Any]) -> int | None:
    """``runtime.capacity_bytes`` for the container holding the models (None: the runtime's own rule)."""
    if runtime.server_type == MESH and not runtime.mem_buffer_bytes:
        return None
    resources = holder.get("resources") or {}
    memory = quantity_bytes((resources.get("requests") or {}).get("memory")) or quantity_bytes(
        (resources.get("limits") or {}).get("memory"))
    buffer = runtime.mem_buffer_bytes or DEFAULT_BUFFER_BYTES
    if memory is None:
        return None  # a server without a memory request: the runtime falls back to its own limit
    if memory <= buffer:
        raise InvalidRuntime(f"spec.builtInAdapter.memBufferBytes ({buffer}) leaves no memory for models in the "
                             f"{holder.get('name')} container's {memory} bytes")
    return memory - buffer


def _mesh_container(runtime: ServingRuntime, settings: ControllerSettings, base: Mapping[str, Any] | None,
                    env: list[dict[str, Any]], pvc_mounts: list[dict[str, Any]]) -> dict[str, Any]:
    """deploy/base/runtime.yaml's runtime container; ``base`` is the runtime's ``mesh`` container."""
    base = base or {}
    container: dict[str, Any] = {
        "name": base.get("name") or "mesh-runtime", "image": base.get("image") or settings.runtime_image,
        "command": ["mesh", "serve", "runtime"], "workingDir": "/models", "env": _env(env, base.get("env")),
        "ports": [{"name": "grpc", "containerPort": 8085}, {"name": "health", "containerPort": 8086},
                  {"name": "metrics", "containerPort": 2112}],
        "readinessProbe": {"grpc": {"port": 8086}, "periodSeconds": 5},
        "livenessProbe": {"grpc": {"port": 8086, "service": "liveness"}, "initialDelaySeconds": 15,
                          "periodSeconds": 10, "failureThreshold": 6},
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", "5"]}}},
        "resources": copy.deepcopy(base.get("resources") or SIDECAR_RESOURCES),
        "securityContext": copy.deepcopy(_RESTRICTED),
        "volumeMounts": _mounts([*_MESH_MOUNTS, *pvc_mounts], base.get("volumeMounts")),
    }
    if base.get("imagePullPolicy"):
        container["imagePullPolicy"] = base["imagePullPolicy"]
    return container


def _containers(runtime: ServingRuntime, settings: ControllerSettings,
                pvc_mounts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    written = [c for c in runtime.spec.get("containers") or [] if isinstance(c, Mapping)]
    env = [*_MESH_ENV, {"name": "MESH_RUNTIME_LABELS", "value": runtime.label},
           {"name": "MESH_RUNTIME_SUPPORTED_TYPES", "value": ",".join(runtime.mesh_types())}]
    if runtime.loading_timeout_ms:
        env.append({"name": "MESH_RUNTIME_LOAD_TIMEOUT_S", "value": f"{runtime.loading_timeout_ms / 1000:g}"})
    loads = str(runtime.annotations.get("maxLoadingConcurrency", "")).strip()
    if loads.isdigit() and int(loads) > 0:
        env.append({"name": "MESH_RUNTIME_MAX_CONCURRENT_LOADS", "value": loads})
    if runtime.server_type == MESH:
        mesh = next(c for c in written if c.get("name") == MESH)
        capacity = _capacity(runtime, mesh)
        if capacity is not None:
            env.append({"name": "MESH_RUNTIME_CAPACITY_BYTES", "value": str(capacity)})
        return [_mesh_container(runtime, settings, mesh, env, pvc_mounts)]
    env += [{"name": "MESH_RUNTIME_SERVER", "value": runtime.server_type},
            {"name": "MESH_RUNTIME_SERVER_ADDRESS", "value": f"127.0.0.1:{runtime.server_port}"},
            {"name": "MESH_RUNTIME_SERVER_TYPES", "value": ",".join(runtime.mesh_types())},
            # The server runs the model code: the workers of mesh.toml would exclude it.
            {"name": "MESH_RUNTIME_WORKERS", "value": "0"}]
    servers = [c for c in written if runtime.server_type == SPI or c.get("name") == runtime.server_type]
    if runtime.server_type != SPI:
        env.append({"name": "MESH_RUNTIME_SERVER_REPOSITORY", "value": _repository(runtime, servers[0])})
    capacity = _capacity(runtime, servers[0])
    if capacity is not None:
        env.append({"name": "MESH_RUNTIME_CAPACITY_BYTES", "value": str(capacity)})
    containers = [_mesh_container(runtime, settings, None, env, pvc_mounts)]
    for c in written:
        out = copy.deepcopy(dict(c))
        if c in servers:
            out["volumeMounts"] = _mounts([*_SERVER_MOUNTS, *pvc_mounts], c.get("volumeMounts"))
        containers.append(out)
    return containers


def render_workload(runtime: ServingRuntime, settings: ControllerSettings, namespace: str) -> dict[str, Any]:
    """The StatefulSet that runs ``runtime`` in ``namespace`` (pure); InvalidRuntime if it cannot be run."""
    if runtime.error:
        raise InvalidRuntime(runtime.error)
    spec = runtime.spec
    name = workload_name(runtime)
    selector = {"app.kubernetes.io/name": "mesh-runtime", WORKLOAD_LABEL: name}
    labels = {**selector, "app.kubernetes.io/component": "runtime", "app.kubernetes.io/part-of": "mesh-serving",
              MANAGED_BY: CONTROLLER, RUNTIME_LABEL: _label_value(runtime.name)}
    if runtime.namespace:
        labels[RUNTIME_NAMESPACE_LABEL] = runtime.namespace
    volumes = _field(spec, "volumes", list) or []
    ours = {v["name"] for v in _VOLUMES}
    for v in volumes:
        if not isinstance(v, Mapping) or not v.get("name") or v["name"] in ours:
            raise InvalidRuntime(f"spec.volumes: every volume needs a name, and {', '.join(sorted(ours))} are the "
                                 "mesh runtime's")
    pvc_mounts = [{"name": v["name"], "mountPath": f"{PVC_MOUNTS}/{v['persistentVolumeClaim']['claimName']}",
                   "readOnly": True}
                  for v in volumes if isinstance(v.get("persistentVolumeClaim"), Mapping)
                  and v["persistentVolumeClaim"].get("claimName")]
    containers = _containers(runtime, settings, pvc_mounts)
    pod: dict[str, Any] = {
        "automountServiceAccountToken": False,  # runtimes never call the Kubernetes API
        "terminationGracePeriodSeconds": 60,  # deploy/base/runtime.yaml: preStop, re-homing, draining
        "securityContext": copy.deepcopy(_POD_SECURITY),
        "affinity": _field(spec, "affinity", dict) or {"podAntiAffinity": {  # spread over nodes
            "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 100, "podAffinityTerm": {
                "topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": dict(selector)}}}]}},
        "containers": containers,
        "volumes": [*copy.deepcopy(_VOLUMES), *volumes],
    }
    for key, kind in (("nodeSelector", dict), ("tolerations", list), ("imagePullSecrets", list)):
        if (value := _field(spec, key, kind)) is not None:
            pod[key] = value
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": labels,
                            "annotations": {REF_ANNOTATION: runtime.ref}}
    uid = runtime.uid
    if uid and runtime.namespace in ("", namespace):
        meta["ownerReferences"] = [{"apiVersion": f"{GROUP}/{VERSION}", "kind": runtime.kind, "name": runtime.name,
                                    "uid": uid, "controller": True, "blockOwnerDeletion": False}]
    body = {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": meta, "spec": {
        "serviceName": SERVICE, "replicas": full_replicas(runtime, settings),
        "podManagementPolicy": "Parallel",  # runtimes do not depend on one another
        "selector": {"matchLabels": selector},
        "template": {"metadata": {"labels": {**(_field(spec, "labels", dict) or {}), **labels},
                                  "annotations": {**(_field(spec, "annotations", dict) or {}),
                                                  "kubectl.kubernetes.io/default-container": containers[0]["name"]}},
                     "spec": pod}}}
    meta["annotations"][HASH_ANNOTATION] = spec_hash(body)
    return body


def autoscaler_class(runtime: ServingRuntime) -> str:
    return runtime.annotations.get(AUTOSCALER_ANNOTATION, "").strip()


def _scale(runtime: ServingRuntime, key: str, low: int) -> int | None:
    text = runtime.annotations.get(key, "").strip()
    if not text:
        return None
    if not re.fullmatch("[0-9]+", text) or not low <= int(text) <= MAX_SCALE:
        raise InvalidRuntime(f"annotation {key}: {text!r} is not an integer from {low} to {MAX_SCALE}; the runtime "
                             "runs without a HorizontalPodAutoscaler")
    return int(text)


def render_hpa(runtime: ServingRuntime, settings: ControllerSettings, workload: Mapping[str, Any]) -> dict[str, Any]:
    """The HPA of ``runtime``'s rendered StatefulSet ``workload`` (pure; module docstring);
    InvalidRuntime if its annotations give none."""
    group = runtime.ref  # the metric's runtime label (mesh/router/autoscale.py)
    if runtime.namespace or _label_value(group) != group:
        raise InvalidRuntime(
            f"{AUTOSCALER_ANNOTATION}: {HPA_CLASS}: the runtime's group {group!r} is not a label value, so no "
            f"HorizontalPodAutoscaler can select {SIGNAL} for it; the runtime runs without one. Scale it with "
            "deploy/autoscaling/keda's ScaledObject (its Prometheus query can name the group) and another "
            f"{AUTOSCALER_ANNOTATION} than {HPA_CLASS}")
    low = max(1, _scale(runtime, MIN_SCALE_ANNOTATION, 0) or 1)  # 0: the controller's scale-to-zero
    high = _scale(runtime, MAX_SCALE_ANNOTATION, 1)
    if high is None:
        high = max(low, min(full_replicas(runtime, settings), MAX_SCALE), DEFAULT_MAX_SCALE)
    elif low > high:
        raise InvalidRuntime(f"annotations {MIN_SCALE_ANNOTATION} ({low}) above {MAX_SCALE_ANNOTATION} ({high}); the "
                             "runtime runs without a HorizontalPodAutoscaler")
    owner = workload["metadata"]
    meta: dict[str, Any] = {"name": owner["name"], "namespace": owner["namespace"], "labels": dict(owner["labels"]),
                            "annotations": {REF_ANNOTATION: runtime.ref}}
    if "ownerReferences" in owner:
        meta["ownerReferences"] = copy.deepcopy(owner["ownerReferences"])
    body = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": meta, "spec": {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": owner["name"]},
        "minReplicas": low, "maxReplicas": high,
        "metrics": [{"type": "External", "external": {
            "metric": {"name": SIGNAL, "selector": {"matchLabels": {"runtime": group}}},
            "target": {"type": "AverageValue", "averageValue": "1"}}}],
        "behavior": copy.deepcopy(_HPA_BEHAVIOR)}}
    meta["annotations"][HASH_ANNOTATION] = spec_hash(body)
    return body


def spec_hash(body: Mapping[str, Any]) -> str:
    """The hash of a rendered StatefulSet (or HPA), its replicas and this hash left out."""
    plain = copy.deepcopy(dict(body))
    plain["spec"].pop("replicas", None)
    plain["metadata"].get("annotations", {}).pop(HASH_ANNOTATION, None)
    return _hash(json.dumps(plain, sort_keys=True), 16)


def invalid_event(runtime: ServingRuntime, message: str, namespace: str, now: datetime) -> dict[str, Any]:
    """A core/v1 Warning Event on the runtime (in its namespace, or ``namespace`` for a cluster runtime)."""
    involved = {"apiVersion": f"{GROUP}/{VERSION}", "kind": runtime.kind, "name": runtime.name}
    if runtime.namespace:
        involved["namespace"] = runtime.namespace
    if uid := runtime.uid:
        involved["uid"] = uid
    return warning_event(involved, runtime.namespace or namespace, INVALID_REASON, message, now)


__all__ = ["AUTOSCALER_ANNOTATION", "CONTROLLER", "HASH_ANNOTATION", "HPA_CLASS", "MANAGED_BY", "REF_ANNOTATION",
           "SELECTOR", "autoscaler_class", "full_replicas", "invalid_event", "quantity_bytes", "render_hpa",
           "render_workload", "spec_hash", "workload_name"]
