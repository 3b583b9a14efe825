"""The mesh's cache hits and misses, read from the Prometheus metrics of routers and runtimes.

``mesh_cache_requests_total{result="hit"|"miss"}`` (docs/metrics.md) is summed over every series of
every URL; the hit ratio of a run is that of the difference between a scrape before and one after.
A URL that cannot be read makes the whole reading ``None``, so a ratio is never computed from some
of the runtimes only.
"""

from __future__ import annotations

import asyncio
import math
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

METRIC = "mesh_cache_requests"


@dataclass(frozen=True)
class CacheCounts:
    hits: float
    misses: float

    def __sub__(self, other: CacheCounts) -> CacheCounts:
        return CacheCounts(self.hits - other.hits, self.misses - other.misses)

    @property
    def ratio(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total > 0 else math.nan


def parse(text: str) -> CacheCounts:
    hits = misses = 0.0
    for family in text_string_to_metric_families(text):
        if family.name != METRIC:
            continue
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue
            result = sample.labels.get("result")
            if result == "hit":
                hits += sample.value
            elif result == "miss":
                misses += sample.value
    return CacheCounts(hits, misses)


def _fetch(url: str, timeout_s: float) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        body: bytes = response.read()
    return body.decode("utf-8", errors="replace")


async def scrape(urls: Sequence[str], timeout_s: float = 2.0) -> CacheCounts | None:
    """The summed counts of all ``urls`` now, or None if any of them could not be read."""
    try:
        texts = await asyncio.gather(*(asyncio.to_thread(_fetch, u, timeout_s) for u in urls))
    except (OSError, ValueError):
        return None
    total = CacheCounts(0.0, 0.0)
    for text in texts:
        c = parse(text)
        total = CacheCounts(total.hits + c.hits, total.misses + c.misses)
    return total
