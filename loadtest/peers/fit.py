"""The peers' fit mode: room for K of the models only, so every system loads and evicts while measured.

``K = max(1, round(F x models))``. Ray Serve's multiplexing counts models: one replica holds an LRU of
``max_num_models_per_replica = K``. MLServer cannot evict and is not given a share (it holds all).

Our mesh counts bytes, so K models of room has to be turned into a capacity, and by measurement:
the runtimes charge a loaded model its *measured* size ``s`` (the larger of the loader's accounting
and the process's memory growth during the load) and, while it loads, its *predicted* size ``P``
(``runtime.default_model_size_bytes``, 64 KiB, is the floor of the prediction: several times what
these sklearn models measure). ``loadtest.scenarios.many_models.calibrate`` measures both on a
cluster of its own (24 loads, one at a time, sizes read from the placement records, ``s`` the mean
without the largest eighth). A load first makes room for ``P`` (evicting until ``used + P <= C``),
then its reservation shrinks to ``s``; so between loads a runtime holds ``n`` models with
``(n - 1) x s <= C - P``, that is ``n = floor((C - P) / s) + 1``. Each runtime therefore gets

    C = P + (K - 1) / 2 x s

which makes ``n = floor((K - 1) / 2) + 1``: the two runtimes together hold K models between loads
(K + 1 when K is odd; one fewer on a runtime while it loads). Sizes differ from model to model
(about 4 to 33 KB here), so what is held is "about K", not exactly K. For a small K, C < 2 P: a
runtime's second concurrent load waits for the first one's reservation to shrink, so loads run one
at a time per runtime, as Ray's do per replica (its model-cache lock). ``calibrate``'s own capacity
(``many_models``: ``fit x N / R x s + load slots x P``) is not used: it guarantees the share while
every load slot is busy, and between loads leaves room for ``P / s`` (6 to 11 here) more models
per runtime, which for a small K is more than K itself.

Counters, read just before and just after each measured part (never across a warm-up):
our mesh's runtimes' Prometheus metrics (``modelmesh_loadmodel_milliseconds_count`` for loads,
``mesh_cache_requests_total`` for hits and misses, ``mesh_evictions_total{reason="capacity"}``; the
URLs are those the runtimes log at start-up, ``mesh up`` giving them free ports); Ray's loader's
lines in its loads file (``ray_app``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from loadtest.peers._proc import wait_until
from loadtest.peers.drive import Target

RUNTIMES = 2  # `mesh up --runtimes 2`, as in the default mode


def k_models(fit: float, models: int) -> int:
    """The models that fit: Ray's ``max_num_models_per_replica``, our mesh's share."""
    return max(1, round(fit * models))


@dataclass(frozen=True)
class MeshRoom:
    """Our mesh's capacity per runtime for K models, and the measurement it comes from."""

    k: int
    capacity_bytes: int  # per runtime
    size_bytes: int  # s: the calibrated (trimmed mean) measured size of one model
    predicted_bytes: int  # P: what a runtime reserves for a model while it loads
    sizes: list[int]  # the calibration loads' measured sizes

    def to_dict(self) -> dict[str, Any]:
        return {"capacity_bytes_per_runtime": self.capacity_bytes, "runtimes": RUNTIMES,
                "size_bytes": self.size_bytes, "predicted_bytes": self.predicted_bytes,
                "calibration_sizes": self.sizes,
                "formula": "P + (K - 1) / 2 x s per runtime",
                "method": "loadtest.scenarios.many_models.calibrate: 24 loads on a private runtime, "
                          "s = trimmed mean of their measured sizes, P = the runtime's predicted size"}


def room_for(k: int, size_bytes: int, predicted_bytes: int) -> int:
    """Capacity per runtime so that the runtimes hold about ``k`` models between loads."""
    return predicted_bytes + round((k - 1) / 2 * size_bytes)


