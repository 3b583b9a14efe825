"""Registry limits (issue 22, parts 4 and 6), the parts that need no real etcd: a full registry's
error reaches clients as RESOURCE_EXHAUSTED with its message (not hidden like an outage's), the etcd
the project starts takes a quota and extra flags and still compacts, and a router's start-up repair
of the vModel refs index writes only what is missing (one listing, not a round trip per vModel).
The behaviour against a real full etcd is tests/e2e/test_etcd_quota.py."""

from __future__ import annotations

from pathlib import Path

import grpc

from mesh.errors import RegistryFull
from mesh.registry.etcd_server import AUTO_COMPACTION, EtcdProcess
from mesh.registry.memory import MemoryStore
from mesh.registry.records import ModelSpec, VModelRecord
from mesh.registry.registry import Registry
from mesh.rest.status import http_error
from mesh.transport.status import status_of

FULL = ("etcd database space exceeded (database at its quota: 16.0 MiB): compact and defragment it and "
        "disarm its NOSPACE alarm, or raise --quota-backend-bytes")


def test_a_full_registry_is_resource_exhausted_with_its_reason_for_the_caller() -> None:
    assert status_of(RegistryFull(FULL)) == (grpc.StatusCode.RESOURCE_EXHAUSTED, FULL)
    assert http_error(RegistryFull(FULL)) == (429, "RESOURCE_EXHAUSTED", FULL)


def test_the_etcd_process_takes_a_quota_and_extra_flags_and_still_compacts(tmp_path: Path) -> None:
    command = EtcdProcess(tmp_path / "etcd", quota_bytes=16 * 2**20, extra_args=("--max-txn-ops", "1000"))._command()
    at = command.index("--auto-compaction-mode")
    assert tuple(command[at:at + 4]) == AUTO_COMPACTION
    assert command[command.index("--quota-backend-bytes") + 1] == str(16 * 2**20)
    assert command[-2:] == ["--max-txn-ops", "1000"]  # last: a flag given twice takes the later value
    assert "--quota-backend-bytes" not in EtcdProcess(tmp_path / "other")._command()  # etcd's default


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.creates = 0

    async def create(self, key: str, value: bytes, **kwargs: object) -> bool:  # type: ignore[override]
        self.creates += 1
        return await super().create(key, value, **kwargs)  # type: ignore[arg-type]


async def test_repairing_the_refs_index_writes_only_the_missing_refs() -> None:
    store = CountingStore()
    registry = Registry(store)
    for m in ("a", "b"):
        await registry.register_model(ModelSpec(model_id=m, type="sklearn", path=f"/{m}"))
    # One vModel written through the registry (refs included), one as an old version wrote it (no refs).
    assert await registry.put_vmodel(VModelRecord("with-refs", "a", "a"), expected_revision=None)
    await store.put(registry.keys.vmodel("legacy"), VModelRecord("legacy", "a", "b").to_json())
    store.creates = 0
    assert await registry.repair_refs() == 2  # legacy -> a, legacy -> b
    assert store.creates == 2
    assert await registry.referrers("b") == ["legacy"]
    assert sorted(await registry.referrers("a")) == ["legacy", "with-refs"]
    store.creates = 0
    assert await registry.repair_refs() == 0
    assert store.creates == 0  # nothing missing: no write at all
    await store.close()
