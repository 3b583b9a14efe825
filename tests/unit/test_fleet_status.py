"""The fleet status a router builds from its view (mesh.router.fleet): the last minute's increase
from readings of the instances' counters, scoping for tokens limited to prefixes, hot models and
failure expiry; and the CLI's per-interval increases (mesh.cli.status_cmd)."""

from __future__ import annotations

from mesh.auth import Principal
from mesh.registry.base import KeyValue
from mesh.registry.keys import Keys
from mesh.registry.records import (
    CRASH,
    LOADED,
    LOADING,
    DeviceUsage,
    FailureRecord,
    InstanceRecord,
    PlacementRecord,
)
from mesh.router.fleet import Counters, Fleet, FleetWindow, RouterView, expires_ms
from mesh.router.view import ClusterView

KEYS = Keys("/mesh/")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def instance(iid: str, *, started_ms: int = 1, requests: int = 0, hits: int = 0, misses: int = 0, loads: int = 0,
             load_failures: int = 0, evictions: int = 0, shutting_down: bool = False) -> InstanceRecord:
    return InstanceRecord(instance_id=iid, endpoint=f"127.0.0.1:{len(iid) + 9000}",
                          devices=(DeviceUsage("ram", 1000, 100),), started_ms=started_ms, requests=requests,
                          hits=hits, misses=misses, loads=loads, load_failures=load_failures, evictions=evictions,
                          shutting_down=shutting_down)


def put(view: ClusterView, record: object) -> None:
    if isinstance(record, InstanceRecord):
        view.put_instance(KeyValue(KEYS.instance(record.instance_id), record.to_json(), 1))
    elif isinstance(record, PlacementRecord):
        view.put_placement(KeyValue(KEYS.placement(record.model_id, record.instance_id), record.to_json(), 1))
    elif isinstance(record, FailureRecord):
        view.put_failure(KeyValue(KEYS.failure(record.model_id, record.instance_id), record.to_json(), 1))


def test_counters_since_count_a_reset_counter_from_zero() -> None:
    assert Counters(10, 8, 2).since(Counters(4, 3, 1)) == Counters(6, 5, 1)
    assert Counters(3, 3, 0).since(Counters(10, 8, 2)) == Counters(3, 3, 0)  # restarted in between


def test_the_window_is_the_increase_since_the_oldest_reading_within_a_minute() -> None:
    view, clock = ClusterView(KEYS), Clock()
    window = FleetWindow(lambda: view.instances.values(), window_s=60, sample_s=5, clock=clock)
    assert window.increase() == (0.0, Counters())  # no reading yet
    put(view, instance("a", requests=100, hits=90, misses=10))
    window.sample()
    clock.now += 30
    put(view, instance("a", requests=130, hits=115, misses=15, loads=2))
    put(view, instance("b", requests=7, hits=7))  # joined since the reading: all of it counts
    seconds, increase = window.increase()
    assert seconds == 30
    assert increase == Counters(requests=37, hits=32, misses=5, loads=2)
    window.sample()  # at 30 s: a 130, b 7
    clock.now += 30
    window.sample()
    clock.now += 30
    window.sample()  # at 90 s the reading of 30 s is a minute old: the window starts there
    put(view, instance("a", started_ms=2, requests=4, hits=4))  # restarted: counts from 0
    put(view, instance("b", requests=10, hits=9, misses=1))
    seconds, increase = window.increase()
    assert seconds == 60
    assert increase == Counters(requests=4 + 3, hits=4 + 2, misses=1)


def test_readings_are_bounded_by_the_window() -> None:
    view, clock = ClusterView(KEYS), Clock()
    put(view, instance("a"))
    window = FleetWindow(lambda: view.instances.values(), window_s=60, sample_s=5, clock=clock)
    for _ in range(1000):
        window.sample()
        clock.now += 5
    assert len(window._readings) <= 60 / 5 + 1


def fleet(view: ClusterView, clock: Clock, rates: dict[str, float]) -> Fleet:
    window = FleetWindow(lambda: view.instances.values(), clock=clock)
    window.sample()
    return Fleet(view=view, window=window, rate=lambda m, now: rates.get(m, 0.0), model_inflight=lambda m: 0,
                 router=lambda: RouterView("1", 0, None, True, 0), failure_ttl_s=300, crash_quarantine_s=60,
                 clock=clock)


def populated() -> ClusterView:
    view = ClusterView(KEYS)
    put(view, instance("a", requests=50, hits=40, misses=10, loads=3))
    put(view, instance("b", requests=20, hits=20, shutting_down=True))
    for model, iid, state in (("team-a/x", "a", LOADED), ("team-a/x", "b", LOADED), ("team-b/y", "a", LOADED),
                              ("team-b/z", "b", LOADING)):
        put(view, PlacementRecord(model_id=model, instance_id=iid, state=state, size_bytes=10))
    put(view, FailureRecord(model_id="team-b/bad", instance_id="a", reason="boom", time_ms=5_000))
    put(view, FailureRecord(model_id="team-a/bad", instance_id="b", reason="crashed", time_ms=9_000, kind=CRASH))
    return view


