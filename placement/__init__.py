"""The placement engine: pure decisions about where models go and which ones leave.

No I/O lives here: no grpc, etcd, Kubernetes or asyncio, and no clock (time is passed in as ``now``,
seconds). The router and the runtime (``mesh/``) feed these functions and classes their view of the
cluster and act on the answers; that split lets the policies be simulated and property-tested alone.

- ``hashing``: rendezvous hashing with bounded load (the home of a cold model, the order of its copies).
- ``policy``: the eviction policy Protocol and the registry of policies by name.
- ``lru``: ModelMesh's LRU by explicit last-used timestamps, weighted by bytes.
- ``sizing``: the in-memory size of a model before its load, learned per model type.
- ``gdsf``, ``s3fifo``, ``sieve``: further eviction policies; ``admission``: TinyLFU and churn-guard
  filters that wrap any policy (registered as ``<policy>+tinylfu`` / ``<policy>+churnguard``).
- ``belady``: offline references (exact Belady/MIN for uniform sizes; Belady-Size heuristic and the
  PFOO-L lower bound for variable sizes and costs).
- ``scaling``: when a hot model gets another copy and when an extra copy gives way.
- ``request``, ``traces``, ``generators``: the trace record, its CSV format, and workload generators.
"""

from placement.hashing import Candidate, choose_home, copy_order, hrw_weight, rendezvous_order
from placement.lru import LRUPolicy
from placement.policy import EvictionPolicy, make_policy, policy_names
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
    "ScalingConfig",
    "ScalingPolicy",
    "SizeEstimator",
    "choose_home",
    "copy_order",
    "hrw_weight",
    "make_policy",
    "policy_names",
    "rendezvous_order",
]
