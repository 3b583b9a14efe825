"""Each ServingRuntime in use runs as a StatefulSet of mesh runtime pods (``controller.manage_runtimes``).

What modelmesh-serving does with a Deployment per runtime (docs/kserve-notes.md sections 4-6),
done with a StatefulSet per runtime in ``controller.workload_namespace``, because a runtime's pod
name is its instance ID (deploy/base/runtime.yaml):

- **Which runtimes run**: the valid, enabled runtimes of the :class:`RuntimeCatalog` that some
  model was sent to (:class:`RuntimeUsage`, fed by the Predictor reconcilers). A runtime never
  used gets no StatefulSet (modelmesh-serving deploys every runtime, then scales the unused ones
  to zero: the same pods, without the empty objects). One that no model uses for
  ``scale_to_zero_grace_s`` goes to 0 replicas (``scale_to_zero``) and back up at its first model.
  A runtime deleted or disabled loses its StatefulSet. An invalid one gets a Warning Event
  ``InvalidServingRuntime`` once per generation, and what runs for it stays as it was (a bad
  edit does not take down the pods serving; a runtime this controller may not run, one of
  another namespace, is deleted). Whatever a runtime's spec breaks while it is rendered or
  written is that runtime's failure, never the pass's.
- **Ours only**: StatefulSets are listed by the label ``app.kubernetes.io/managed-by:
  mesh-controller``; one without it is never changed, also when it has the name a runtime
  wants (the runtime then has no pods, and the log says why).
- **Changes**: the rendered object carries a hash of itself (``mesh-serving.io/spec-hash``,
  replicas excluded); a different hash replaces the object (PUT, so a field the runtime no longer
  sets goes too, with the listed resourceVersion as precondition). The name, selector and service
  of one runtime never change, as the API server refuses changing them; should it refuse a
  replacement that changes one anyway (an older controller's selector), the StatefulSet is
  deleted and created again; any other refused replacement leaves the running one as it was,
  with an Event. Replicas alone change by a merge patch.
- **Autoscalers**: a runtime annotated ``serving.kserve.io/autoscalerClass`` (an HPA or KEDA
  owns its replicas: deploy/autoscaling) is created with its replicas and never scaled here,
  but for scale to zero with ``hpa`` (mesh.controller.runtime_pods, *HPAs*).

**Passes** run on a change of the catalog's or the usage's ``version`` (polled every ``poll_s``),
every ``controller.resync_s``, and when an idle runtime's grace period ends; the first waits for
``ready`` (the runtimes listed, the first reconciles done), since an empty catalog would delete
every StatefulSet. A failed API call is logged, the rest of the pass goes on, and the pass is run
again after a back-off (``controller.backoff_max_s``); nothing here stops the controller.

What the objects are (the pod, the adapter's settings, names, the HPA): :mod:`mesh.controller.runtime_pods`.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

import structlog

from mesh.controller.kube import EventApi, HpaApi, Refused, WorkloadApi
from mesh.controller.queue import Backoff
from mesh.controller.runtime_pods import (
    AUTOSCALER_ANNOTATION,
    CONTROLLER,
    HASH_ANNOTATION,
    HPA_CLASS,
    MANAGED_BY,
    REF_ANNOTATION,
    SELECTOR,
    autoscaler_class,
    full_replicas,
    invalid_event,
    quantity_bytes,
    render_hpa,
    render_workload,
    spec_hash,
    workload_name,
)
from mesh.controller.runtimes import InvalidRuntime, RuntimeCatalog, ServingRuntime
from mesh.errors import InvalidArgument, MeshError
from mesh.settings import ControllerSettings

log = structlog.get_logger(__name__)


def _first_line(exc: BaseException) -> str:
    return (f"{type(exc).__name__}: {exc}".splitlines() or [""])[0][:300]


# StatefulSet fields the API server does not change in place: a replace that changes one is
# refused (422) and needs a delete and a create; any other 422 is an invalid change.
_IMMUTABLE = ("selector", "serviceName", "podManagementPolicy", "volumeClaimTemplates")


def _immutable_changed(live: Mapping[str, Any], body: Mapping[str, Any]) -> bool:
    if body.get("kind") != "StatefulSet":
        return False
    old, new = live.get("spec") or {}, body.get("spec") or {}
    return any(old.get(f) != new.get(f) for f in _IMMUTABLE)


def _replicas(obj: Mapping[str, Any] | None) -> int:
    return int(((obj or {}).get("spec") or {}).get("replicas") or 0)


class RuntimeUsage:
    """Which runtime (``ServingRuntime.ref``) each reconciled object's model was sent to; ``version``
    moves when a runtime starts or stops being used."""

    def __init__(self) -> None:
        self._refs: dict[Hashable, str] = {}
        self._counts: dict[str, int] = {}
        self.version = 0

    def set(self, key: Hashable, ref: str | None) -> None:
        old = self._refs.pop(key, None)
        if old == ref:
            if ref is not None:
                self._refs[key] = ref
            return
        if old is not None:
            self._counts[old] -= 1
            if not self._counts[old]:
                del self._counts[old]
                self.version += 1
        if ref is not None:
            self._refs[key] = ref
            self._counts[ref] = self._counts.get(ref, 0) + 1
            if self._counts[ref] == 1:
                self.version += 1

    def count(self, ref: str) -> int:
        return self._counts.get(ref, 0)


class WorkloadStore(Protocol):
    """The StatefulSets this controller manages in one namespace (blocking: run in threads)."""

    def list(self) -> list[dict[str, Any]]: ...

    def create(self, body: dict[str, Any]) -> None: ...

    def replace(self, name: str, body: dict[str, Any]) -> None: ...

    def scale(self, name: str, replicas: int) -> None: ...

    def delete(self, name: str, uid: str) -> None: ...


class HpaStore(Protocol):
    """The HorizontalPodAutoscalers this controller manages in one namespace (blocking)."""

    def list(self) -> list[dict[str, Any]]: ...

    def create(self, body: dict[str, Any]) -> None: ...

    def replace(self, name: str, body: dict[str, Any]) -> None: ...

    def delete(self, name: str, uid: str) -> None: ...


class EventSink(Protocol):
    def create(self, namespace: str, body: dict[str, Any]) -> None: ...


class Workloads:
    """Keeps one StatefulSet per runtime in use (module docstring); :meth:`run` is the root task."""

    def __init__(self, settings: ControllerSettings, store: WorkloadStore, events: EventSink,
                 catalog: RuntimeCatalog, usage: RuntimeUsage, *, namespace: str, hpas: HpaStore,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 poll_s: float = 1.0, ready: Sequence[asyncio.Event] = ()) -> None:
        self.settings, self.store, self.events, self.hpas = settings, store, events, hpas
        self.catalog, self.usage, self.namespace = catalog, usage, namespace
        self.clock, self.wall, self.poll_s, self.ready = clock, wall, poll_s, ready
        self.backoff = Backoff(0.5, settings.backoff_max_s)
        self.idle_since: dict[str, float] = {}  # runtime ref -> when its last model went
        self._warned: dict[tuple[str, str], tuple[int, str]] = {}  # (namespace, name) -> (generation, message)
        self._foreign: set[tuple[str, str]] = set()  # (kind, name) taken by objects not ours (told once)
        self.passes = 0

    async def run(self) -> None:
        for event in self.ready:  # the catalog must be listed first: an empty one would delete everything
            await event.wait()
        while True:
            seen = (self.catalog.version, self.usage.version)
            ok = await self.reconcile()
            if ok:
                self.backoff.reset()
                deadline = self.clock() + self.settings.resync_s
                if (wake := self.next_deadline()) is not None:
                    deadline = min(deadline, wake)
            else:
                delay = self.backoff.next()
                log.info("runtime StatefulSets: retrying the failed calls", retry_in_s=delay)
                deadline = self.clock() + delay
            await self._wait(deadline, seen if ok else None)  # no early end during a back-off

    async def _wait(self, deadline: float, seen: tuple[int, int] | None) -> None:
        """Until ``deadline``, or until the catalog or usage version differs from ``seen``. Polled:
        neither calls back, and a pass per ``poll_s`` at most batches a burst of reconciles' changes."""
        while (now := self.clock()) < deadline:
            if seen is not None and seen != (self.catalog.version, self.usage.version):
                return
            await asyncio.sleep(min(self.poll_s, deadline - now))

    def next_deadline(self) -> float | None:
        """When the next idle runtime reaches the scale-to-zero grace period."""
        if not self.idle_since:
            return None
        return min(self.idle_since.values()) + self.settings.scale_to_zero_grace_s

    def replicas(self, runtime: ServingRuntime, live: Mapping[str, Any] | None,
                 hpa: Mapping[str, Any] | None = None) -> int:
        """How many pods ``runtime`` should have now (``live``: its StatefulSet, if it exists; ``hpa``:
        the HPA it should have), and keeps ``idle_since``: when a running runtime's last model went."""
        current = _replicas(live)
        full = full_replicas(runtime, self.settings)
        if live is not None and autoscaler_class(runtime) not in ("", HPA_CLASS):
            return current  # an autoscaler's
        if hpa is not None:  # the HPA's; from zero, the runtime's own count within the HPA's bounds
            full = current or min(max(full, hpa["spec"]["minReplicas"]), hpa["spec"]["maxReplicas"])
        if self.usage.count(runtime.ref) or not self.settings.scale_to_zero:
            self.idle_since.pop(runtime.ref, None)
            return full
        if live is None or not current:
            self.idle_since.pop(runtime.ref, None)  # never started, or at zero: nothing to wait for
            return 0
        idle = self.idle_since.setdefault(runtime.ref, self.clock())
        if self.clock() - idle >= self.settings.scale_to_zero_grace_s:
            return 0  # (kept until the StatefulSet is seen at zero: a failed scale does not restart the period)
        # Within the grace period: as it is. (The period starts when the controller first sees the
        # runtime unused: after a restart, a full grace period, never a scale-up.)
        return current

    async def reconcile(self) -> bool:
        """One pass over every runtime; False if an API call failed (retried after a back-off)."""
        self.passes += 1
        listed = await self._call(self.store.list)
        if listed is False:
            return False
        live = _ours(listed)
        # Not listed: which HPAs exist is unknown, so runtimes that want one wait for the next pass.
        listed_hpas = await self._call(self.hpas.list)
        hpas = None if listed_hpas is False else _ours(listed_hpas)
        keep: set[str] = set()
        success = hpas is not None
        runtimes = self.catalog.all()
        for runtime in runtimes:
            if runtime.disabled and not runtime.error:
                continue
            try:
                body = render_workload(runtime, self.settings, self.namespace)
            except Exception as exc:  # a runtime is anyone's text: whatever it breaks, it is its own failure
                why = str(exc) if isinstance(exc, InvalidRuntime) else f"cannot be run: {_first_line(exc)}"
                success = await self._warn(runtime, why) and success
                if runtime.namespace in ("", self.namespace) and workload_name(runtime) in live:
                    keep.add(workload_name(runtime))  # a bad edit leaves what runs as it was
                continue
            name = body["metadata"]["name"]
            if name not in live and not self.usage.count(runtime.ref):
                continue  # never used: nothing to run
            keep.add(name)
            hpa = None
            if autoscaler_class(runtime) == HPA_CLASS:
                try:
                    hpa = render_hpa(runtime, self.settings, body)
                except InvalidRuntime as exc:
                    success = await self._warn(runtime, str(exc), "ServingRuntime: no HPA") and success
                if hpa is not None and hpas is None:
                    continue
            live_hpa = (hpas or {}).get(name)
            success = await self._apply(runtime, body, live.get(name), hpa, live_hpa) and success
        running = {r.ref for r in runtimes if workload_name(r) in keep}
        self.idle_since = {ref: t for ref, t in self.idle_since.items() if ref in running}
        known = {(r.namespace, r.name) for r in runtimes}
        self._warned = {k: v for k, v in self._warned.items() if k in known}
        for name, obj in (hpas or {}).items():
            if name not in keep:  # before its StatefulSet
                success = await self._delete_hpa(obj, "runtime gone, disabled or invalid") and success
        for name, obj in live.items():
            if name not in keep:
                log.info("runtime gone, disabled or invalid: deleting its StatefulSet", statefulset=name,
                         runtime=(obj["metadata"].get("annotations") or {}).get(REF_ANNOTATION, ""))
                deleted = await self._call(self.store.delete, name, str(obj["metadata"].get("uid") or ""))
                success = deleted is not False and success
        return success

    async def _apply(self, runtime: ServingRuntime, body: dict[str, Any], live: Mapping[str, Any] | None,
                     hpa: dict[str, Any] | None, live_hpa: Mapping[str, Any] | None) -> bool:
        """The StatefulSet and, with ``hpa``, its HPA: an HPA goes before the StatefulSet is scaled by
        the controller (to zero, or when it is no longer wanted) and comes after it has pods."""
        name = body["metadata"]["name"]
        replicas = self.replicas(runtime, live, hpa)
        body["spec"]["replicas"] = replicas
        if live_hpa is not None and (hpa is None or not replicas):
            why = "scaling the runtime to zero" if hpa is not None else f"no valid {AUTOSCALER_ANNOTATION}: hpa"
            if not await self._delete_hpa(live_hpa, why):
                return False
        if not await self._apply_workload(runtime, body, live, replicas):
            return False
        if hpa is None or not replicas or ("StatefulSet", name) in self._foreign:
            return True  # (never an HPA on another's StatefulSet)
        if live_hpa is None:
            log.info("creating the runtime's HPA", runtime=runtime.ref, hpa=name)
        return await self._put(runtime, hpa, live_hpa, self.hpas) is not False

    async def _put(self, runtime: ServingRuntime, body: dict[str, Any], live: Mapping[str, Any] | None,
                   store: WorkloadStore | HpaStore) -> bool | None:
        """Creates or replaces ``body`` unless ``live`` has its hash (then None)."""
        if live is not None and (live["metadata"].get("annotations") or {}).get(HASH_ANNOTATION) == spec_hash(body):
            return None
        if live is not None:
            log.info(f"runtime changed: replacing its {body['kind']}", runtime=runtime.ref,
                     name=body["metadata"]["name"])
        return await self._write(runtime, body, live, store)

    async def _apply_workload(self, runtime: ServingRuntime, body: dict[str, Any], live: Mapping[str, Any] | None,
                              replicas: int) -> bool:
        name = body["metadata"]["name"]
        if live is None:
            log.info("creating runtime StatefulSet", runtime=runtime.ref, statefulset=name, replicas=replicas)
        if (written := await self._put(runtime, body, live, self.store)) is not None:
            return written
        assert live is not None
        if _replicas(live) != replicas:
            log.info("scaling runtime", runtime=runtime.ref, statefulset=name, replicas=replicas,
                     reason="in use" if replicas else f"no model for {self.settings.scale_to_zero_grace_s:g} s")
            return await self._call(self.store.scale, name, replicas) is not False
        return True

    async def _write(self, runtime: ServingRuntime, body: dict[str, Any], live: Mapping[str, Any] | None,
                     store: WorkloadStore | HpaStore) -> bool:
        """Create (``live`` None) or replace; a refusal is the runtime's to fix (an Event), an
        object of another's in the way, or a field the API server does not change in place."""
        name, kind = body["metadata"]["name"], body["kind"]
        try:
            if live is None:
                await asyncio.to_thread(store.create, body)
            else:
                body["metadata"]["resourceVersion"] = live["metadata"].get("resourceVersion")
                await asyncio.to_thread(store.replace, name, body)
        except Exception as exc:
            if not isinstance(exc, MeshError):  # the client's own model check (a field of the wrong shape)
                return await self._warn(runtime, f"its {kind} cannot be written: {_first_line(exc)}")
            status = exc.status if isinstance(exc, Refused) else 0
            if status == 409 and live is None:
                if (kind, name) not in self._foreign:  # exists, yet not listed as ours: not ours to change
                    log.warning(f"a {kind} that the controller does not manage has the name this runtime's "
                                "needs; left alone", runtime=runtime.ref, name=name)
                    self._foreign.add((kind, name))
                return True
            if status == 422 and live is not None and _immutable_changed(live, body):
                log.warning(f"the API server refused to change the {kind} in place; deleting it to create "
                            "it again", name=name, error=exc.message)
                await self._call(store.delete, name, str(live["metadata"].get("uid") or ""))
                return False  # created again after the back-off
            if status == 422 and live is not None:  # an invalid change: what runs stays as it was
                return await self._warn(runtime, f"the API server refused the change to its {kind} (the "
                                        f"running one is left as it was): {exc.message}")
            if status == 422:
                return await self._warn(runtime, f"the API server refused its {kind}: {exc.message}")
            log.warning("Kubernetes API call failed", error=exc.message)
            return False
        self._foreign.discard((kind, name))
        return True

    async def _delete_hpa(self, live: Mapping[str, Any], why: str) -> bool:
        meta = live["metadata"]
        log.info(f"{why}: deleting the runtime's HPA", hpa=meta["name"],
                 runtime=(meta.get("annotations") or {}).get(REF_ANNOTATION, ""))
        return await self._call(self.hpas.delete, meta["name"], str(meta.get("uid") or "")) is not False

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in a thread; False (logged: the error names the call) if it failed."""
        try:
            return await asyncio.to_thread(fn, *args)
        except MeshError as exc:
            log.warning("Kubernetes API call failed", error=exc.message)
            return False

    async def _warn(self, runtime: ServingRuntime, message: str, what: str = "invalid ServingRuntime: not run") -> bool:
        """One Warning Event per generation (and message) of an invalid runtime (or annotation)."""
        key = (runtime.namespace, runtime.name)
        if self._warned.get(key) == (runtime.generation, message):
            return True
        log.warning(what, runtime=runtime.describe(), error=message)
        body = invalid_event(runtime, message, self.namespace, datetime.fromtimestamp(self.wall(), UTC))
        if await self._call(self.events.create, body["metadata"]["namespace"], body) is False:
            return False
        self._warned[key] = (runtime.generation, message)
        return True


def _ours(listed: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """By name, the listed objects that carry our managed-by label (never another's)."""
    return {o["metadata"]["name"]: o for o in listed
            if (o["metadata"].get("labels") or {}).get(MANAGED_BY) == CONTROLLER}


def workload_namespace(settings: ControllerSettings) -> str:
    namespace = settings.workload_namespace or os.environ.get("POD_NAMESPACE", "") or settings.namespace
    if not namespace:
        raise InvalidArgument("controller.manage_runtimes needs controller.workload_namespace (or POD_NAMESPACE, "
                              "or controller.namespace): where the runtimes' StatefulSets go")
    return namespace


async def run_workloads(settings: ControllerSettings, client: Any, catalog: RuntimeCatalog, usage: RuntimeUsage,
                        *, ready: Sequence[asyncio.Event] = ()) -> None:
    """Root task: the runtimes' StatefulSets, through ``client`` (a ``kubernetes`` ApiClient)."""
    namespace = workload_namespace(settings)
    log.info("managing runtime StatefulSets", namespace=namespace, pods_per_runtime=settings.pods_per_runtime,
             scale_to_zero=settings.scale_to_zero)
    await Workloads(settings, WorkloadApi(client, namespace, SELECTOR), EventApi(client), catalog, usage,
                    namespace=namespace, hpas=HpaApi(client, namespace, SELECTOR), ready=ready,
                    poll_s=min(1.0, settings.resync_s)).run()


__all__ = ["HpaStore", "RuntimeUsage", "Workloads", "autoscaler_class", "full_replicas", "invalid_event",
           "quantity_bytes", "render_hpa", "render_workload", "run_workloads", "spec_hash", "workload_name"]
