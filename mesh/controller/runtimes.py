"""ServingRuntimes and ClusterServingRuntimes (``serving.kserve.io/v1alpha1``): which runtime serves a
model, and what its pods advertise. No I/O.

A runtime is KServe's resource as modelmesh-serving reads it (docs/kserve-notes.md sections 4-5):
``supportedModelFormats {name, version, autoSelect, priority}``, ``multiModel``, ``disabled``,
``protocolVersions``, ``containers``, ``builtInAdapter {serverType, runtimeManagementPort,
memBufferBytes, modelLoadingTimeoutMillis, env}``, ``grpcDataEndpoint``, ``replicas``. Only
multi-model runtimes are ours: single-model ones (KServe's ``kserve-sklearnserver`` and the like)
belong to KServe's own controller and are ignored, so both controllers share one cluster's runtimes.

**What runs the models** (``server_type``):

| ``builtInAdapter.serverType`` | the runtime pods                                                   |
|-------------------------------|--------------------------------------------------------------------|
| ``mesh``                      | the mesh runtime's own loaders, in the container named ``mesh``    |
| ``mlserver``, ``triton``      | that server's container and a mesh runtime driving it (``server``) |
| none, with ``grpcEndpoint``   | a container serving ModelMesh's ``mmesh.ModelRuntime`` SPI (spi)   |

``ovms`` and ``torchserve`` (modelmesh-serving's other adapters) are not supported: such a runtime
is invalid, with a message saying so, and models that name it are told.

**Selection**, as KServe does it (``GetSupportingRuntimes``, ``predictor_model.go``):

- A model that names a runtime (Predictor ``spec.runtime.name``, InferenceService
  ``predictor.model.runtime`` or the ``serving.kserve.io/servingRuntime`` annotation) gets the
  ServingRuntime of that name in its namespace, else the ClusterServingRuntime. It must be valid,
  enabled, multi-model, list the model's format (``autoSelect`` or not) and its protocol.
- Otherwise every runtime that lists the format with ``autoSelect: true`` (a version, when the
  model gives one, must be equal), is enabled, multi-model and speaks the protocol is a candidate;
  the namespace's runtimes come before the cluster's, and within each the highest ``priority``
  wins (a priority set beats none), then the newest, then the name.

One runtime is chosen (modelmesh-serving instead places the model on any runtime whose labels
match): the status can say which, a priority means what it says, and the choice is part of the
model's identity (``derived``), so a model moves to another runtime by a transition (the old
copy serves until the new one has loaded), never by a silent relabel.

**Labels**: the chosen runtime's pods carry ``rt:<ref>`` (``<ref>`` = the name of a
ClusterServingRuntime, ``<namespace>/<name>`` of a ServingRuntime: ``/`` is in no Kubernetes name,
so two namespaces' runtimes of one name never share pods), and the model requires that label.
A namespaced ServingRuntime overrides a ClusterServingRuntime of the same name in its namespace
(modelmesh-serving's rule).

**Without any runtime for its namespace** (no ServingRuntime CRD, or no valid multi-model runtime
visible there, and the model names none that exists: a mesh deployed with deploy/base's fixed
runtime StatefulSet) nothing is selected: the model goes to any runtime that loads its type, and
``runtime.name: X`` to runtimes labelled ``rt:X``, as before runtimes were read
(:meth:`RuntimeCatalog.declares`). One namespace's runtimes never change how another's models go.

**Who may run what.** With the controller running the runtimes (``controller.manage_runtimes``),
their pods run in the mesh's namespace, beside its certificates and storage keys: only
ClusterServingRuntimes and the ServingRuntimes of that namespace are run (others are invalid,
and models naming them are told why), a runtime's containers may not mount the mesh runtime's
volumes (:data:`RESERVED_VOLUMES`), be privileged, or use hostPath volumes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from mesh.controller.events import WatchEvent
from mesh.controller.predictor import MODEL_TYPES, NO_SUPPORTING_RUNTIME, RUNTIME_NOT_RECOGNIZED

MESH, MLSERVER, TRITON, SPI = "mesh", "mlserver", "triton", "spi"
SERVER_TYPES = (MESH, MLSERVER, TRITON)  # builtInAdapter.serverType values we run
UNSUPPORTED_SERVER_TYPES = ("ovms", "torchserve")
MAX_FORMATS = 64
MAX_CONTAINERS = 16
# Container names the runtime pods use themselves (the mesh runtime beside an external server).
RESERVED_CONTAINERS = ("mesh-runtime",)
# Ports of the mesh runtime in every runtime pod (gRPC, health, metrics): a server may not take them.
RESERVED_PORTS = (8085, 8086, 2112)
# The pod's volumes that hold the mesh's secrets and settings (mesh.controller.workloads): the mesh
# runtime's alone, never mounted into a container a runtime's author wrote.
RESERVED_VOLUMES = ("config", "pki", "storage-config", "storage-cache")
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")  # a DNS label: a container's name
_ENDPOINT = re.compile(r"^port:(\d{1,5})$")


class InvalidRuntime(ValueError):
    """A runtime's spec that cannot be run as written (its message names the field)."""


