"""gRPC edge of the fleet status (mmesh.ModelMeshStatus): protobuf <-> ``mesh.router.fleet``.

Authorized by the router's interceptor like listModels (role read, ``mesh.auth.READ_METHODS``);
the caller it found (``current_caller``) scopes what is shown (``mesh.router.fleet``).
"""

from __future__ import annotations

import time

import grpc

from mesh.auth import current_caller
from mesh.errors import BadRecord, InvalidArgument
from mesh.gen.mmesh import status_pb2 as st
from mesh.gen.mmesh import status_pb2_grpc as st_grpc
from mesh.ids import check_model_id
from mesh.registry.records import FailureRecord
from mesh.registry.registry import Registry
from mesh.router.fleet import Counters, FailureView, Fleet
from mesh.transport.status import handled

ORIGIN = "router"


def _counters(c: Counters) -> st.FleetCounters:
    return st.FleetCounters(requests=c.requests, hits=c.hits, misses=c.misses, loads=c.loads,
                            loadFailures=c.load_failures, evictions=c.evictions)


def _failure(f: FailureView) -> st.FailureInfo:
    r = f.record
    return st.FailureInfo(modelId=r.model_id, instanceId=r.instance_id, reason=r.reason, timeMs=r.time_ms,
                          expiresMs=f.expires_ms, kind=r.kind)


class StatusServicer(st_grpc.ModelMeshStatusServicer):
    def __init__(self, fleet: Fleet, registry: Registry) -> None:
        self._fleet = fleet
        self._registry = registry

    @handled(ORIGIN)
    async def getFleetStatus(self, request: st.FleetStatusRequest,
                             context: grpc.aio.ServicerContext) -> st.FleetStatus:
        report = self._fleet.report(current_caller(), top=request.topModels, max_failures=request.maxFailures)
        r = report.router
        out = st.FleetStatus(
            router=st.RouterStatus(version=r.version, startedMs=r.started_ms, ready=r.not_ready is None,
                                   notReady=r.not_ready or "", registryConnected=r.registry_connected,
                                   inflight=r.inflight),
            modelsLoaded=report.models_loaded, copiesLoaded=report.copies_loaded,
            copiesLoading=report.copies_loading, modelsFailing=report.models_failing,
            total=_counters(report.total), window=_counters(report.window), windowS=round(report.window_s, 3),
            timeMs=report.time_ms, scoped=report.scoped)
        for i in report.instances:
            rec = i.record
            out.instances.add(
                instanceId=rec.instance_id, endpoint=rec.endpoint, version=rec.version, zone=rec.zone,
                labels=list(rec.labels), startedMs=rec.started_ms, state=i.state,
                devices=[st.DeviceUse(device=d.device, capacityBytes=d.capacity_bytes, usedBytes=d.used_bytes,
                                      copies=d.copies) for d in i.devices],
                loadedCopies=i.loaded, loadingCopies=i.loading, rateRps=0.0 if report.scoped else rec.rate_rps,
                inflight=i.inflight, total=_counters(i.counters))
        for h in report.hottest:
            out.hottest.add(modelId=h.model_id, rateRps=h.rate_rps, copies=h.copies, inflight=h.inflight)
        out.failures.extend(_failure(f) for f in report.failures)
        return out

    @handled(ORIGIN)
    async def getModelCopies(self, request: st.ModelCopiesRequest,
                             context: grpc.aio.ServicerContext) -> st.ModelCopies:
        if not request.modelId:
            raise InvalidArgument("no modelId given")
        model_id = check_model_id(request.modelId)
        # The interceptor checked modelId against the caller's prefixes. One registry read: which
        # failure records carry a lease (they expire) and which do not (a crash quarantine kept
        # until the model is unregistered); the view has the records but not their leases.
        leases: dict[str, bool] = {}
        if self._fleet.view.failures.get(model_id):
            kvs, _ = await self._registry.store.get_prefix(self._registry.keys.failures_of(model_id))
            for kv in kvs:
                try:
                    leases[FailureRecord.from_json(kv.value).instance_id] = kv.lease != 0
                except BadRecord:  # the view skipped it too
                    continue
        copies, failures = self._fleet.copies(model_id, leases)
        out = st.ModelCopies(modelId=model_id, timeMs=int(time.time() * 1000),
                             lastRequestMs=self._fleet.last_request_ms(model_id))
        for c in copies:
            out.copies.add(instanceId=c.instance_id, endpoint=c.endpoint, state=c.state, device=c.device,
                           sizeBytes=c.size_bytes, stateMs=c.state_ms, lastUsedMs=c.last_used_ms,
                           loadMs=c.load_ms)
        out.failures.extend(_failure(f) for f in failures)
        return out
