"""The router's in-memory view of the cluster, fed by registry watches.

Mirrored in full: instances, placements (one per loaded copy), vModels and load-failure records.
All are bounded by what is *loaded* or aliased, not by what is registered, so router memory grows
with loaded models. Model registrations are not mirrored (see ``SpecCache``).

The hot path reads only this view: no registry call is made to route a request for a loaded
model. The view may be a little stale; the data plane's retries absorb that (a copy evicted a moment
ago answers "not here" and the next choice is tried).

Inference graphs (``graphs/``) are mirrored too, each parsed once per change into a checked
``mesh.graphs.spec.Graph``: a request naming a graph reads the parsed graph from here, with no
registry read and no parsing per request. A stored spec that no longer parses (written by hand,
or by an older version with other rules) is dropped from the view and logged: requests naming it
answer NOT_FOUND as for an undefined graph, rather than running something half-checked.

Local state that no other router needs: the number of requests this router has in flight to each
instance, for least-loaded choices among copies.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import structlog

from mesh.errors import MeshError
from mesh.graphs.spec import Graph, parse_graph
from mesh.registry.base import KeyValue
from mesh.registry.keys import Keys
from mesh.registry.records import FailureRecord, GraphRecord, InstanceRecord, PlacementRecord, VModelRecord

log = structlog.get_logger(__name__)


class ClusterView:
    def __init__(self, keys: Keys) -> None:
        self.keys = keys
        self.instances: dict[str, InstanceRecord] = {}
        self.placements: dict[str, dict[str, PlacementRecord]] = {}
        self.vmodels: dict[str, VModelRecord] = {}
        self.failures: dict[str, dict[str, FailureRecord]] = {}
        self.graphs: dict[str, Graph] = {}  # parsed once per change (module docstring)
        self.inflight: defaultdict[str, int] = defaultdict(int)
        # Instances that did not answer at the connection level, for every request until a probe
        # gets an answer or their lease expires (``mesh.router.reachability``).
        self.unreachable: set[str] = set()
        self.version = 0  # bumped on every change; lets callers cache derived data
        # Called with the record of an instance that left (to close connections to it).
        self.on_instance_gone: list[Callable[[InstanceRecord], None]] = []
        self.duplicates: set[str] = set()  # instance IDs seen written by two processes (logged once)
        # Traffic splits (``mesh.router.split``): inference requests routed per vModel with a
        # split, per target (mesh_vmodel_requests_total), counted only with ``count_splits`` (the
        # router's per_model_metrics); only vModels that have a split: pruned when the split goes.
        self.split_requests: dict[str, dict[str, int]] = {}
        self.count_splits = False
        # What changed for the route stream (mesh.router.routes.RouteHub), only while it tracks
        # (a stream is open): models whose placements changed, instances whose routing fields
        # (direct port, shutting down, reachability, presence) changed. A set.add per change; the
        # hub takes and empties them when it refreshes.
        self.track_routes = False
        self.changed_models: set[str] = set()
        self.changed_instances: set[str] = set()

    # --- feeding from mirrors -----------------------------------------------------------------
    def put_instance(self, kv: KeyValue) -> None:
        record = InstanceRecord.from_json(kv.value)
        old = self.instances.get(record.instance_id)
        if old is not None and (old.endpoint, old.started_ms) != (record.endpoint, record.started_ms) \
                and record.instance_id not in self.duplicates:
            # Two live processes writing one instance key (a copied instance ID): each overwrites
            # the other's record, and placements cannot be told apart. Runtimes refuse to start
            # with an ID in use (mesh.runtime.app); this catches the ones that raced.
            self.duplicates.add(record.instance_id)
            log.error("two runtimes share one instance ID; give each its own runtime.instance_id",
                      instance_id=record.instance_id, endpoints=sorted({old.endpoint, record.endpoint}))
        self.instances[record.instance_id] = record
        self.version += 1
        if self.track_routes and (old is None or (old.direct_endpoint, old.direct_tls, old.shutting_down)
                                  != (record.direct_endpoint, record.direct_tls, record.shutting_down)):
            self.changed_instances.add(record.instance_id)

    def delete_instance(self, key: str) -> None:
        instance_id = key[len(self.keys.instances):]
        record = self.instances.pop(instance_id, None)
        self.inflight.pop(instance_id, None)
        self.unreachable.discard(instance_id)
        self.version += 1
        if self.track_routes:
            self.changed_instances.add(instance_id)
        if record is not None and not any(r.endpoint == record.endpoint for r in self.instances.values()):
            for callback in self.on_instance_gone:
                try:
                    callback(record)
                except Exception:
                    log.exception("instance-gone callback failed", instance_id=instance_id)


    def put_placement(self, kv: KeyValue) -> None:
        record = PlacementRecord.from_json(kv.value)
        self.placements.setdefault(record.model_id, {})[record.instance_id] = record
        self.version += 1
        if self.track_routes:
            self.changed_models.add(record.model_id)

    def delete_placement(self, key: str) -> None:
        model_id, instance_id = Keys.split_pair(key, self.keys.placements)
        copies = self.placements.get(model_id)
        if copies is not None:
            copies.pop(instance_id, None)
            if not copies:
                del self.placements[model_id]
        self.version += 1
        if self.track_routes:
            self.changed_models.add(model_id)


    def put_vmodel(self, kv: KeyValue) -> None:
        record = VModelRecord.from_json(kv.value)
        self._unsplit(self.vmodels.get(record.vmodel_id), record)
        self.vmodels[record.vmodel_id] = record
        self.version += 1

    def delete_vmodel(self, key: str) -> None:
        self._unsplit(self.vmodels.pop(Keys.model_id_of(key, self.keys.vmodels), None), None)
        self.version += 1

    def _unsplit(self, old: VModelRecord | None, new: VModelRecord | None) -> None:
        """Forget what a vModel's previous record added to the split state, keeping the request
        counts of the targets the new record still routes to."""
        if old is None:
            return
        counts = self.split_requests.get(old.vmodel_id)
        if counts is not None:
            keep = new.models() if new is not None and new.split else set()
            for model_id in [m for m in counts if m not in keep]:
                del counts[model_id]
            if not counts:
                del self.split_requests[old.vmodel_id]

    def count_split_request(self, vmodel_id: str, model_id: str) -> None:
        counts = self.split_requests.get(vmodel_id)
        if counts is None:
            counts = self.split_requests[vmodel_id] = {}
        counts[model_id] = counts.get(model_id, 0) + 1


    def put_graph(self, kv: KeyValue) -> None:
        record = GraphRecord.from_json(kv.value)
        try:
            graph = parse_graph(record.graph_id, record.spec)
        except MeshError as exc:
            self.graphs.pop(record.graph_id, None)
            log.error("stored inference graph does not parse; requests for it answer NOT_FOUND",
                      graph_id=record.graph_id, error=exc.message)
        else:
            self.graphs[record.graph_id] = graph
        self.version += 1

    def delete_graph(self, key: str) -> None:
        self.graphs.pop(Keys.model_id_of(key, self.keys.graphs), None)
        self.version += 1

    def set_graph(self, graph: Graph) -> None:
        """A graph this router just defined (the watch will confirm): its own next request sees it."""
        self.graphs[graph.graph_id] = graph
        self.version += 1

    def forget_graph(self, graph_id: str) -> None:
        """Drop a graph this router just deleted (the watch will confirm)."""
        if self.graphs.pop(graph_id, None) is not None:
            self.version += 1


    def put_failure(self, kv: KeyValue) -> None:
        self.add_failure(FailureRecord.from_json(kv.value))

    def add_failure(self, record: FailureRecord) -> None:
        """Also this router's own crash records, taken before its watch brings them back."""
        self.failures.setdefault(record.model_id, {})[record.instance_id] = record
        self.version += 1

    def delete_failure(self, key: str) -> None:
        model_id, instance_id = Keys.split_pair(key, self.keys.failures)
        records = self.failures.get(model_id)
        if records is not None:
            records.pop(instance_id, None)
            if not records:
                del self.failures[model_id]
        self.version += 1


    def forget_copy(self, model_id: str, instance_id: str) -> None:
        """Drop a copy that its instance says it no longer holds (the watch will confirm)."""
        copies = self.placements.get(model_id)
        if copies is not None and copies.pop(instance_id, None) is not None:
            if not copies:
                del self.placements[model_id]
            self.version += 1
            if self.track_routes:
                self.changed_models.add(model_id)

    def forget_vmodel(self, vmodel_id: str) -> None:
        """Drop a vModel this router just deleted (the watch will confirm)."""
        old = self.vmodels.pop(vmodel_id, None)
        if old is not None:
            self._unsplit(old, None)
            self.version += 1

    def mark_unreachable(self, instance_id: str) -> bool:
        """Route around ``instance_id`` (``mesh.router.reachability``); False if it is unknown or
        already marked."""
        if instance_id not in self.instances or instance_id in self.unreachable:
            return False
        self.unreachable.add(instance_id)
        self.version += 1
        if self.track_routes:
            self.changed_instances.add(instance_id)
        return True

    def mark_reachable(self, instance_id: str) -> None:
        if instance_id in self.unreachable:
            self.unreachable.discard(instance_id)
            self.version += 1
            if self.track_routes:
                self.changed_instances.add(instance_id)

    # --- this router's requests in flight (least-loaded choices) ------------------------------
    def begin_request(self, instance_id: str) -> None:
        self.inflight[instance_id] += 1

    def end_request(self, instance_id: str) -> None:
        self.inflight[instance_id] -= 1

    # --- queries ------------------------------------------------------------------------------
    def live_instance(self, instance_id: str) -> InstanceRecord | None:
        record = self.instances.get(instance_id)
        if record is None or record.shutting_down:
            return None
        return record

    def reachable(self, instance_id: str) -> bool:
        return instance_id not in self.unreachable

    def copies(self, model_id: str) -> dict[str, PlacementRecord]:
        return self.placements.get(model_id, {})

    def resolve_vmodel(self, vmodel_id: str) -> str | None:
        record = self.vmodels.get(vmodel_id)
        return record.active_model_id if record else None

    def referrers(self, model_id: str) -> list[str]:
        """vModels whose active, target or split target is ``model_id``."""
        return [v.vmodel_id for v in self.vmodels.values() if model_id in v.models()]