def test_the_report_counts_copies_per_device_and_lists_hot_models_and_failures_newest_first() -> None:
    view, clock = populated(), Clock()
    report = fleet(view, clock, {"team-a/x": 5.0, "team-b/y": 9.0}).report(None, top=1)
    assert not report.scoped
    assert (report.models_loaded, report.copies_loaded, report.copies_loading, report.models_failing) == (2, 3, 1, 2)
    by_id = {i.record.instance_id: i for i in report.instances}
    assert by_id["a"].devices[0].copies == 2 and by_id["a"].state == "ready"
    assert by_id["b"].loaded == 1 and by_id["b"].loading == 1 and by_id["b"].state == "shutting_down"
    assert report.total == Counters(requests=70, hits=60, misses=10, loads=3)
    assert [h.model_id for h in report.hottest] == ["team-b/y"]  # top=1: the hottest only
    assert [f.record.model_id for f in report.failures] == ["team-a/bad", "team-b/bad"]
    assert [f.expires_ms for f in report.failures] == [9_000 + 60_000, 5_000 + 300_000]


def test_a_token_limited_to_prefixes_sees_only_its_models_and_no_traffic_counters() -> None:
    view, clock = populated(), Clock()
    tenant = Principal(name="team-a", role="read", prefixes=("team-a/",))
    report = fleet(view, clock, {"team-a/x": 5.0, "team-b/y": 9.0}).report(tenant)
    assert report.scoped
    assert (report.models_loaded, report.copies_loaded, report.copies_loading, report.models_failing) == (1, 2, 0, 1)
    assert [h.model_id for h in report.hottest] == ["team-a/x"]
    assert [f.record.model_id for f in report.failures] == ["team-a/bad"]
    assert report.total == Counters() and report.window == Counters()
    assert all(i.counters == Counters() for i in report.instances)
    assert sum(d.copies for i in report.instances for d in i.devices) == 2  # team-b's copies not counted
    # An unlimited token (no prefixes) sees everything, as with auth off.
    assert not fleet(view, clock, {}).report(Principal(name="admin", role="read")).scoped


def test_a_failure_record_without_a_lease_never_expires() -> None:
    record = FailureRecord(model_id="m", instance_id="a", reason="crashed", time_ms=1_000, kind=CRASH)
    assert expires_ms(record, leased=False, failure_ttl_s=300, crash_quarantine_s=60) == 0
    assert expires_ms(record, leased=True, failure_ttl_s=300, crash_quarantine_s=60) == 61_000
    view, clock = populated(), Clock()
    copies, failures = fleet(view, clock, {}).copies("team-a/bad", {"b": False})
    assert copies == [] and [f.expires_ms for f in failures] == [0]
    copies, _ = fleet(view, clock, {}).copies("team-a/x", {})
    assert [(c.instance_id, c.endpoint, c.state) for c in copies] == [
        ("a", "127.0.0.1:9001", LOADED), ("b", "127.0.0.1:9001", LOADED)]


def test_mesh_top_counts_a_new_or_restarted_instance_from_zero() -> None:
    from mesh.cli.status_cmd import COUNTERS, _increase

    zero = dict.fromkeys(COUNTERS, 0)
    before = {("a", 1): {**zero, "requests": 10, "hits": 9}}
    now = {("a", 1): {**zero, "requests": 15, "hits": 13}, ("a", 2): {**zero, "requests": 3},
           ("b", 1): {**zero, "requests": 4}}
    out = _increase(now, before)
    assert out[("a", 1)]["requests"] == 5 and out[("a", 1)]["hits"] == 4
    assert out[("a", 2)]["requests"] == 3 and out[("b", 1)]["requests"] == 4


def test_a_scoped_token_sees_no_requests_in_flight_and_memory_to_the_mib() -> None:
    """Exact in-flight counts and bytes used would show another tenant's traffic and model sizes
    (the attacker review of issue 20)."""
    view, clock = populated(), Clock()
    put(view, InstanceRecord(instance_id="c", endpoint="127.0.0.1:9100",
                             devices=(DeviceUsage("ram", 64 << 20, (3 << 20) + 5_700),)))
    view.inflight["c"] = 6
    fl = Fleet(view=view, window=FleetWindow(lambda: view.instances.values(), clock=clock), rate=lambda m, now: 0.0,
               model_inflight=lambda m: 0, router=lambda: RouterView("1", 0, None, True, 6), failure_ttl_s=300,
               crash_quarantine_s=60, clock=clock)
    tenant = fl.report(Principal(name="team-a", role="read", prefixes=("team-a/",)))
    c = next(i for i in tenant.instances if i.record.instance_id == "c")
    assert (tenant.router.inflight, c.inflight, c.devices[0].used_bytes) == (0, 0, 3 << 20)
    operator = fl.report(None)
    c = next(i for i in operator.instances if i.record.instance_id == "c")
    assert (operator.router.inflight, c.inflight, c.devices[0].used_bytes) == (6, 6, (3 << 20) + 5_700)


def test_a_report_is_built_at_most_once_a_second_per_scope() -> None:
    """A report walks every copy on the router's event loop: a read token calling in a loop gets the
    same one again within a second (the attacker review: 144 ms a call at 100,000 models)."""
    view, clock = populated(), Clock()
    fl = fleet(view, clock, {})
    tenant = Principal(name="team-a", role="read", prefixes=("team-a/",))
    first, scoped = fl.report(None), fl.report(tenant)
    put(view, PlacementRecord(model_id="team-a/new", instance_id="a", state=LOADED, size_bytes=10))
    assert fl.report(None) is first and fl.report(tenant) is scoped and scoped is not first
    clock.now += 1.0
    assert fl.report(None).models_loaded == first.models_loaded + 1
