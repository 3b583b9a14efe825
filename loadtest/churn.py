"""A synthetic placement writer: the records runtimes publish when copies load and go, at a set rate.

``python -m loadtest.churn --registry etcd://HOST:PORT [--runtimes R] [--preload P] [--load-ms L]
[--grouped]``
(started by ``loadtest.scenarios.fanout``; it speaks JSON lines on stdin and stdout).

Why synthetic. Loading and evicting 500 real copies a second needs runtimes that load that fast and
cores to run them: two cores cannot hold the runtimes, the routers and etcd at once. What routers
see of a load is only its registry records, so this process writes exactly those, in the order and
with the grouping ``mesh.runtime.publisher.Publisher`` writes them, for ``R`` simulated runtime
instances:

* each instance has its own lease (``registry.lease_ttl_s``, 10 s, kept alive) and an
  ``instances/<iid>`` record like a runtime's (a direct port, so its copies are routes on the route
  stream; the address answers nothing: no inference is sent);
* a **load** of model ``m`` on instance ``i`` writes ``placements/m/i`` as ``LOADING`` at once
  (``Publisher.announce``), then ``LOADED`` ``--load-ms`` later;
* an **eviction** deletes ``placements/m/i``;
* ``LOADED`` puts and deletes go through a per-instance pending map flushed by one loop per
  instance, which then rewrites the instance record once (``Publisher._flush``): a burst becomes
  one write per model and one instance write. One lock per instance serialises its writes
  (``RegistrySession``).

Every write is one etcd request, as a runtime's (``--grouped``: a flush as one transaction, a
publisher change measured in BENCHMARKS.md section 23, not what runtimes do). Not simulated: the
refresh a runtime serving traffic makes of its instance record every ``publish_interval_s``; no
inference is sent here, and a real idle runtime makes none either. A churn event is a load or an eviction; events
alternate (load, evict, load, ...) so the number of loaded copies stays at ``--preload``. Loads
go round robin over the instances, each to a model ID never used before; evictions take the
oldest copy whose ``LOADED`` placement etcd holds (one due while there is none, the writer running
behind, is made when the next copy is published). So each model's route changes at most twice
(appears, then goes), seconds apart, and a route stream's updates can be matched to the write that
caused them without doubt.

Protocol. On start: the instances and ``P`` loaded copies are written, then one line
``{"ready": {...}}``. Then for each line ``{"rate": E, "seconds": D, "tag": T}`` read: ``E x D``
events are made on an open-loop schedule (event k is due at start + k / E, whether or not earlier
writes have returned), every write is waited for, and one line ``{"step": {...}}`` answers, with
each route change as ``[model, kind, instance, due, sent, acked]`` (``time.monotonic()`` seconds:
the system-wide clock, comparable across processes). EOF on stdin: the leases are revoked and the
process exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

from mesh import __version__
from mesh.registry import open_store
from mesh.registry.base import KVStore, Lease
from mesh.registry.keys import Keys
from mesh.registry.records import LOADED, LOADING, DeviceUsage, InstanceRecord, PlacementRecord

LEASE_TTL_S = 10  # registry.lease_ttl_s's default
MODEL_BYTES = 64 * 1024
CAPACITY_BYTES = 8 * 2**30
Change = list[Any]  # [model, "load" | "evict", instance, due, sent, acked]


@dataclass
class Instance:
    """One simulated runtime: its lease, record, copies, and the pending map its flush loop writes."""

    index: int
    record: InstanceRecord
    lease: Lease
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    pending: dict[str, tuple[PlacementRecord | None, float]] = field(default_factory=dict)  # model -> (record, due)
    copies: set[str] = field(default_factory=set)
    loads: int = 0
    evictions: int = 0


class Churn:
    def __init__(self, store: KVStore, keys: Keys, runtimes: int, load_ms: float, grouped: bool = False) -> None:
        self.store = store
        self.grouped = grouped
        self.keys = keys
        self.runtimes = runtimes
        self.load_s = load_ms / 1000
        self.instances: list[Instance] = []
        # Copies whose LOADED placement etcd holds, oldest first: (model, instance index). Only these
        # are evicted, so an eviction never overtakes its own load when the writer runs behind.
        self.loaded: deque[tuple[str, int]] = deque()
        # Evictions due while no copy was published yet (the writer behind): made as copies publish,
        # so that loads and evictions stay one for one and the number of copies stays put.
        self.owed: deque[float] = deque()
        self.changes: list[Change] = []
        self.writes = {"placement_put": 0, "placement_delete": 0, "instance_put": 0}
        self.write_s: list[float] = []  # round trips of route-changing writes
        self._flushers: list[asyncio.Task[None]] = []
        self._loads: set[asyncio.Task[None]] = set()

    # --- set-up -------------------------------------------------------------------------------
    async def start(self, preload: int) -> None:
        started = int(time.time() * 1000)
        for i in range(self.runtimes):
            iid = f"churn-{i:03d}"
            record = InstanceRecord(
                instance_id=iid, endpoint=f"127.0.0.1:{20000 + i}", direct_endpoint=f"127.0.0.1:{30000 + i}",
                devices=(DeviceUsage("ram", CAPACITY_BYTES, 0),), supported_types=("sklearn",),
                version=__version__, started_ms=started)
            instance = Instance(i, record, await self.store.grant_lease(LEASE_TTL_S))
            self.instances.append(instance)
            await self._put_instance(instance)
        for k in range(preload):  # preloaded copies: LOADED at once, not timed
            model, index = f"pre-{k:07d}", k % self.runtimes
            instance = self.instances[index]
            await self.store.put(self.keys.placement(model, instance.record.instance_id),
                                 self._placement(model, instance, LOADED).to_json(), lease=instance.lease)
            instance.copies.add(model)
            self.loaded.append((model, index))
        for instance in self.instances:
            await self._put_instance(instance)
        self._flushers = [asyncio.create_task(self._flush_loop(inst), name=f"churn-flush-{i}")
                          for i, inst in enumerate(self.instances)]
        self.changes.clear()
        self.write_s.clear()
        self.writes = dict.fromkeys(self.writes, 0)

    def _placement(self, model: str, instance: Instance, state: str) -> PlacementRecord:
        now_ms = int(time.time() * 1000)
        return PlacementRecord(model_id=model, instance_id=instance.record.instance_id, state=state,
                               size_bytes=MODEL_BYTES, loaded_ms=now_ms, last_used_ms=now_ms,
                               load_ms=self.load_s * 1000 if state == LOADED else 0.0)

    @staticmethod
    def _counted(instance: Instance) -> InstanceRecord:
        """The instance record with its figures now (what ``Publisher.instance_record`` refreshes)."""
        return replace(instance.record, model_count=len(instance.copies), loads=instance.loads,
                       evictions=instance.evictions,
                       devices=(DeviceUsage("ram", CAPACITY_BYTES, MODEL_BYTES * len(instance.copies)),))

    async def _put_instance(self, instance: Instance) -> None:
        instance.record = self._counted(instance)
        await self.store.put(self.keys.instance(instance.record.instance_id), instance.record.to_json(),
                             lease=instance.lease)
        self.writes["instance_put"] += 1

    # --- the runtime's publishing, per instance -------------------------------------------------
    async def _flush_loop(self, instance: Instance) -> None:
        """``Publisher.run``: wait for changes, write each pending model's latest state, then the
        instance record once."""
        while True:
            await instance.wake.wait()
            instance.wake.clear()
            if self.grouped:
                await self._flush_grouped(instance)
                continue
            async with instance.lock:
                wrote = False
                for model, entry in list(instance.pending.items()):
                    placement, due = entry
                    key = self.keys.placement(model, instance.record.instance_id)
                    sent = time.monotonic()
                    if placement is None:
                        await self.store.delete(key)
                        self.writes["placement_delete"] += 1
                    else:
                        await self.store.put(key, placement.to_json(), lease=instance.lease)
                        self.writes["placement_put"] += 1
                    acked = time.monotonic()
                    if placement is not None:
                        self.loaded.append((model, instance.index))
                        if self.owed:
                            self._evict(self.owed.popleft())
                    self.write_s.append(acked - sent)
                    self.changes.append([model, "evict" if placement is None else "load",
                                         instance.record.instance_id, due, sent, acked])
                    if instance.pending.get(model) is entry:  # no newer state meanwhile
                        del instance.pending[model]
                    wrote = True
                if wrote:
                    await self._put_instance(instance)

    async def _flush_grouped(self, instance: Instance) -> None:
        """``--grouped``: what a publisher that wrote a flush as one etcd transaction would write
        (every pending placement and then the instance record, one revision: one watch message per
        router instead of one per key). Not what runtimes do today; measured to size that change."""
        from aetcd import rpc  # only here: the mesh's own store has no leased transaction

        async with instance.lock:
            taken = list(instance.pending.items())
            if not taken:
                return
            ops = []
            for model, (placement, _) in taken:
                key = self.keys.placement(model, instance.record.instance_id).encode()
                if placement is None:
                    ops.append(rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key)))
                    self.writes["placement_delete"] += 1
                else:
                    ops.append(rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=placement.to_json(),
                                                                        lease=instance.lease.id)))
                    self.writes["placement_put"] += 1
            instance.record = self._counted(instance)
            ops.append(rpc.RequestOp(request_put=rpc.PutRequest(
                key=self.keys.instance(instance.record.instance_id).encode(), value=instance.record.to_json(),
                lease=instance.lease.id)))
            self.writes["instance_put"] += 1
            request = rpc.TxnRequest(success=ops)

            async def txn(c: Any) -> Any:
                await c.connect()
                return await c.kvstub.Txn(request, timeout=10, metadata=c.metadata)

            sent = time.monotonic()
            await self.store._call("grouped flush", txn, idempotent=False)  # type: ignore[attr-defined]
            acked = time.monotonic()
            self.write_s.append(acked - sent)
            for model, entry in taken:
                placement, due = entry
                if placement is not None:
                    self.loaded.append((model, instance.index))
                    if self.owed:
                        self._evict(self.owed.popleft())
                self.changes.append([model, "evict" if placement is None else "load",
                                     instance.record.instance_id, due, sent, acked])
                if instance.pending.get(model) is entry:
                    del instance.pending[model]

    async def _load(self, model: str, index: int, due: float) -> None:
        instance = self.instances[index]
        async with instance.lock:  # Publisher.announce: LOADING before the loader runs
            await self.store.put(self.keys.placement(model, instance.record.instance_id),
                                 self._placement(model, instance, LOADING).to_json(), lease=instance.lease)
            self.writes["placement_put"] += 1
        await asyncio.sleep(max(0.0, due + self.load_s - time.monotonic()))
        instance.copies.add(model)
        instance.loads += 1
        instance.pending[model] = (self._placement(model, instance, LOADED), due + self.load_s)
        instance.wake.set()

    def _evict(self, due: float) -> None:
        if not self.loaded:
            self.owed.append(due)
            return
        model, index = self.loaded.popleft()
        instance = self.instances[index]
        instance.copies.discard(model)
        instance.evictions += 1
        instance.pending[model] = (None, due)
        instance.wake.set()

    # --- a step ---------------------------------------------------------------------------------
    async def step(self, rate: float, seconds: float, tag: str) -> dict[str, Any]:
        total = max(int(rate * seconds), 1)
        self.changes, self.write_s = [], []
        self.writes = dict.fromkeys(self.writes, 0)
        start = time.monotonic() + 0.05
        max_lag = 0.0
        next_instance = 0
        k = 0
        while k < total:
            now = time.monotonic()
            due = start + k / rate
            if due > now:
                await asyncio.sleep(due - now)
                continue
            max_lag = max(max_lag, now - due)
            while k < total and start + k / rate <= now:  # catch up on everything due
                due = start + k / rate
                if k % 2 == 0:
                    model = f"{tag}-{k:07d}"
                    index = next_instance
                    next_instance = (next_instance + 1) % self.runtimes
                    task = asyncio.create_task(self._load(model, index, due))
                    self._loads.add(task)
                    task.add_done_callback(self._loads.discard)
                else:
                    self._evict(due)
                k += 1
        scheduled_s = time.monotonic() - start
        # Until every write of the step has returned (once per step: a poll costs nothing here).
        while self._loads or self.owed or any(inst.pending or inst.lock.locked()  # noqa: ASYNC110
                                              for inst in self.instances):
            await asyncio.sleep(0.01)
        return {"events": total, "scheduled_s": round(scheduled_s, 3), "max_lag_ms": round(max_lag * 1000, 1),
                "writes": self.writes, "changes": self.changes, "loaded": [m for m, _ in self.loaded],
                "write_ms": sorted(round(s * 1000, 3) for s in self.write_s)}

    async def close(self) -> None:
        for task in self._flushers:
            task.cancel()
        for instance in self.instances:
            try:
                await self.store.revoke_lease(instance.lease)
            except Exception:  # stopping: etcd may be gone already
                pass
        await self.store.close()


def _say(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message, separators=(",", ":")) + "\n")
    sys.stdout.flush()


async def serve(args: argparse.Namespace) -> None:
    store, prefix = open_store(args.registry)
    churn = Churn(store, Keys(prefix), args.runtimes, args.load_ms, args.grouped)
    try:
        await churn.start(args.preload)
        _say({"ready": {"instances": [i.record.instance_id for i in churn.instances],
                        "preloaded": [m for m, _ in churn.loaded]}})
        # stdin through the event loop, not a thread: a thread blocked in readline would hold up
        # the exit on SIGTERM until the parent's SIGKILL.
        stdin = asyncio.StreamReader(limit=2**20)
        await asyncio.get_running_loop().connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
        while True:
            line = await stdin.readline()
            if not line:
                return
            command = json.loads(line)
            _say({"step": await churn.step(float(command["rate"]), float(command["seconds"]), str(command["tag"]))})
    finally:
        await churn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.churn", description=__doc__.splitlines()[0])
    parser.add_argument("--registry", required=True, help="etcd://HOST:PORT[/prefix]")
    parser.add_argument("--runtimes", type=int, default=100, help="simulated runtime instances (default 100)")
    parser.add_argument("--preload", type=int, default=2_000, help="copies loaded before churn (default 2,000)")
    parser.add_argument("--load-ms", type=float, default=20.0, help="LOADING to LOADED, in ms (default 20)")
    parser.add_argument("--grouped", action="store_true",
                        help="write each flush as one transaction (not what runtimes do today; see _flush_grouped)")
    args = parser.parse_args(argv)
    if args.runtimes < 1 or args.preload < 1 or args.load_ms < 0:
        parser.error("--runtimes and --preload must be at least 1, --load-ms not negative")
    from loadtest.cluster import prepare_benchmark_process

    prepare_benchmark_process()
    import uvloop

    try:
        uvloop.run(serve(args))
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
