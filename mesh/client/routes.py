"""A smart client's copy of the routers' route table (pure: no grpc, time injected).

Fed by the route stream (``mmesh.ModelMeshRoutes/watchRoutes``, ``mesh.router.routes``): model ID ->
its loaded copies as (instance ID, endpoint). Asked once per request, so :meth:`Routes.pick` is a
few dict lookups: whether direct routing may be used at all (:meth:`usable`), then a copy of the
model chosen round-robin among those not suspected.

Doubt sends a request to the router, never to a guess:

- not ``synced`` (no snapshot yet, a snapshot half received, or the stream broke: :meth:`lost`);
- the router does not offer direct routing now (``direct`` false in its last message);
- nothing heard for ``stale_after_s`` (three of the router's heartbeats unless the client says
  otherwise): the stream may be stuck behind a partition while the cluster moves on;
- the model has no copy here (cold, or a vModel: the client keeps no vModel targets);
- a model whose copy answered "not here" goes to the router for ``stale_model_s``
  (:meth:`not_here`): the router's update removing the copy arrives within that time if the copy
  is gone, and a copy loaded again meanwhile (an update that changed nothing) is used again after
  it; an endpoint that failed at the transport level is skipped for
  ``suspect_s`` (:meth:`failed`), so a dead runtime costs each request at most one wasted try
  until its lease expires and the router's update removes it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

Copy = tuple[str, str]  # (instance ID, endpoint)


class Routes:
    def __init__(self, *, stale_after_s: float | None = None, suspect_s: float = 5.0,
                 stale_model_s: float = 1.0) -> None:
        self.copies: dict[str, tuple[Copy, ...]] = {}
        self.synced = False
        self.direct = False
        self.heard = -math.inf  # monotonic time of the last message
        self.heartbeat_s = 1.0
        self._stale_after_fixed = stale_after_s
        self.stale_after_s = stale_after_s if stale_after_s is not None else 3.0
        self.suspect_s = suspect_s
        self.suspects: dict[str, float] = {}  # endpoint -> skipped until (monotonic)
        self.stale_model_s = stale_model_s
        self.stale_models: dict[str, float] = {}  # model ID -> through the router until (monotonic)
        self._turn = 0

    # --- fed by the stream ------------------------------------------------------------------------
    def apply(self, *, reset: bool, models: Iterable[tuple[str, tuple[Copy, ...]]], synced: bool, direct: bool,
              heartbeat_ms: int, now: float) -> None:
        if reset:
            self.copies = {}
            self.synced = False
        copies = self.copies
        for model_id, routes in models:
            if routes:
                copies[model_id] = routes
            else:
                copies.pop(model_id, None)
        if synced:
            self.synced = True
        self.direct = direct
        self.heard = now
        if heartbeat_ms > 0:
            self.heartbeat_s = heartbeat_ms / 1000
            if self._stale_after_fixed is None:
                self.stale_after_s = 3 * self.heartbeat_s

    def lost(self) -> None:
        """The stream broke: nothing is trusted until the next snapshot."""
        self.synced = False

    def endpoints(self) -> set[str]:
        return {endpoint for routes in self.copies.values() for _, endpoint in routes}

    # --- asked per request ------------------------------------------------------------------------
    def usable(self, now: float) -> bool:
        return self.synced and self.direct and now - self.heard <= self.stale_after_s

    def pick(self, model_id: str, now: float) -> Copy | None:
        """A copy of ``model_id`` to send to directly, or None: ask the router."""
        if not (self.synced and self.direct and now - self.heard <= self.stale_after_s):
            return None
        routes = self.copies.get(model_id)
        if routes is None:
            return None
        if self.stale_models and self._held(self.stale_models, model_id, now):
            return None
        if self.suspects:
            routes = tuple(c for c in routes if not self._suspected(c[1], now))
            if not routes:
                return None
        self._turn += 1
        return routes[self._turn % len(routes)]

    def _suspected(self, endpoint: str, now: float) -> bool:
        return self._held(self.suspects, endpoint, now)

    @staticmethod
    def _held(until_by_key: dict[str, float], key: str, now: float) -> bool:
        until = until_by_key.get(key)
        if until is None:
            return False
        if now >= until:
            del until_by_key[key]
            return False
        return True

    def prune(self, now: float) -> None:
        """Forget expired marks and those of endpoints and models no route names (bounded state)."""
        endpoints = self.endpoints()
        for endpoint, until in list(self.suspects.items()):
            if until <= now or endpoint not in endpoints:
                del self.suspects[endpoint]
        for model_id, until in list(self.stale_models.items()):
            if until <= now or model_id not in self.copies:
                del self.stale_models[model_id]

    # --- told by the requests -----------------------------------------------------------------------
    def not_here(self, model_id: str, now: float) -> None:
        """A runtime answered that the model's copy is gone: the model's routes are in doubt."""
        self.stale_models[model_id] = now + self.stale_model_s

    def failed(self, endpoint: str, now: float) -> None:
        """No answer from ``endpoint`` (connection refused or reset, deadline): skip it a while."""
        self.suspects[endpoint] = now + self.suspect_s
