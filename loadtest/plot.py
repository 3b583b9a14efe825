"""``mesh-loadtest --plot FILE.png``: latency percentiles and cache hit ratio per second.

matplotlib is imported here only (the ``loadtest`` extra), with the Agg backend: no display needed.
"""

from __future__ import annotations

import math
from typing import Any


def plot(summary: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["timeline"]
    t = [r["t"] for r in rows]
    fig, (lat, hit) = plt.subplots(2, 1, sharex=True, figsize=(9, 6))
    for key in ("p50_ms", "p90_ms", "p99_ms"):
        lat.plot(t, [r[key] for r in rows], marker=".", label=key.removesuffix("_ms"))
    lat.set_ylabel("latency (ms)")
    lat.set_ylim(bottom=0)
    lat.legend(loc="upper right")
    warmup = summary["settings"]["warmup_s"]
    if warmup > 0:
        for ax in (lat, hit):
            ax.axvspan(0, warmup, color="grey", alpha=0.15, label="warm-up")
    ratios = [r.get("hit_ratio", math.nan) for r in rows]
    if any(not math.isnan(x) for x in ratios):
        hit.plot(t, ratios, marker=".", color="tab:green")
        hit.set_ylim(-0.05, 1.05)
    else:
        hit.text(0.5, 0.5, "hit ratio n/a (no --metrics)", ha="center", va="center", transform=hit.transAxes)
    hit.set_ylabel("cache hit ratio")
    hit.set_xlabel("elapsed (s)")
    mode = summary["mode"]
    load = f"{summary['settings']['rate']:g} req/s" if mode == "open" else f"c={summary['settings']['concurrency']}"
    fig.suptitle(f"mesh-loadtest {summary['target']}: {mode} loop, {load}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
