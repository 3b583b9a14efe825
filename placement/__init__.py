"""The placement engine: pure decisions about where models go and which ones leave.

No I/O lives here: no grpc, etcd, Kubernetes or asyncio, and no clock (time is passed in as ``now``,
seconds). The router and the runtime (``mesh/``) feed these functions and classes their view of the
cluster and act on the answers; that split lets the policies be simulated and property-tested alone.

- ``kernel``: the decisions the router, the runtime and the simulator share (copy choice, home choice,
  scale-out target, admission and eviction), over plain inputs.
- ``hashing``: rendezvous hashing with bounded load (the home of a cold model, the order of its copies).
- ``policy``: the eviction policy Protocol; ``registry``: the policies by name (``make_policy``,
  ``build_policy``).
- ``lru``: ModelMesh's LRU by explicit last-used timestamps, weighted by bytes.
- ``sizing``: the in-memory size of a model before its load, learned per model type.
- ``gdsf``, ``s3fifo``, ``sieve``: further eviction policies; ``admission``: TinyLFU and churn-guard
  filters that wrap any policy (registered as ``<policy>+tinylfu`` / ``<policy>+churnguard``).
- ``belady``: offline references (exact Belady/MIN for uniform sizes; Belady-Size heuristic and the
  PFOO-L lower bound for variable sizes and costs).
- ``scaling``: when a hot model gets another copy and when an extra copy gives way.
- ``request``, ``traces``, ``generators``: the trace record, its CSV format, and workload generators.
- Simulation: ``replay`` (one cache), ``cluster`` (a router and runtime instances, deciding with
  ``kernel``), ``stats`` (what both report), ``offline`` (the Belady reference to compare with).
"""

from placement.hashing import Candidate, choose_home, copy_order, hrw_weight, rendezvous_order
from placement.kernel import Room, admission, choose_copy, copy_targets, make_room
from placement.lru import LRUPolicy
from placement.policy import EvictionPolicy
from placement.registry import build_policy, make_policy, policy_names
from placement.request import Request
from placement.scaling import Decision, ModelRule, ScalingConfig, ScalingPolicy
from placement.sizing import SizeEstimator

__all__ = [
    "Candidate",
    "Decision",
    "EvictionPolicy",
    "LRUPolicy",
    "ModelRule",
    "Request",
    "Room",
    "ScalingConfig",
    "ScalingPolicy",
    "SizeEstimator",
    "admission",
    "build_policy",
    "choose_copy",
    "choose_home",
    "copy_order",
    "copy_targets",
    "hrw_weight",
    "make_policy",
    "make_room",
    "policy_names",
    "rendezvous_order",
]
