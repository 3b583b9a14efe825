"""Per-token quotas hold under a burst: concurrent registrations through one router are checked
and written one at a time per token, so they cannot all read the same count and all pass.

The real ``Management`` and ``Registry`` on the in-memory store, whose reads are made to take
10 ms as a network round trip to etcd does (the store itself answers at once, so without the
delay the calls would never interleave).
"""

from __future__ import annotations

import asyncio

from mesh.auth import Principal, set_caller
from mesh.errors import ResourceExhausted
from mesh.registry.memory import MemoryStore
from mesh.registry.registry import Registry
from mesh.router.management import Management, ModelInfoData
from mesh.router.view import ClusterView


class RoundTrips(MemoryStore):
    async def get(self, key):  # type: ignore[no-untyped-def]
        found = await super().get(key)
        await asyncio.sleep(0.01)
        return found

    async def count_prefix(self, prefix):  # type: ignore[no-untyped-def]
        found = await super().count_prefix(prefix)
        await asyncio.sleep(0.01)
        return found


async def test_a_burst_of_registrations_stays_within_the_tokens_quotas() -> None:
    registry = Registry(RoundTrips())
    management = Management(registry=registry, view=ClusterView(registry.keys), runtimes=None, load_factor=1.0)
    tenant = Principal(name="team-a", role="write", prefixes=("team-a/",), max_models=3, max_pinned_copies=4)

    async def register(i: int, copies: int) -> bool:
        set_caller(tenant)  # each task has its own context, as each call does
        spec = management._spec(f"team-a/m{i}", ModelInfoData(type="sklearn", path="/m/x.joblib", min_copies=copies),
                                load_now=False, last_used_ms=0)
        try:
            await management._register(spec)
        except ResourceExhausted:
            return False
        return True

    accepted = await asyncio.gather(*(register(i, 2) for i in range(20)))
    assert sum(accepted) == 2  # two pin 4 copies; the third would pin 6
    accepted = await asyncio.gather(*(register(100 + i, 0) for i in range(20)))
    assert sum(accepted) == 1  # the third model; then max_models
    assert await registry.store.count_prefix(registry.keys.model("team-a/")) == 3
    assert sum((await registry.pinned_models()).values()) == 4