@dataclass(frozen=True)
class ModelFormat:
    name: str  # lower case: KServe compares formats as written, every built-in runtime writes them so
    version: str = ""
    auto_select: bool = False
    priority: int = 0  # 0: not set


@dataclass(frozen=True)
class ServingRuntime:
    """A valid multi-model runtime (``error`` set: an invalid one, kept so models naming it are told why)."""

    namespace: str  # "" for a ClusterServingRuntime
    name: str
    formats: tuple[ModelFormat, ...] = ()
    disabled: bool = False
    multi_model: bool = True
    protocols: tuple[str, ...] = ()
    server_type: str = MESH  # mesh, mlserver, triton, spi
    server_port: int = 0  # the external server's gRPC port (runtimeManagementPort / grpcEndpoint)
    mem_buffer_bytes: int = 0
    loading_timeout_ms: int = 0
    replicas: int | None = None
    created: str = ""  # metadata.creationTimestamp (RFC 3339 sorts as text)
    generation: int = 0
    uid: str = ""  # metadata.uid: owner references of its workload
    spec: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    # Compared (an annotation change does not move the generation, yet the workload reads some:
    # the autoscaler class, maxLoadingConcurrency), but not hashed (a dict).
    annotations: Mapping[str, str] = field(default_factory=dict, hash=False, repr=False)
    error: str = ""

    @property
    def kind(self) -> str:
        return "ServingRuntime" if self.namespace else "ClusterServingRuntime"

    @property
    def ref(self) -> str:
        """The runtime's name in the mesh: unique across namespaces."""
        return f"{self.namespace}/{self.name}" if self.namespace else self.name

    @property
    def label(self) -> str:
        return f"rt:{self.ref}"

    def describe(self) -> str:
        return f"{self.kind} {self.ref}"

    def mesh_types(self) -> tuple[str, ...]:
        """The model types its pods advertise (``runtime.supported_types``)."""
        return tuple(sorted({MODEL_TYPES.get(f.name, f.name) for f in self.formats}))

    def supports(self, name: str, version: str, *, named: bool) -> bool:
        """Lists the format (with ``autoSelect`` unless the model names this runtime), and the
        version when the model gives one."""
        return any(f.name == name and (named or f.auto_select) and (not version or f.version == version)
                   for f in self.formats)

    def priority_of(self, name: str, version: str) -> int:
        return max((f.priority for f in self.formats
                    if f.name == name and f.auto_select and (not version or f.version == version)), default=0)

    def speaks(self, protocol: str) -> bool:
        """KServe's ``IsProtocolVersionSupported``: any, when either side names none."""
        return not protocol or not self.protocols or protocol in self.protocols


@dataclass(frozen=True)
class Selection:
    """The runtime chosen for a model, or why none is (``reason`` and ``message``, for its status)."""

    runtime: ServingRuntime | None = None
    reason: str = ""
    message: str = ""


