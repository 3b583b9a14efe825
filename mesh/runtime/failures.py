"""This runtime's recent load failures: a load that failed is not tried again here until it expires.

Why a runtime remembers: routers stop sending a model to an instance once they see its failure
record (``failures/<model>/<iid>``, on a lease of ``registry.failure_ttl_s``), but the record reaches
them through etcd and their watches, milliseconds to a second after the failure. Meanwhile every
request for the model (a client retrying in a loop, a burst) would start the load again here: a
full read and deserialisation of a file known to be bad. So the runtime keeps the failure for the
same TTL and answers at once with the same reason. The bound on load attempts is then one per
instance per TTL, whatever the clients do, and at most ``MAX_LOAD_FAILURES`` instances (the
routers' side, ``mesh.router.routing``).

Remembered: failures that belong to the model (the loader's error, a load timeout), not those of
the moment (no room on this instance). A different definition of the model (path, type, key...) or
a new registration of it is a different load and is tried at once.

``RememberingCache`` adds this to the model cache from the outside (a subclass whose ``acquire``
consults and feeds the memory), so the cache keeps one concern. It also names the model in a
loader's error, whose reason names only the file: the client's message then says which model
failed and why, while the failure record (``failures/<model>/<iid>``) keeps the loader's reason.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mesh.errors import DeadlineExceeded, MeshError, ModelLoadError
from mesh.registry.records import ModelSpec
from mesh.runtime.cache import Entry, ModelCache

MAX_REMEMBERED = 10_000  # bounds memory if many distinct models fail within one TTL


@dataclass(frozen=True, slots=True)
class _Failure:
    spec: ModelSpec
    error: MeshError
    at: float


class RecentFailures:
    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.time) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._failures: dict[str, _Failure] = {}

    def record(self, spec: ModelSpec, error: BaseException) -> None:
        if self.ttl_s <= 0 or not isinstance(error, ModelLoadError | DeadlineExceeded):
            return
        now = self._clock()
        if len(self._failures) >= MAX_REMEMBERED:
            self._prune(now)
            while len(self._failures) >= MAX_REMEMBERED:
                del self._failures[next(iter(self._failures))]  # the oldest (insertion order)
        self._failures.pop(spec.model_id, None)
        self._failures[spec.model_id] = _Failure(spec, error, now)

    def check(self, spec: ModelSpec) -> None:
        """Raise the remembered failure of this very registration, if it has not expired."""
        failure = self._failures.get(spec.model_id)
        if failure is None:
            return
        age = self._clock() - failure.at
        if age >= self.ttl_s or not (spec.same_definition(failure.spec)
                                     and spec.registered_ms == failure.spec.registered_ms):
            del self._failures[spec.model_id]
            return
        raise type(failure.error)(f"{failure.error.message} (failed here {age:.1f} s ago; not retried "
                                  f"on this instance for {self.ttl_s - age:.1f} s more, unless asked: "
                                  f"`mesh model load {spec.model_id} --retry`)")

    def forget(self, model_id: str) -> None:
        self._failures.pop(model_id, None)

    def _prune(self, now: float) -> None:
        for model_id in [m for m, f in self._failures.items() if now - f.at >= self.ttl_s]:
            del self._failures[model_id]


class RememberingCache(ModelCache):
    """The model cache, with a memory of its recent load failures (see the module docstring)."""

    def __init__(self, *, failures: RecentFailures, **cache_args: Any) -> None:
        super().__init__(**cache_args)
        self.failures = failures

    async def acquire(self, spec: ModelSpec, *, allow_load: bool = True,
                      last_used: float | None = None, reason: str = "request") -> Entry:
        if allow_load and self.get(spec.model_id) is None:
            self.failures.check(spec)  # before a load would start: raise what this load did last
        try:
            return await super().acquire(spec, allow_load=allow_load, last_used=last_used, reason=reason)
        except (ModelLoadError, DeadlineExceeded) as exc:
            named = exc if repr(spec.model_id) in exc.message else type(exc)(
                f"model {spec.model_id!r} failed to load: {exc.message}")
            self.failures.record(spec, named)
            if named is exc:
                raise
            raise named from None
