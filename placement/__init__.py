"""The placement engine: pure decisions about where models go and which ones leave.

No I/O lives here: no grpc, etcd, Kubernetes or asyncio, and no clock (time is passed in as ``now``,
seconds). The router and the runtime (``mesh/``) feed these functions and classes their view of the
cluster and act on the answers; that split lets the policies be simulated and property-tested alone.

- ``hashing``: rendezvous hashing with bounded load (the home of a cold model, the order of its copies).
- ``policy``: the eviction policy Protocol and the registry of policies by name.
- ``lru``: ModelMesh's LRU by explicit last-used timestamps, weighted by bytes.
- ``sizing``: the in-memory size of a model before its load, learned per model type.
"""

from placement.hashing import Candidate, choose_home, copy_order, hrw_weight, rendezvous_order
from placement.lru import LRUPolicy
from placement.policy import EvictionPolicy, make_policy, policy_names
from placement.sizing import SizeEstimator

__all__ = [
    "Candidate",
    "EvictionPolicy",
    "LRUPolicy",
    "SizeEstimator",
    "choose_home",
    "copy_order",
    "hrw_weight",
    "make_policy",
    "policy_names",
    "rendezvous_order",
]
