"""Eviction policies against LRU and the offline optimum, and the simulator's speed (issue 3 targets).

``python -m loadtest.scenarios.placement [--requests N] [--quick] [--default NAME] [--jobs J] [--json]``

Method. The issue's grid: Zipf popularity with alpha 0.8, 1.0 and 1.2 over 10,000 models
(``placement.generators.zipf_trace``, Poisson arrivals at 100 requests/s, seed 1), a cache of 5%, 10%
and 20% of the trace's working set (the bytes of the distinct models it requests), and two size
regimes drawn on the same request sequence:

* *uniform*: every model 50 MB with a 120 ms load, a cache that counts models. The reference is
  Belady's MIN, the exact optimum, and the gap closed is counted in misses;
* *skewed*: sizes lognormal (median 50 MB, sigma 1, clipped to [1 MB, 2 GB]) with
  ``load_ms = 20 + 2 x size in MB``, the reference anchors' workload d. The optimum is NP-hard; it is
  bracketed by the PFOO-L lower bound and the Belady-Size offline heuristic (cost objective, a feasible
  policy), and the gap closed in *cost-weighted* misses (``load_ms`` of the misses) is given against
  both: ``lo`` (against PFOO-L, conservative) .. ``hi`` (against the heuristic).

Each point replays the whole trace through one cache (``placement.replay.replay``, loads taking no
time, the level at which the optimum is defined) for LRU, the candidate default (``--default``) and
every other registered policy, admission filters included. The points run in ``--jobs`` worker
processes (default 2, this machine's core count). Replay speed is requests per second of CPU time of
the replaying thread (``time.thread_time``), which other work on the machine does not inflate; it is
judged on a serial pass after the grid (one replay at a time, at the two points with the most misses,
where replay is slowest), because two replays at once on a 2-vCPU VM slow each other through shared
caches (the grid's own figures are shown too). The CPU used by other processes during the run is
reported. A small cluster section then runs LRU and the default through ``simulate_cluster`` (4 instances,
2 load slots, Zipf 1.0 uniform, 10% of the working set per instance) with copy scaling off and on, for
the latency side: misses started, requests that joined a load in progress, loads/s, p99 added latency.

Targets (issue 3): the default's miss ratio is at most LRU's at every point (on skewed sizes, the
request and the cost-weighted miss ratio); it closes at least 40% of the LRU-to-Belady gap with uniform
sizes and at least 30% of the cost-weighted gap with skewed sizes, at every point; replay at least
200,000 requests/s for every policy (judged on the serial pass, at its slower point).

Caveats. Synthetic, stationary traffic (independent reference model): on it a popularity oracle is
the best an online policy can do, and it closes only 53-70% of the gap (reference anchors), so no
policy gets near 100%. The generators draw from numpy's PCG64, not the anchors' RandomState, so miss
ratios agree with the anchors' tables within sampling noise, not digit for digit.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import statistics
import sys
import time
from collections.abc import Sequence
from functools import lru_cache
from itertools import islice
from typing import Any

from loadtest.report import ForeignLoad, add_output_args, emit, machine, machine_line, table, verdict
from placement.cluster import simulate_cluster
from placement.generators import SizeModel, azure_trace, synthetic_azure_counts, zipf_trace
from placement.offline import offline_reference
from placement.registry import build_policy, policy_names
from placement.replay import replay
from placement.request import Request
from placement.scaling import ScalingConfig

N_MODELS = 10_000
ALPHAS = (0.8, 1.0, 1.2)
SHARES = (0.05, 0.10, 0.20)
REGIMES = ("uniform", "skewed")
SEED = 1
DEFAULT_CANDIDATE = "s3fifo+tinylfu"
# Robustness workloads (uniform sizes, exact Belady, the same three capacities): the reference anchors'
# b (churn) and c (sweeps), bursty arrivals with partial churn, and an Azure Functions-like day.
ROBUST = ("churn", "sweeps", "bursty", "azure", "churn-fast")
INFORMATIONAL = ("churn-fast",)  # shown, not judged: see robust_trace
GAP_UNIFORM = 0.40
GAP_COST = 0.30
MIN_SPEED = 200_000
SPEED_POINT = (0.8, 0.05)  # (alpha, share) of the serial speed pass: the most misses of the grid
# The cluster section: 4 instances of 5% of the working set each, Zipf 1.0 at 200 requests/s, so that
# the 8 load slots are about half busy; scaling at 5 requests/s per copy (300 rpm) so that the ~10
# hottest models get copies (ModelMesh's 2000 rpm would give none at this rate).
CLUSTER_INSTANCES = 4
CLUSTER_SHARE = 0.05
CLUSTER_RPS = 200.0
# mesh-bench's standard suite (loadtest.bench): every section, 50,000 requests per trace. ``--quick``
# (200,000, no cluster) would take ~170 s here; 50,000 took 47 s with 0.85 cores used by other processes.
JUDGED_REQUESTS = 1_000_000  # the trace length, on which the targets are judged
SUITE_ARGS = ("--requests", "50000")
SUITE_SECONDS = 60
CLUSTER_SCALING = ScalingConfig(rps_threshold=5.0)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def robust_trace(workload: str, n_requests: int) -> list[Request]:
    """The robustness workloads, uniform sizes:

    * ``churn``: Zipf 1.0 whose whole rank-to-model order is redrawn every 100,000 requests (the
      anchors' b);
    * ``sweeps``: Zipf 1.0 with 1,000 one-off models swept through every 100,000 requests (anchors' c);
    * ``bursty``: Zipf 1.0 with Gamma inter-arrivals of CV 4 and a fifth of the ranks reshuffled every
      50,000 requests;
    * ``azure``: ``synthetic_azure_counts`` for 10,000 functions (at most 2 calls a minute each: a heavy
      tail, timers, a diurnal cycle), its first ``n_requests`` from minute 600 on (about 4,000 calls a
      minute: 1,000,000 requests are 4 to 5 hours).

    * ``churn-fast``: ``churn`` with a reshuffle every 20,000 requests, ten times the models of the
      largest cache: shown for what it says about recency-dominated traffic (every frequency-aware
      policy we have loses to LRU there), not judged.

    Epochs are counted in requests, not in shares of the trace, so ``--quick`` sees fewer reshuffles,
    not faster ones.
    """
    if workload == "churn":
        return zipf_trace(N_MODELS, n_requests, alpha=1.0, seed=SEED, churn=1.0, churn_every=100_000)
    if workload == "churn-fast":
        return zipf_trace(N_MODELS, n_requests, alpha=1.0, seed=SEED, churn=1.0, churn_every=20_000)
    if workload == "sweeps":
        return zipf_trace(N_MODELS, n_requests, alpha=1.0, seed=SEED, sweep_every=100_000)
    if workload == "bursty":
        return zipf_trace(N_MODELS, n_requests, alpha=1.0, seed=SEED, cv=4.0, churn=0.2, churn_every=50_000)
    if workload == "azure":
        rows = synthetic_azure_counts(N_MODELS, seed=SEED, max_per_minute=2.0)
        return list(islice(azure_trace(rows, seed=SEED, start_minute=600), n_requests))
    raise ValueError(f"unknown workload {workload!r}")


@lru_cache(maxsize=2)
def _trace(workload: str, regime: str, n_requests: int) -> tuple[list[Request], int]:
    if workload.startswith("zipf"):
        sizes = SizeModel.uniform() if regime == "uniform" else SizeModel.lognormal()
        trace = zipf_trace(N_MODELS, n_requests, alpha=float(workload[4:]), seed=SEED, sizes=sizes)
    else:
        trace = robust_trace(workload, n_requests)
    working_set = sum({r.model_id: r.size_bytes for r in trace}.values())
    return trace, working_set


def run_point(point: tuple[str, str, float, int, tuple[str, ...]]) -> dict[str, Any]:
    """One grid point: every policy replayed, and the offline reference (runs in a worker process)."""
    workload, regime, share, n_requests, policies = point
    trace, working_set = _trace(workload, regime, n_requests)
    capacity = int(working_set * share)
    started = time.perf_counter()
    opt = offline_reference([trace], capacity)
    opt_s = time.perf_counter() - started
    rows: dict[str, Any] = {}
    lru = None
    for name in policies:
        policy = build_policy(name, capacity)
        started = time.thread_time()
        stats = replay(trace, policy, capacity)
        elapsed = time.thread_time() - started
        if name == "lru":
            lru = stats
        rows[name] = {"stats": stats, "req_per_s": len(trace) / elapsed}
    assert lru is not None
    for row in rows.values():
        stats = row.pop("stats")
        gap_lo, gap_hi = opt.gap(lru, stats, "misses")
        cost_lo, cost_hi = opt.gap(lru, stats, "cost")
        row.update(miss_ratio=stats.miss_ratio, byte_miss_ratio=stats.byte_miss_ratio,
                   cost_miss_ratio=stats.cost_miss_ratio, gap=gap_hi, gap_lo=gap_lo,
                   cost_gap_lo=cost_lo, cost_gap_hi=cost_hi, bypassed=stats.bypassed)
    alpha = float(workload[4:]) if workload.startswith("zipf") else None
    return {"workload": workload, "alpha": alpha, "regime": regime, "share": share, "capacity_bytes": capacity,
            "requests": len(trace), "working_set_bytes": working_set, "opt": opt.as_dict(),
            "opt_seconds": opt_s, "policies": rows}


def run_speed(n_requests: int, policies: Sequence[str]) -> dict[str, dict[str, float]]:
    """Replay speed, serially in this process with the workers gone: each policy at the two points with
    the most misses (Zipf 0.8 at 5%, both size regimes), where replay is slowest."""
    out: dict[str, dict[str, float]] = {}
    for regime in REGIMES:
        trace, working_set = _trace(f"zipf{SPEED_POINT[0]}", regime, n_requests)
        capacity = int(working_set * SPEED_POINT[1])
        for name in policies:
            policy = build_policy(name, capacity)
            started = time.thread_time()
            replay(trace, policy, capacity)
            out.setdefault(name, {})[regime] = len(trace) / (time.thread_time() - started)
    return out


def run_cluster(n_requests: int, policies: Sequence[str]) -> list[dict[str, Any]]:
    """The cluster section: LRU and the default with copy scaling off and on (module docstring)."""
    trace = zipf_trace(N_MODELS, n_requests, alpha=1.0, seed=SEED, rate_rps=CLUSTER_RPS)
    working_set = sum({r.model_id: r.size_bytes for r in trace}.values())
    capacity = int(working_set * CLUSTER_SHARE)
    out = []
    for name in policies:
        for scaling in (None, CLUSTER_SCALING):
            started = time.thread_time()
            c = simulate_cluster(trace, instances=CLUSTER_INSTANCES, capacity_bytes=capacity, policy=name,
                                 scaling=scaling, load_slots=2)
            elapsed = time.thread_time() - started
            s = c.total
            out.append({"policy": name, "scaling": scaling is not None, "miss_ratio": s.miss_ratio,
                        "joined_ratio": s.joined / s.requests, "loads_per_s": s.loads_per_s,
                        "p50_ms": s.wait_p50_ms, "p99_ms": s.wait_p99_ms, "max_ms": s.wait_max_ms,
                        "copies_added": c.copies_added, "copies_removed": c.copies_removed,
                        "no_room": c.no_room, "req_per_s": s.requests / elapsed})
    return out


# -- report ---------------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "n/a" if x is None or x != x else f"{x:.0%}"


def _range(lo: float | None, hi: float | None) -> str:
    a, b = _pct(lo), _pct(hi)
    return a if a == b else f"{a}..{b}"


def _ordered(policies: Sequence[str], default: str) -> list[str]:
    return ["lru", default, *(p for p in policies if p not in ("lru", default))]


def judge(points: list[dict[str, Any]], speed: dict[str, dict[str, float]], default: str) -> dict[str, Any]:
    robust = [p for p in points if p["alpha"] is None and p["workload"] not in INFORMATIONAL]
    points = [p for p in points if p["alpha"] is not None]
    uniform = [p for p in points if p["regime"] == "uniform"]
    skewed = [p for p in points if p["regime"] == "skewed"]

    def d(p: dict[str, Any]) -> Any:
        return p["policies"][default]

    def lru(p: dict[str, Any]) -> Any:
        return p["policies"]["lru"]

    not_worse = all(d(p)["miss_ratio"] <= lru(p)["miss_ratio"] for p in points) and all(
        d(p)["cost_miss_ratio"] <= lru(p)["cost_miss_ratio"] for p in skewed)
    robust_not_worse = all(d(p)["miss_ratio"] <= lru(p)["miss_ratio"] for p in robust)
    robust_worst = min(robust, key=lambda p: d(p)["gap"]) if robust else None
    gap_u = min(d(p)["gap"] for p in uniform) if uniform else None
    gap_c_lo = min(d(p)["cost_gap_lo"] for p in skewed) if skewed else None
    gap_c_hi = min(d(p)["cost_gap_hi"] for p in skewed) if skewed else None
    speeds: dict[str, list[float]] = {}
    for p in points:  # the Zipf grid only, as before the robustness workloads were added
        for name, row in p["policies"].items():
            speeds.setdefault(name, []).append(row["req_per_s"])
    serial = {name: min(by_regime.values()) for name, by_regime in speed.items()}
    slowest = min(serial.items(), key=lambda kv: kv[1])
    return {
        "not_worse_than_lru": not_worse,
        "robust_not_worse_than_lru": robust_not_worse,
        "robust_min_gap": d(robust_worst)["gap"] if robust_worst else None,
        "robust_min_gap_at": f"{robust_worst['workload']} @{robust_worst['share']:.0%}" if robust_worst else None,
        "min_gap_uniform": gap_u, "gap_uniform_met": gap_u is not None and gap_u >= GAP_UNIFORM,
        "min_cost_gap_skewed_lo": gap_c_lo, "min_cost_gap_skewed_hi": gap_c_hi,
        "cost_gap_met": gap_c_lo is not None and gap_c_lo >= GAP_COST,
        "cost_gap_met_hi": gap_c_hi is not None and gap_c_hi >= GAP_COST,
        "speed": {n: {"median": statistics.median(v), "min": min(v), **speed.get(n, {})}
                  for n, v in speeds.items()},
        "slowest_policy": slowest[0], "slowest_req_per_s": slowest[1],
        "speed_met": slowest[1] >= MIN_SPEED,
    }


def render(result: dict[str, Any]) -> str:
    default = result["default"]
    points = result["points"]
    verdicts = result["verdicts"]
    policies = _ordered(result["policy_names"], default)
    short = "not judged (short traces)" if result["requests"] < JUDGED_REQUESTS else ""
    out = [f"**Placement policies vs LRU and the offline optimum ({result['requests']:,} requests per trace)**",
           "", machine_line(result["machine"]), ""]
    if result["requests"] < JUDGED_REQUESTS:
        # 10,000 models and a short trace: most misses are first requests, which no policy avoids
        # and which the optimum pays too, so every gap closed shrinks; the targets are the issue's,
        # on 1,000,000-request traces.
        out += [f"Short traces: the gap targets are judged on {JUDGED_REQUESTS:,}-request traces "
                f"(`python -m loadtest.scenarios.placement`); with {result['requests']:,} requests "
                "first-time misses dominate and the gaps below are indicative only.", ""]
    out.append(table(["target", "result", "verdict"], [
        [f"{default}: miss ratio <= LRU's at every point (skewed: also cost-weighted)",
         "yes" if verdicts["not_worse_than_lru"] else "no", verdict(verdicts["not_worse_than_lru"])],
        [f"{default}: >= 40% of the LRU-to-Belady gap, uniform sizes (worst point)",
         _pct(verdicts["min_gap_uniform"]), short or verdict(verdicts["gap_uniform_met"])],
        [f"{default}: >= 30% of the cost-weighted gap, skewed sizes (worst point; vs PFOO-L..vs Belady-Size)",
         _range(verdicts["min_cost_gap_skewed_lo"], verdicts["min_cost_gap_skewed_hi"]),
         short or (verdict(verdicts["cost_gap_met"])
                   + ("" if verdicts["cost_gap_met"] == verdicts["cost_gap_met_hi"]
                      else f" (vs Belady-Size: {verdict(verdicts['cost_gap_met_hi'])})"))],
        [f"{default}: miss ratio <= LRU's on churn, sweeps, bursty and Azure-like traffic, every capacity "
         "(churn-fast not judged)",
         "yes" if verdicts["robust_not_worse_than_lru"] else "no",
         verdict(verdicts["robust_not_worse_than_lru"]) + " (our own target)"],
        [">= 200,000 req/s replay per policy (serial pass, slowest policy at its slower point)",
         f"{verdicts['slowest_policy']}: {verdicts['slowest_req_per_s']:,.0f}", verdict(verdicts["speed_met"])],
    ]))
    robust = [p for p in points if p["alpha"] is None]
    points = [p for p in points if p["alpha"] is not None]
    for alpha in sorted({p["alpha"] for p in points}):
        uni = sorted((p for p in points if p["alpha"] == alpha and p["regime"] == "uniform"), key=lambda p: p["share"])
        if uni:
            out += ["", f"#### Uniform sizes, Zipf {alpha}: miss ratio and gap closed (vs exact Belady)", ""]
            header = ["policy"] + [h for p in uni for h in (f"miss@{p['share']:.0%}", f"gap@{p['share']:.0%}")]
            rows = [[name] + [c for p in uni for c in (p["policies"][name]["miss_ratio"],
                                                       _pct(p["policies"][name]["gap"]))] for name in policies]
            rows.append(["Belady (OPT)"] + [c for p in uni for c in (p["opt"]["miss_ratio"], "100%")])
            out.append(table(header, rows))
        skw = sorted((p for p in points if p["alpha"] == alpha and p["regime"] == "skewed"), key=lambda p: p["share"])
        if skw:
            out += ["", f"#### Skewed sizes and costs, Zipf {alpha}: cost-weighted miss ratio and its gap closed "
                    "(lo vs PFOO-L .. hi vs Belady-Size); request miss ratio", ""]
            header = ["policy"] + [h for p in skw for h in (f"cost miss@{p['share']:.0%}", f"cost gap@{p['share']:.0%}",
                                                            f"miss@{p['share']:.0%}")]
            rows = [[name] + [c for p in skw for c in (
                p["policies"][name]["cost_miss_ratio"],
                _range(p["policies"][name]["cost_gap_lo"], p["policies"][name]["cost_gap_hi"]),
                p["policies"][name]["miss_ratio"])] for name in policies]
            rows.append(["OPT bracket"] + [c for p in skw for c in (
                f"{p['opt']['cost_miss_ratio_lower']:.3f}..{p['opt']['cost_miss_ratio']:.3f}", "100%",
                f"{p['opt']['miss_ratio_lower']:.3f}..{p['opt']['miss_ratio']:.3f}")])
            out.append(table(header, rows))
    for workload in ROBUST:
        pts = sorted((p for p in robust if p["workload"] == workload), key=lambda p: p["share"])
        if not pts:
            continue
        out += ["", f"#### Robustness, {workload} (uniform sizes): miss ratio and gap closed (vs exact Belady)", ""]
        header = ["policy"] + [h for p in pts for h in (f"miss@{p['share']:.0%}", f"gap@{p['share']:.0%}")]
        rows = [[name] + [c for p in pts for c in (p["policies"][name]["miss_ratio"],
                                                   _pct(p["policies"][name]["gap"]))] for name in policies]
        rows.append(["Belady (OPT)"] + [c for p in pts for c in (p["opt"]["miss_ratio"], "100%")])
        out.append(table(header, rows))
    out += ["", "#### Replay speed (requests per CPU second of the replaying thread)", "",
            f"Serial pass: one replay at a time, Zipf {SPEED_POINT[0]} at {SPEED_POINT[1]:.0%} (the points with "
            "the most misses). Grid: all 18 points, two worker processes at once on the 2 cores.", ""]
    speed = verdicts["speed"]
    out.append(table(["policy", "serial: uniform", "serial: skewed", "grid: median", "grid: slowest point"],
                     [[n, speed[n].get("uniform", math.nan), speed[n].get("skewed", math.nan),
                       speed[n]["median"], speed[n]["min"]] for n in policies]))
    if result.get("cluster"):
        out += ["", f"#### Cluster: {CLUSTER_INSTANCES} instances x {CLUSTER_SHARE:.0%} of the working set, 2 load "
                f"slots each, Zipf 1.0 uniform at {CLUSTER_RPS:.0f} req/s; copy scaling at "
                f"{CLUSTER_SCALING.rps_threshold:g} req/s per copy", ""]
        out.append(table(["policy", "copy scaling", "miss ratio", "joined", "loads/s", "p50 ms", "p99 ms", "max ms",
                          "copies added/released", "sim req/s (CPU)"],
                         [[r["policy"], "on" if r["scaling"] else "off", r["miss_ratio"], r["joined_ratio"],
                           r["loads_per_s"], r["p50_ms"], r["p99_ms"], r["max_ms"],
                           f"{r['copies_added']}/{r['copies_removed']}", r["req_per_s"]] for r in result["cluster"]]))
    opt_s = [p["opt_seconds"] for p in points + robust]
    out += ["", f"Offline references took {sum(opt_s):.0f} s in all (slowest point {max(opt_s):.1f} s)."]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.scenarios.placement", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1_000_000, help="requests per trace (default 1,000,000)")
    parser.add_argument("--quick", action="store_true", help="200,000 requests per trace, no cluster section")
    parser.add_argument("--default", default=DEFAULT_CANDIDATE,
                        help=f"the candidate default policy (default {DEFAULT_CANDIDATE})")
    parser.add_argument("--policy", action="append", help="only these policies besides LRU and the default")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--speed-only", action="store_true",
                        help="only the serial replay-speed pass (for a quiet machine), as a table")
    parser.add_argument("--no-robust", action="store_true",
                        help="only the Zipf grid: skip the churn, sweeps, bursty and Azure-like workloads")
    add_output_args(parser)
    args = parser.parse_args(argv)
    n_requests = 200_000 if args.quick else args.requests
    known = policy_names()
    chosen = _ordered(args.policy or known, args.default)
    for name in chosen:
        if name not in known:
            parser.error(f"unknown policy {name!r}; known: {', '.join(known)}")
    points = [(f"zipf{alpha}", regime, share, n_requests, tuple(chosen))
              for regime in REGIMES for alpha in ALPHAS for share in SHARES]
    if not args.no_robust:
        points += [(w, "uniform", share, n_requests, tuple(chosen)) for w in ROBUST for share in SHARES]
    if args.speed_only:
        foreign = ForeignLoad()
        speed = run_speed(n_requests, chosen)
        load = foreign.result()
        print(f"# Serial replay speed, Zipf {SPEED_POINT[0]} at {SPEED_POINT[1]:.0%}, {n_requests:,} requests\n")
        print(machine_line({**machine(), "foreign_load": load}) + "\n")
        print(table(["policy", "uniform req/s", "skewed req/s", "verdict (>= 200,000 at both)"],
                    [[n, v["uniform"], v["skewed"], verdict(min(v.values()) >= MIN_SPEED)]
                     for n, v in speed.items()]))
        return 0
    started = time.perf_counter()
    foreign = ForeignLoad()
    log(f"{len(points)} points x {len(chosen)} policies, {n_requests:,} requests per trace, {args.jobs} jobs")
    results: list[dict[str, Any]] = []
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(args.jobs) as pool:
        for r in pool.imap(run_point, points):
            log(f"  {r['regime']} {r['workload']} @{r['share']:.0%}: "
                f"lru {r['policies']['lru']['miss_ratio']:.4f}, {args.default} "
                f"{r['policies'][args.default]['miss_ratio']:.4f}, opt {r['opt']['miss_ratio']:.4f} "
                f"({time.perf_counter() - started:.0f} s)")
            results.append(r)
        pool.close()
        pool.join()  # reaped, so that their CPU time counts as ours in the foreign-load figure
    log("serial speed pass...")
    speed = run_speed(n_requests, chosen)
    log("cluster section...")
    cluster = [] if args.quick else run_cluster(n_requests, ["lru", args.default])
    result = {"machine": machine(), "requests": n_requests, "default": args.default, "policy_names": chosen,
              "points": results, "cluster": cluster, "verdicts": judge(results, speed, args.default),
              "seconds": time.perf_counter() - started}
    result["machine"]["foreign_load"] = foreign.result()
    emit(args, result, render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
