"""`mesh model load --retry` forgets a model's load failures, but a tenant's retry keeps a crash
quarantine: one call each would let a tenant kill a shared runtime again and again (the attacker
review of issue 20 killed a runtime twice, failing another tenant's 347 requests). An operator's
token (no prefixes) lifts it. The real Management and Registry on the in-memory store."""

from __future__ import annotations

import pytest

from mesh.auth import Principal, set_caller
from mesh.errors import FailedPrecondition
from mesh.registry.base import KeyValue
from mesh.registry.memory import MemoryStore
from mesh.registry.records import CRASH, DeviceUsage, FailureRecord, InstanceRecord
from mesh.registry.registry import Registry
from mesh.router.management import Management, ModelInfoData
from mesh.router.view import ClusterView


async def _mesh_with_a_quarantined_model() -> tuple[Registry, ClusterView, Management]:
    registry = Registry(MemoryStore())
    view = ClusterView(registry.keys)
    view.instances["rt-0"] = InstanceRecord(instance_id="rt-0", endpoint="127.0.0.1:1",
                                            devices=(DeviceUsage("ram", 1 << 30, 0),), supported_types=("sklearn",))
    management = Management(registry=registry, view=view, runtimes=None, load_factor=1.0)
    spec = management._spec("team-a/bad", ModelInfoData(type="sklearn", path="/m/x.joblib"), load_now=False,
                            last_used_ms=0)
    await management._register(spec)
    for record in (FailureRecord(model_id="team-a/bad", instance_id="rt-0", reason="died loading it", time_ms=1,
                                 kind=CRASH),
                   FailureRecord(model_id="team-a/bad", instance_id="rt-1", reason="bad file", time_ms=2)):
        key = registry.keys.failure(record.model_id, record.instance_id)
        await registry.store.put(key, record.to_json())
        view.put_failure(KeyValue(key, record.to_json(), 1))
    return registry, view, management


async def test_a_tenants_retry_keeps_the_crash_quarantine() -> None:
    registry, _, management = await _mesh_with_a_quarantined_model()
    set_caller(Principal(name="team-a", role="write", prefixes=("team-a/",)))
    with pytest.raises(FailedPrecondition, match="quarantined"):
        await management.ensure_loaded("team-a/bad", retry_failed=True)
    left = await registry.failures_of("team-a/bad")
    assert [(f.instance_id, f.kind) for f in left] == [("rt-0", CRASH)]  # the plain failure is forgotten


async def test_the_registry_clears_every_record_for_an_operator() -> None:
    registry, _, _ = await _mesh_with_a_quarantined_model()
    await registry.clear_failures("team-a/bad")
    assert await registry.failures_of("team-a/bad") == []
