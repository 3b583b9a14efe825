"""CPU of the route stream's table upkeep on the router's event loop (docs/client.md).

``python -m loadtest.scenarios.routes_hub [--models N]``

A ``ClusterView`` with N (100,000) loaded models x 2 copies over 50 runtimes with direct ports,
and a ``RouteHub`` with 64 streams, one per tenant prefix (the default ``routes_max_streams``).
Measured, in this process, with the real classes: a full ``route_table`` (what every 50 ms tick
cost before the hub was incremental), ``refresh`` after one placement change (the common case),
after one instance's routing change (a runtime draining: its 4,000 copies leave the routes), and
after an instance publish that changes no routing field (every runtime, every few seconds).
Best of several tries; the numbers are milliseconds of event-loop time.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

from mesh.registry.base import KeyValue
from mesh.registry.keys import Keys
from mesh.registry.records import LOADED, InstanceRecord, PlacementRecord
from mesh.router.routes import RouteHub, route_table
from mesh.router.view import ClusterView

RUNTIMES = 50
STREAMS = 64


def build(models: int) -> ClusterView:
    view = ClusterView(Keys("/mesh/"))
    for i in range(RUNTIMES):
        publish(view, i)
    for m in range(models):
        for k in (m % RUNTIMES, (m + 1) % RUNTIMES):
            place(view, f"tenant-{m % 100:03d}/model-{m:07d}", k)
    return view


def publish(view: ClusterView, i: int, *, shutting_down: bool = False) -> None:
    iid = f"runtime-{i:02d}"
    record = InstanceRecord(instance_id=iid, endpoint=f"10.0.0.{i}:8085", direct_endpoint=f"10.0.0.{i}:8087",
                            shutting_down=shutting_down)
    view.put_instance(KeyValue(view.keys.instance(iid), record.to_json(), 1))


def place(view: ClusterView, model_id: str, k: int) -> None:
    iid = f"runtime-{k:02d}"
    record = PlacementRecord(model_id=model_id, instance_id=iid, state=LOADED)
    view.put_placement(KeyValue(view.keys.placement(model_id, iid), record.to_json(), 1))


def best_ms(tries: int, change: Callable[[int], None], hub: RouteHub) -> float:
    best = float("inf")
    for i in range(tries):
        change(i)
        started = time.perf_counter()
        hub.refresh()
        best = min(best, time.perf_counter() - started)
    return best * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=int, default=100_000, help="loaded models (2 copies each)")
    args = parser.parse_args(argv)
    view = build(args.models)
    started = time.perf_counter()
    route_table(view)
    print(f"{args.models:,} loaded models x 2 copies, {RUNTIMES} runtimes, {STREAMS} streams")
    print(f"full route_table (each tick before): {1000 * (time.perf_counter() - started):.1f} ms")
    hub = RouteHub(view, max_streams=STREAMS, max_queue=64, interval_s=0.05)
    for i in range(STREAMS):
        prefix = f"tenant-{i:03d}/"
        hub.subscribe((lambda p: lambda m: m.startswith(p))(prefix), key=(prefix, None))
    print(f"refresh, one placement changed: "
          f"{best_ms(20, lambda i: place(view, f'tenant-007/model-{i:07d}', RUNTIMES - 1), hub):.3f} ms")
    print(f"refresh, one runtime draining or back ({2 * args.models // RUNTIMES:,} copies): "
          f"{best_ms(6, lambda i: publish(view, RUNTIMES - 1, shutting_down=i % 2 == 0), hub):.1f} ms")
    print(f"refresh, an instance publish changing no route: "
          f"{best_ms(6, lambda i: publish(view, 10), hub):.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