def measure_room(models: Sequence[tuple[Target, Path]], k: int) -> MeshRoom:
    """Calibrate on the benchmark's own model files (a private cluster, stopped before returning)."""
    from loadtest.models import TrainedModel
    from loadtest.scenarios.many_models import Settings, calibrate

    files = [TrainedModel(t.model_id, f, t.sample.shape[1], t.sample) for t, f in models]
    # The Settings only size calibrate's own capacity, which is not used (module docstring).
    cal = calibrate(Settings(models=len(models), runtimes=RUNTIMES, fit=k / len(models)), files)
    return MeshRoom(k=k, capacity_bytes=room_for(k, cal.size_bytes, cal.predicted_bytes),
                    size_bytes=cal.size_bytes, predicted_bytes=cal.predicted_bytes,
                    sizes=list(cal.sizes))


# -- counters ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Reading:
    """Cumulative counts at one moment; None where the system does not give the figure."""

    loads: float
    hits: float | None = None
    misses: float | None = None
    evictions: float | None = None


class Counter(Protocol):
    async def read(self) -> Reading: ...


class RayCounter:
    def __init__(self, peer: Any) -> None:  # ray_app.RayPeer
        self._peer = peer

    async def read(self) -> Reading:
        return Reading(loads=float(self._peer.loads()))


class MeshCounter:
    """The runtimes' (and router's) /metrics of one ``mesh up``, found from its logs."""

    def __init__(self, up_log: Path, *, timeout_s: float = 20.0) -> None:
        self.runtime_urls: list[str] = []
        self.router_url = ""
        wait_until(lambda: self._find(up_log), timeout_s=timeout_s, what="mesh metrics URLs")

    def _find(self, up_log: Path) -> bool:
        match = re.search(r"^logs: (.+)$", up_log.read_text(errors="replace"), re.MULTILINE)
        if not match:
            return False
        workdir = Path(match.group(1).strip())
        runtimes = sorted(workdir.glob("runtime-*.log"))
        urls = [_metrics_url(p) for p in runtimes]
        router = _metrics_url(workdir / "router.log")
        if len(runtimes) != RUNTIMES or not all(urls) or not router:
            return False
        self.runtime_urls, self.router_url = [u for u in urls if u], router
        return True

    async def read(self) -> Reading:
        from loadtest.scenarios.many_models import snapshot

        snap = await snapshot(self.runtime_urls, self.router_url)
        return Reading(loads=snap.loads, hits=snap.cache.hits, misses=snap.cache.misses,
                       evictions=snap.evictions)


def _metrics_url(log_path: Path) -> str | None:
    """The URL of the first ``metrics serving`` event a server logged (JSON lines), if any."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return None
    for line in lines:
        if '"metrics serving"' not in line:
            continue
        try:
            return str(json.loads(line)["url"])
        except (ValueError, KeyError, TypeError):
            continue
    return None


class Marks:
    """Readings taken at the start and end of each measured part, and what they add up to."""

    def __init__(self, counter: Counter | None) -> None:
        self._counter = counter
        self.readings: list[Reading] = []

    async def mark(self) -> None:
        if self._counter is not None:
            self.readings.append(await self._counter.read())

    def summary(self, phases: Sequence[str] = ("open", "closed")) -> dict[str, Any]:
        """Loads per measured part and in all; hits, misses and hit ratio where counted."""
        if self._counter is None:
            return {"loads": None, "hits": None, "misses": None, "hit_ratio": None}
        pairs = list(zip(self.readings[0::2], self.readings[1::2], strict=True))
        assert len(pairs) == len(phases), (len(pairs), phases)

        def total(field: str) -> float | None:
            """The field's growth summed over the measured parts; None if not counted."""
            grown = 0.0
            for a, b in pairs:
                start, end = getattr(a, field), getattr(b, field)
                if start is None or end is None:
                    return None
                grown += end - start
            return grown

        loads = {p: int(b.loads - a.loads) for p, (a, b) in zip(phases, pairs, strict=True)}
        hits, misses, evictions = total("hits"), total("misses"), total("evictions")
        out: dict[str, Any] = {"loads": sum(loads.values()), "loads_by_phase": loads,
                               "hits": None if hits is None else int(hits),
                               "misses": None if misses is None else int(misses),
                               "hit_ratio": None}
        if hits is not None and misses is not None and hits + misses > 0:
            out["hit_ratio"] = round(hits / (hits + misses), 4)
        if evictions is not None:
            out["evictions"] = int(evictions)
        return out