def _text(value: Any, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidRuntime(f"{where} must be a string, not {type(value).__name__}")
    return value.strip()


def _int(value: Any, where: str, *, low: int = 0, high: int = 2**63 - 1) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidRuntime(f"{where} must be an integer from {low} to {high}, not {str(value)[:40]!r}")
    return value


def _bool(value: Any, where: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidRuntime(f"{where} must be true or false, not {str(value)[:40]!r}")
    return value


def _formats(spec: Mapping[str, Any]) -> tuple[ModelFormat, ...]:
    raw = spec.get("supportedModelFormats") or []
    if not isinstance(raw, list):
        raise InvalidRuntime("spec.supportedModelFormats must be a list")
    if len(raw) > MAX_FORMATS:
        raise InvalidRuntime(f"spec.supportedModelFormats has {len(raw)} entries; at most {MAX_FORMATS}")
    out = []
    for i, entry in enumerate(raw):
        where = f"spec.supportedModelFormats[{i}]"
        if not isinstance(entry, Mapping):
            raise InvalidRuntime(f"{where} must be an object")
        name = _text(entry.get("name"), f"{where}.name").lower()
        if not name:
            raise InvalidRuntime(f"{where}.name is required")
        priority = _int(entry.get("priority"), f"{where}.priority", low=1, high=2**31 - 1) or 0
        auto = _bool(entry.get("autoSelect"), f"{where}.autoSelect")
        if priority and not auto:
            raise InvalidRuntime(f"{where}.priority is set without autoSelect: true (a priority ranks only "
                                 "auto-selected runtimes)")
        out.append(ModelFormat(name, _text(entry.get("version"), f"{where}.version"), auto, priority))
    return tuple(out)


def _port(endpoint: str, where: str) -> int:
    m = _ENDPOINT.match(endpoint)
    if not m or not 1 <= int(m.group(1)) <= 65535:
        raise InvalidRuntime(f"{where} must be 'port:N' (1-65535), not {endpoint[:40]!r}")
    return int(m.group(1))


def _containers(spec: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    raw = spec.get("containers")
    if not isinstance(raw, list) or not raw:
        raise InvalidRuntime("spec.containers is required: at least one container")
    if len(raw) > MAX_CONTAINERS:
        raise InvalidRuntime(f"spec.containers has {len(raw)} entries; at most {MAX_CONTAINERS}")
    names = set()
    for i, c in enumerate(raw):
        where = f"spec.containers[{i}]"
        if not isinstance(c, Mapping):
            raise InvalidRuntime(f"{where} must be an object")
        name = _text(c.get("name"), f"{where}.name")
        if not _NAME.match(name):
            raise InvalidRuntime(f"{where}.name {name[:70]!r} must be a DNS label (lower case letters, "
                                 "digits and '-', at most 63)")
        if name in names:
            raise InvalidRuntime(f"{where}.name {name!r} is used twice")
        if name in RESERVED_CONTAINERS:
            raise InvalidRuntime(f"{where}.name {name!r} is reserved for the mesh runtime")
        names.add(name)
        if not _text(c.get("image"), f"{where}.image"):
            raise InvalidRuntime(f"{where}.image is required")
        for forbidden in ("readinessProbe", "lifecycle"):
            if c.get(forbidden) is not None:
                raise InvalidRuntime(f"{where}.{forbidden} is not allowed: the mesh runtime decides when the "
                                     "pod is ready and how it stops (as modelmesh-serving)")
        mounts = c.get("volumeMounts") or []
        if not isinstance(mounts, list) or not all(isinstance(m, Mapping) for m in mounts):
            raise InvalidRuntime(f"{where}.volumeMounts must be a list of objects")
        for j, m in enumerate(mounts):
            if m.get("name") in RESERVED_VOLUMES:
                raise InvalidRuntime(f"{where}.volumeMounts[{j}] mounts {m.get('name')!r}: the mesh runtime's own "
                                     f"volumes ({', '.join(RESERVED_VOLUMES)}) are not for other containers")
        security = c.get("securityContext") or {}
        if not isinstance(security, Mapping):
            raise InvalidRuntime(f"{where}.securityContext must be an object")
        if security.get("privileged") or security.get("allowPrivilegeEscalation"):
            raise InvalidRuntime(f"{where}.securityContext may not be privileged or allow privilege escalation")
        ports = c.get("ports") or []
        if not isinstance(ports, list):
            raise InvalidRuntime(f"{where}.ports must be a list")
        for j, p in enumerate(ports):
            number = _int(p.get("containerPort") if isinstance(p, Mapping) else None,
                          f"{where}.ports[{j}].containerPort", low=1, high=65535)
            if number in RESERVED_PORTS:
                raise InvalidRuntime(f"{where}.ports[{j}].containerPort {number} is reserved for the mesh "
                                     f"runtime ({', '.join(map(str, RESERVED_PORTS))})")
    return raw


def parse_runtime(obj: Mapping[str, Any]) -> ServingRuntime | None:
    """The runtime an object describes; None for a runtime that is not ours (single-model). An
    invalid multi-model runtime comes back with ``error`` set, naming the field."""
    meta = obj.get("metadata") or {}
    namespace, name = str(meta.get("namespace") or ""), str(meta.get("name") or "")
    spec = obj.get("spec")
    annotations = {str(k): str(v) for k, v in (meta.get("annotations") or {}).items()}
    base = ServingRuntime(namespace=namespace, name=name, created=str(meta.get("creationTimestamp") or ""),
                          generation=int(meta.get("generation") or 0), uid=str(meta.get("uid") or ""),
                          annotations=annotations)
    if not isinstance(spec, Mapping):
        return ServingRuntime(**{**_fields(base), "error": "spec must be an object"})
    if spec.get("multiModel") is not True:
        return None  # KServe's single-model runtimes (or a typo: multiModel must be the boolean true)
    try:
        formats = _formats(spec)
        disabled = _bool(spec.get("disabled"), "spec.disabled")
        protocols = spec.get("protocolVersions") or []
        if not isinstance(protocols, list) or not all(isinstance(p, str) for p in protocols):
            raise InvalidRuntime("spec.protocolVersions must be a list of strings")
        containers = _containers(spec)
        replicas = _int(spec.get("replicas"), "spec.replicas", high=1000)
        volumes = spec.get("volumes") or []
        if not isinstance(volumes, list) or not all(isinstance(v, Mapping) for v in volumes):
            raise InvalidRuntime("spec.volumes must be a list of objects")
        for i, v in enumerate(volumes):
            if "hostPath" in v:
                raise InvalidRuntime(f"spec.volumes[{i}] is a hostPath: runtime pods do not reach into the node")
        adapter = spec.get("builtInAdapter")
        if adapter is not None and not isinstance(adapter, Mapping):
            raise InvalidRuntime("spec.builtInAdapter must be an object")
        server_type, port, buffer, timeout = SPI, 0, 0, 0
        if adapter:
            server_type = _text(adapter.get("serverType"), "spec.builtInAdapter.serverType").lower()
            if server_type in UNSUPPORTED_SERVER_TYPES:
                raise InvalidRuntime(f"spec.builtInAdapter.serverType {server_type!r} is not supported by "
                                     f"mesh-serving; supported: {', '.join(SERVER_TYPES)}")
            if server_type not in SERVER_TYPES:
                raise InvalidRuntime(f"spec.builtInAdapter.serverType must be one of {', '.join(SERVER_TYPES)}, "
                                     f"not {server_type[:40]!r}")
            if not any(c.get("name") == server_type for c in containers):
                raise InvalidRuntime(f"spec.builtInAdapter.serverType {server_type!r} needs a container named "
                                     f"{server_type!r} in spec.containers (as modelmesh-serving)")
            port = _int(adapter.get("runtimeManagementPort"), "spec.builtInAdapter.runtimeManagementPort",
                        low=1, high=65535) or 0
            if server_type != MESH and not port:
                raise InvalidRuntime("spec.builtInAdapter.runtimeManagementPort is required for "
                                     f"{server_type}: the port the mesh runtime drives the server on")
            buffer = _int(adapter.get("memBufferBytes"), "spec.builtInAdapter.memBufferBytes") or 0
            timeout = _int(adapter.get("modelLoadingTimeoutMillis"),
                           "spec.builtInAdapter.modelLoadingTimeoutMillis") or 0
        else:
            endpoint = _text(spec.get("grpcEndpoint"), "spec.grpcEndpoint")
            if not endpoint:
                raise InvalidRuntime("spec.builtInAdapter or spec.grpcEndpoint is required: without an adapter "
                                     "the container must serve ModelMesh's model-runtime SPI on grpcEndpoint")
            port = _port(endpoint, "spec.grpcEndpoint")
        unknown = [f.name for f in formats if f.name not in MODEL_TYPES]
        if server_type == MESH and unknown:
            raise InvalidRuntime(f"serverType mesh loads the formats {', '.join(sorted(MODEL_TYPES))}, not "
                                 f"{', '.join(unknown)[:200]}")
        if port in RESERVED_PORTS:
            raise InvalidRuntime(f"the server's port {port} is reserved for the mesh runtime")
    except InvalidRuntime as exc:
        return ServingRuntime(**{**_fields(base), "error": str(exc)})
    return ServingRuntime(**{**_fields(base), "formats": formats, "disabled": disabled,
                             "protocols": tuple(protocols), "server_type": server_type, "server_port": port,
                             "mem_buffer_bytes": buffer, "loading_timeout_ms": timeout, "replicas": replicas,
                             "spec": spec})


def _fields(rt: ServingRuntime) -> dict[str, Any]:
    return {f: getattr(rt, f) for f in ServingRuntime.__dataclass_fields__}


class RuntimeCatalog:
    """The cluster's multi-model runtimes, as the watches last listed them."""

    def __init__(self, run_namespace: str | None = None) -> None:
        self._runtimes: dict[tuple[str, str], ServingRuntime] = {}  # (namespace, name); "" = cluster
        self.version = 0  # bumped on every change: reconciles compare it
        # With the controller running the runtimes (manage_runtimes): the one namespace whose
        # ServingRuntimes it runs, beside ClusterServingRuntimes. A runtime's pods run in the
        # mesh's namespace next to its certificates; a ServingRuntime of another namespace is
        # written by that namespace's users, so it is refused rather than run there.
        self.run_namespace = run_namespace

    def replace(self, namespace_scoped: bool, runtimes: Iterable[ServingRuntime]) -> bool:
        """A list of one kind (namespaced or cluster) replaces what was known of it."""
        kept = {k: v for k, v in self._runtimes.items() if bool(k[0]) != namespace_scoped}
        kept.update({(r.namespace, r.name): self._checked(r) for r in runtimes})
        return self._set(kept)

    def apply(self, event: WatchEvent, *, namespace_scoped: bool) -> list[ServingRuntime]:
        """A watch event of ServingRuntimes (``namespace_scoped``) or ClusterServingRuntimes; the
        runtimes that changed (invalid ones included, to be reported), [] if nothing did."""
        before = dict(self._runtimes)
        if event.type == "SYNC":
            self.replace(namespace_scoped, (r for r in map(parse_runtime, event.objects) if r is not None))
        elif event.object is not None:
            meta = event.object.get("metadata") or {}
            namespace = str(meta.get("namespace") or "") if namespace_scoped else ""
            runtime = parse_runtime(event.object) if event.type != "DELETED" else None
            if runtime is None:  # gone, or no longer multi-model
                self.remove(namespace, str(meta.get("name") or ""))
            else:
                self.put(runtime if namespace_scoped else replace(runtime, namespace=""))
        return [r for k, r in self._runtimes.items() if before.get(k) != r]

    def put(self, runtime: ServingRuntime) -> bool:
        return self._set({**self._runtimes, (runtime.namespace, runtime.name): self._checked(runtime)})

    def _checked(self, runtime: ServingRuntime) -> ServingRuntime:
        if runtime.error or self.run_namespace is None or runtime.namespace in ("", self.run_namespace):
            return runtime
        return replace(runtime, error=(
            f"the controller runs ClusterServingRuntimes and the ServingRuntimes of namespace "
            f"{self.run_namespace!r} only (a runtime's pods run beside the mesh's certificates); ask an "
            "administrator for a ClusterServingRuntime"))

    def declares(self, namespace: str, runtime: str = "") -> bool:
        """Whether runtimes decide where a model of ``namespace`` goes: a valid runtime is visible
        there, or the model names one that exists. Otherwise (no runtime for this namespace) it
        goes to any runtime loading its type, as before runtimes were read."""
        return any(not r.error for r in self.visible(namespace)) or bool(runtime and self.get(namespace, runtime))

    def remove(self, namespace: str, name: str) -> bool:
        return self._set({k: v for k, v in self._runtimes.items() if k != (namespace, name)})

    def _set(self, runtimes: dict[tuple[str, str], ServingRuntime]) -> bool:
        if runtimes == self._runtimes:
            return False
        self._runtimes = runtimes
        self.version += 1
        return True

    def __len__(self) -> int:
        return len(self._runtimes)

    def all(self) -> list[ServingRuntime]:
        return list(self._runtimes.values())

    def get(self, namespace: str, name: str) -> ServingRuntime | None:
        """The ServingRuntime ``name`` of ``namespace``, else the ClusterServingRuntime."""
        return self._runtimes.get((namespace, name)) or self._runtimes.get(("", name))

    def visible(self, namespace: str) -> list[ServingRuntime]:
        """The runtimes a model of ``namespace`` may use: its namespace's, and the cluster's not
        overridden by one of the same name there."""
        own = {n: r for (ns, n), r in self._runtimes.items() if ns == namespace and namespace}
        cluster = [r for (ns, n), r in self._runtimes.items() if not ns and n not in own]
        return [*own.values(), *cluster]

    def select(self, namespace: str, fmt: str, version: str = "", *, runtime: str = "",
               protocol: str = "") -> Selection:
        """The runtime for a model of format ``fmt`` (module docstring, *Selection*)."""
        fmt, what = fmt.lower(), f"{fmt.lower()}{':' + version if version else ''}"
        if runtime:
            rt = self.get(namespace, runtime)
            if rt is None:
                return Selection(reason=RUNTIME_NOT_RECOGNIZED, message=(
                    f"no ServingRuntime {runtime!r} in namespace {namespace!r} and no ClusterServingRuntime "
                    f"{runtime!r} (multi-model runtimes only)"))
            if rt.error:
                return Selection(reason=RUNTIME_NOT_RECOGNIZED, message=f"{rt.describe()} is invalid: {rt.error}")
            if rt.disabled:
                return Selection(reason=NO_SUPPORTING_RUNTIME, message=f"{rt.describe()} is disabled")
            if not rt.supports(fmt, version, named=True):
                listed = ", ".join(f.name + (":" + f.version if f.version else "") for f in rt.formats) or "none"
                return Selection(reason=NO_SUPPORTING_RUNTIME, message=(
                    f"{rt.describe()} does not support model format {what} (it lists: {listed})"))
            if not rt.speaks(protocol):
                return Selection(reason=NO_SUPPORTING_RUNTIME, message=(
                    f"{rt.describe()} does not support protocol {protocol!r} (it speaks: {', '.join(rt.protocols)})"))
            return Selection(runtime=rt)
        candidates = [r for r in self.visible(namespace)
                      if not r.error and not r.disabled and r.supports(fmt, version, named=False)
                      and r.speaks(protocol)]
        if not candidates:
            return Selection(reason=NO_SUPPORTING_RUNTIME, message=(
                f"no enabled multi-model runtime auto-selects model format {what}"
                + (f" with protocol {protocol!r}" if protocol else "")
                + f"; formats auto-selected here: {', '.join(self._auto_formats(namespace)) or 'none'}"))
        # KServe sorts the namespace's runtimes and the cluster's each by priority, then puts the
        # namespace's first; within equal priority the newest, then by name: a total order, so
        # every controller replica chooses alike.
        candidates.sort(key=lambda r: r.ref)
        candidates.sort(key=lambda r: r.created, reverse=True)
        candidates.sort(key=lambda r: (bool(not r.namespace), -r.priority_of(fmt, version)))
        return Selection(runtime=candidates[0])

    def _auto_formats(self, namespace: str) -> list[str]:
        return sorted({f.name for r in self.visible(namespace) if not r.error and not r.disabled
                       for f in r.formats if f.auto_select})


__all__ = ["MESH", "MLSERVER", "SERVER_TYPES", "SPI", "TRITON",
           "InvalidRuntime", "ModelFormat", "RuntimeCatalog", "Selection", "ServingRuntime", "parse_runtime"]
