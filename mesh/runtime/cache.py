"""The runtime's local model cache: single-flight loads, byte accounting, eviction by policy.

Accounting. Every copy counts against the budget of its device (``ram`` or ``gpu<N>``) from the
moment its load is admitted until its memory is really released: a loading copy counts with its
*predicted* size, a loaded one with its *measured* size, and an evicted copy keeps counting while
requests still use it and until its ``close`` returns (an "unload in progress"). So the sum never
exceeds the capacity, whatever overlaps: ModelMesh's users saw pods OOM when evicted models that
were still unloading were not counted (modelmesh-serving#455).

Single flight. The first request for a cold model creates its entry synchronously (no await in
between), so every concurrent request finds the entry and awaits the same future: 100 concurrent
first requests cause one load.

Eviction. Which copies give way is the policy's decision (``placement``), asked through the
decision kernel the simulator runs too (``placement.kernel.make_room``, ``admission``); this
module only asks for victims when a load needs room, skipping copies that are still loading, and
counts the bytes of copies already draining as on their way out (a load waiting for them evicts
no more). Victims stop taking new requests at once; their bytes are freed once their in-flight
requests finish.

Admission. A demand load first asks the policy whether the model may enter (``admit``: TinyLFU,
the churn guard). A refused model is still loaded and serves its requests (the cluster simulator
does the same), but it enters the eviction order ``placement.kernel.REFUSED_AGE_S`` in the past,
behind every model in use, so it is the first to give way unless it is used again: a run of
refused newcomers takes turns in the room the first of them made instead of evicting the models
the filter judged more valuable. Loads made ahead of any request (ensureLoaded: proactive loads, scale-out copies) were
asked for and are not filtered.

The pass-through room (``runtime.passthrough_bytes``, RAM only; issue 18). The first refused
newcomer of a run still evicts an admitted model to make its room. With a pass-through room, part
of the capacity is held back for refused models: one is loaded there instead, evicting none of the
admitted ones, and serves (hits included: each one counts for the filter, which may admit it at its
next load) until a later refused model needs the room. Then the room's least recently used copies
give way (``placement.kernel.pool_room``; one in use drains first, one whose waiters have not yet
taken it is kept), and a load finding the room held by another load into it waits for that one. A
refused model larger than the room, or still without room at its load's deadline, goes to the main
room as the first to go. The main room's capacity is the rest, so both together never pass the
device's capacity.

Measured size. A model's size is measured after its load from two readings: the loader's
accounting of the objects it built (``footprint_bytes``: arrays, trees, parameters, initializers)
and the growth of the process's resident memory across the load. RSS growth catches native memory
the loader cannot see, but it also catches process-wide, one-time growth that belongs to no model:
the first ONNX session creates onnxruntime's environment (+24 MiB here), LightGBM starts its OpenMP
pool (+15 MiB), allocator arenas grow in steps. Charging that to whichever model loaded at the time
would make a 10 KiB model look like 24 MiB and evict dozens of others. So the RSS reading counts
only up to ``2 x basis + min(256 KiB, basis)``, where the basis is ``max(footprint, prediction)``,
and only when no other load overlapped it (otherwise the growth cannot be attributed at all):
size = max(footprint, capped RSS growth). A prediction at the sizer's floor is no estimate of this
model (it is what every unknown model gets), so then the basis is the footprint alone: otherwise a
2.7 KB model was charged 266 KB (one allocator step) and refused by a small runtime. Nor is one
below the floor (a small model's size on disk x its type's learned ratio, issue 18): that ratio is
learned from these very measurements, and a basis that grew with it would let one allocator step
raise the ratio, the next prediction, the next cap, and so on. Nor is the RSS growth believed when
a model library was imported meanwhile (the first load of another type, issue 18). Nor when it is
within ``RSS_NOISE_BYTES`` (256 KiB) of the footprint: at that scale a reading is pages and arena
steps of whatever ran meanwhile, requests served during the load included (a 19 KB scikit-learn
model measured 20 KB alone and 57 KB under traffic), and a size that noisy made a model's next
prediction, learned from it, exceed a small runtime's capacity; so for a model of a few hundred KB
or less its footprint is its size, and the native memory that misses is nothing at any capacity
that matters. Nor when the capped growth is more than the whole capacity while the
footprint fits in it: then the model is charged its footprint rather than failed on its
neighbours' allocations.

On a GPU the size is the device's growth across the load, read from NVML (``GpuMemory.usage``: the
process's bytes on the device) before and after it, with one load at a time per GPU, so the growth
is that model's alone: its weights plus whatever its library allocates for it (an ONNX Runtime
session's arena and cuBLAS workspace, the caching allocator's rounding). The footprint (parameter
bytes) is only the floor. The CUDA context, the one large one-time growth, is created at start-up
before the budgets are read (``mesh.runtime.service.warm_gpus``), so no model is charged with it.
Growth beyond ``2 x basis + 256 MiB`` is not believed (another process allocating meanwhile, where
NVML cannot tell processes apart). A GPU copy is charged to its GPU's budget only, and evictions
for it come from that GPU only: a GPU model never evicts a RAM model, nor the reverse.

Capacity holds at every step: a load reserves its prediction before it starts, and when the
measured size is larger, the difference is reserved the same way (evicting, or waiting for copies
that are unloading) before it is counted; a load that cannot get it fails with RESOURCE_EXHAUSTED.
A prediction over the capacity is refused at once, unless it is a learned estimate (no size from
the registration) at most ``ESTIMATE_OVERSHOOT`` (2) times the capacity: that one reserves the
whole capacity and its measured size decides, since the ratio behind it is an average that a model
of another shape can miss by that much.

Time comes from an injected clock, so tests drive recency without sleeping.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Protocol

import psutil
import structlog

from mesh.errors import (
    DeadlineExceeded,
    MeshError,
    ModelLoadError,
    NotHere,
    ResourceExhausted,
    Unavailable,
)
from mesh.registry.records import FAILED, LOADED, LOADING, ModelSpec
from mesh.runtime.loaders.base import LoadedModel
from mesh.tasks import Background
from placement.kernel import admission, make_room, pool_room
from placement.policy import EvictionPolicy

log = structlog.get_logger(__name__)

UNLOADING = "unloading"
RSS_SLACK_BYTES = 256 * 1024
# RSS growth this close to the footprint is the allocator's and the other threads' noise (pages,
# arena steps, a request's buffers), not the model's: the footprint counts instead.
RSS_NOISE_BYTES = 256 * 1024
# A predicted size up to this many times the capacity is tried (in all of it) rather than refused.
ESTIMATE_OVERSHOOT = 2
# A GPU copy may legitimately take this much beyond twice its weights: its library's workspaces
# (cuBLAS, cuDNN) and the allocator's rounding.
GPU_SLACK_BYTES = 256 * 1024 * 1024

# (spec, device) -> loaded model; runs in a worker thread.
LoadFn = Callable[[ModelSpec, str], LoadedModel]
# (spec, device) -> predicted bytes of the model on that device.
PredictFn = Callable[[ModelSpec, str], int]


class Fetched(Protocol):
    path: str
    source: str


class Fetch(Protocol):
    """Brings a model's files to local disk before its load (``mesh.storage.puller.Puller``)."""

    async def pull(self, spec: ModelSpec) -> Fetched | None: ...

    def done(self, pulled: Any) -> None: ...

    async def verified(self, pulled: Any) -> None: ...


class CacheListener(Protocol):
    """Told about every state change of a copy (publishes placements, counts metrics)."""

    def on_change(self, entry: Entry, event: str) -> None:
        """event: loading, loaded, failed, evicted (for capacity), unloaded (any other reason:
        ``entry.unload_reason``), released (an evicted or unloaded copy's memory is free)."""


@dataclass(eq=False)
class Entry:
    spec: ModelSpec
    device: str
    state: str
    reserved_bytes: int
    ready: asyncio.Future[LoadedModel]
    predicted_bytes: int = 0
    model: LoadedModel | None = None
    in_use: int = 0
    waiting: int = 0  # requests waiting for this copy's load to finish (acquire)
    created: float = 0.0
    loaded_at: float = 0.0
    last_used: float = 0.0
    error: str = ""
    load_ms: float = 0.0
    slot_at: float = 0.0  # perf_counter when the load got its load slot (its log line's slot_ms)
    predict_ms: float = -1.0  # recent inference time (decode + predict + encode), -1 until measured
    initial_last_used: float | None = None  # enters the eviction order at this time, if set
    # Set when the copy is removed: why (capacity, requested, unregistered, redefined, shutdown),
    # how long it had been idle (cache clock), when (perf_counter), and whether its close raised.
    unload_reason: str = ""
    idle_s: float = 0.0
    unload_started: float = 0.0
    unload_failed: bool = False
    load_reason: str = ""  # why it was loaded: "request" (a miss) or "loadModel" (asked ahead of traffic)
    admitted: bool = True  # False: the admission filter refused it (served, then first to go)
    pooled: bool = False  # held in the pass-through room (its bytes counted there, not in the policy)
    # Pulled from object storage (mesh.storage.puller): the registration with the local path the
    # loader reads, and where it came from (the load's log line).
    local: ModelSpec | None = None
    source: str = ""
    fetch_ms: float = 0.0
    pulled: Any = None  # what the pull answered (its checksums may still be compared: Fetch.verified)
    drained: asyncio.Event = field(default_factory=asyncio.Event)
    gone: asyncio.Event = field(default_factory=asyncio.Event)  # memory released

    @property
    def model_id(self) -> str:
        return self.spec.model_id

    @property
    def load_spec(self) -> ModelSpec:
        """What the loader reads: the registration, with the pulled model's local path if any."""
        return self.local or self.spec


@dataclass
class DeviceBudget:
    device: str
    capacity_bytes: int  # the main room: admitted models (the policy's)
    policy: EvictionPolicy
    used_bytes: int = 0
    # The pass-through room (module docstring), beside the main one: its bytes, those counted in it,
    # and its loaded copies, least recently used first.
    pool_capacity_bytes: int = 0
    pool_used_bytes: int = 0
    pool: dict[str, None] = field(default_factory=dict)


@dataclass(frozen=True)
class CacheStats:
    devices: dict[str, tuple[int, int]]  # device -> (capacity, used)
    loaded: int
    loading: int
    lru_time: float | None
    loads: int
    evictions: int
    hits: int
    misses: int
    refused: int = 0
    loaded_by_device: dict[str, int] = field(default_factory=dict)
    passed_through: int = 0  # refused models loaded into the pass-through room


class ModelCache:
    def __init__(
        self,
        *,
        budgets: list[DeviceBudget],
        load_fn: LoadFn,
        predict_size: PredictFn,
        observe_size: Callable[[ModelSpec, str, int], None],
        choose_device: Callable[[ModelSpec, dict[str, DeviceBudget], PredictFn], str],
        executor: Executor,
        max_concurrent_loads: int,
        load_timeout_s: float,
        clock: Callable[[], float] = time.time,
        listener: CacheListener | None = None,
        rss: Callable[[], int] | None = None,
        prepare_fn: Callable[[ModelSpec], None] | None = None,
        estimate_fn: Callable[[ModelSpec], None] | None = None,
        max_stuck_loads: int = 4,
        size_floor_bytes: int = 0,
        gpu_usage: Callable[[str], int] | None = None,
        device_executors: Mapping[str, Executor] | None = None,
        before_load: Callable[[Entry], Awaitable[None]] | None = None,
        fetch: Fetch | None = None,
        process_activity: Callable[[], tuple[int, int]] | None = None,
    ) -> None:
        # (events, running) of process-wide memory work outside the loads (a model library's
        # import: mesh.runtime.libraries.IMPORTS.activity); a load that overlaps any is not solo.
        self._process_activity = process_activity or _no_activity
        # Awaited just before the loader runs: the runtime writes down that the load is starting
        # (Publisher.announce), so that if the loader kills the process its callers know why.
        self._before_load = before_load
        # First step of a load: the model's files from object storage (mesh.storage.puller).
        self._fetch = fetch
        self._size_floor = size_floor_bytes  # the sizer's floor: a prediction at it is no estimate
        self._budgets = {b.device: b for b in budgets}
        self._load_fn = load_fn
        self._predict_size = predict_size
        self._observe_size = observe_size
        self._choose_device = choose_device
        self._executor = executor
        self._load_slots = asyncio.Semaphore(max_concurrent_loads)
        self._load_timeout_s = load_timeout_s
        self._clock = clock
        self._listeners: list[CacheListener] = [listener] if listener is not None else []
        self._rss = rss or _process_rss()
        self._gpu_usage = gpu_usage  # this process's bytes on a GPU now (GpuMemory.usage)
        # Where each GPU's copies run their predictions (RuntimeService): warm-ups run there too.
        self._device_executors = dict(device_executors or {})
        # One load at a time per GPU, so that the device's growth across a load is that model's.
        self._device_locks = {d: asyncio.Lock() for d in self._budgets if d != "ram"}
        self._device_loading: set[str] = set()
        self._prepare_fn = prepare_fn
        self._estimate_fn = estimate_fn  # reads the model's files for predict_size (SizePredictor.prepare)
        self._max_stuck_loads = max_stuck_loads
        self._stuck: dict[int, str] = {}  # abandoned load steps still running -> their model
        self._entries: dict[str, Entry] = {}
        self._tasks = Background("cache")  # loads and unloads in progress
        self._unloading: set[Entry] = set()
        self._topping_up: set[str] = set()  # loads waiting to reserve more than they predicted
        self._space_freed = asyncio.Condition()
        self._loads_running = 0
        self._load_epoch = 0  # bumped at each load start: tells whether loads overlapped
        self.loads = self.evictions = self.hits = self.misses = self.refused = self.passed_through = 0

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """A load or unload (the coroutines handle their own errors; mesh.tasks.Background)."""
        self._tasks.spawn(coro, name)

    def set_listener(self, listener: CacheListener) -> None:
        self._listeners = [listener]

    def add_listener(self, listener: CacheListener) -> None:
        self._listeners.append(listener)

    # --- lookups ------------------------------------------------------------------------------
    def get(self, model_id: str) -> Entry | None:
        return self._entries.get(model_id)

    def loaded(self, model_id: str) -> Entry | None:
        """The loaded copy, touched as a hit; None on a miss (the hot path: no awaits)."""
        entry = self._entries.get(model_id)
        if entry is None or entry.state != LOADED:
            return None
        now = self._clock()
        entry.last_used = now
        budget = self._budgets[entry.device]
        # For a copy in the pass-through room the policy only counts the use (its admission filter
        # may admit the model at its next load); its place in that room's order moves.
        budget.policy.touch(model_id, now)
        if entry.pooled:
            budget.pool[model_id] = budget.pool.pop(model_id, None)
        self.hits += 1
        return entry

    def entries(self) -> list[Entry]:
        return list(self._entries.values())

    # --- loading ------------------------------------------------------------------------------
    async def acquire(self, spec: ModelSpec, *, allow_load: bool = True,
                      last_used: float | None = None, reason: str = "request") -> Entry:
        """The loaded copy of ``spec``'s model, loading it first if needed (single flight).

        With ``allow_load=False`` a missing copy raises :class:`NotHere` instead (the router sent
        the request here believing the copy was loaded; it was evicted meanwhile). ``last_used``
        places a load made ahead of any request (ensureLoaded) at that time in the eviction order,
        as ModelMesh does for new registrations, so it cannot push out models in use.
        """
        # A waiter resumes a loop iteration after the load completes; in between, another load may
        # have evicted the copy (a tiny cache under churn). Then look again: load anew if allowed.
        for _ in range(3):
            entry = self.loaded(spec.model_id)
            if entry is not None:
                return entry
            entry = self._entries.get(spec.model_id)
            if entry is None:
                if not allow_load:
                    raise NotHere(f"model {spec.model_id!r} is not loaded on this instance")
                self.misses += last_used is None
                entry = self._start_load(spec, last_used, reason)
            # shield: one cancelled waiter must not cancel the load the others wait for
            entry.waiting += 1
            try:
                await asyncio.shield(entry.ready)
            finally:
                entry.waiting -= 1
                if entry.pooled and not entry.waiting:  # a load waiting for the room may drop it now
                    self._spawn(self._wake_space_waiters(), f"waited:{entry.model_id}")
            if entry.state == LOADED:
                entry.last_used = self._clock()
                return entry
        raise NotHere(f"model {spec.model_id!r} was evicted as soon as it loaded; the instance is "
                      "too small for its working set")

    def _start_load(self, spec: ModelSpec, last_used: float | None, reason: str = "request") -> Entry:
        """The entry of a new load, created at once (single flight); what the load needs to know
        about the model's files (its size, so its device and reservation) is read in its thread."""
        if len(self._stuck) >= self._max_stuck_loads:
            raise Unavailable(
                f"{len(self._stuck)} loads on this instance never returned (a stuck mount or a hung "
                f"library: {', '.join(self.stuck_loads[:3])}); it takes no more loads until they "
                "end or it restarts")
        now = self._clock()
        entry = Entry(spec=spec, device="", state=LOADING, reserved_bytes=0,
                      ready=asyncio.get_running_loop().create_future(),
                      created=now, last_used=now, initial_last_used=last_used, load_reason=reason)
        self._entries[spec.model_id] = entry
        self._spawn(self._load(entry), f"load:{spec.model_id}")
        return entry

    def _place(self, entry: Entry) -> None:
        """Choose the copy's device and reservation (its files were read: no I/O here), ask the
        admission filter, and announce the load."""
        spec, now = entry.load_spec, self._clock()
        device = self._choose_device(spec, self._budgets, self._predict_size)
        budget = self._budgets[device]
        predicted = self._predict_size(spec, device)
        if budget.capacity_bytes < predicted <= ESTIMATE_OVERSHOOT * budget.capacity_bytes and not spec.size_hint_bytes:
            # A learned estimate a little over the room (file size x its type's ratio, which a few
            # models of another shape can skew): tried in all the room, and its measured size
            # decides, rather than refused on a guess. A size the registration gave is not a guess.
            predicted = budget.capacity_bytes
        if predicted > budget.capacity_bytes:
            raise ResourceExhausted(
                f"model {spec.model_id!r} needs about {predicted} bytes but this instance's {device} "
                f"capacity is {budget.capacity_bytes} bytes")
        entry.device, entry.predicted_bytes = device, predicted
        # The kernel's rule (placement.kernel.admission): a refused model is served, then first to
        # go (see "Admission" above); said in the load's one log line.
        # The room other loads in progress take (reserved, or waiting to reserve): the policy does
        # not see it (kernel.admission's ``held``).
        held = sum(max(e.reserved_bytes, e.predicted_bytes) for e in self._entries.values()
                   if e.state == LOADING and e.device == device and not e.pooled and e is not entry)
        admitted, entry.initial_last_used = admission(budget.policy, spec.model_id, predicted, now,
                                                      entry.initial_last_used, held=held)
        if not admitted:
            entry.admitted = False
            self.refused += 1
            # Into the pass-through room if it can ever fit there (_reserve_pooled decides at once);
            # never a pinned model: the room drops its copies, the main room keeps pinned ones.
            entry.pooled = 0 < predicted <= budget.pool_capacity_bytes and spec.min_copies <= 0
        self._notify(entry, LOADING)

    async def _load(self, entry: Entry) -> None:
        try:
            model = await self._load_guarded(entry)
        except BaseException as exc:
            if self._entries.get(entry.model_id) is entry:
                del self._entries[entry.model_id]
            self._release(entry)
            entry.gone.set()
            entry.state = FAILED
            if isinstance(exc, asyncio.CancelledError):  # process shutdown
                entry.ready.cancel()
                raise
            entry.error = exc.message if isinstance(exc, MeshError) else f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, MeshError):
                exc = ModelLoadError(f"{entry.spec.type}: loading {entry.model_id!r} failed: {entry.error}")
            entry.ready.set_exception(exc)
            entry.ready.exception()  # retrieved; waiters re-raise it
            log.warning("load failed", model_id=entry.model_id, reason=entry.load_reason, error=entry.error)
            self._notify(entry, FAILED)
            await self._wake_space_waiters()
            return
        entry.model = model
        entry.state = LOADED
        entry.loaded_at = self._clock()
        entry.ready.set_result(model)
        self._notify(entry, LOADED)
        # Loads waiting for room may go on now: this copy is measured (usually smaller than its
        # reservation, which is given back) and evictable, neither of which it was while loading.
        await self._wake_space_waiters()

    async def _load_guarded(self, entry: Entry) -> LoadedModel:
        async with self._load_slots:
            entry.slot_at = time.perf_counter()
            pulled = await self._pull(entry)
            try:
                return await self._load_local(entry)
            finally:
                if self._fetch is not None:
                    self._fetch.done(pulled)

    async def _pull(self, entry: Entry) -> Fetched | None:
        """The model's files from object storage, within the load's deadline (part of the load:
        its time is in ``load_ms``)."""
        if self._fetch is None:
            return None
        started = time.perf_counter()
        try:
            pulled = await asyncio.wait_for(self._fetch.pull(entry.spec), self._load_timeout_s)
        except TimeoutError:
            raise DeadlineExceeded(f"pulling model {entry.model_id!r} from storage took longer than "
                                   f"{self._load_timeout_s:g} s (runtime.load_timeout_s)") from None
        entry.fetch_ms = (time.perf_counter() - started) * 1000
        if pulled is not None:
            entry.local = dataclasses.replace(entry.spec, path=pulled.path)
            entry.source, entry.pulled = pulled.source, pulled
        return pulled

    async def _load_local(self, entry: Entry) -> LoadedModel:
        # First what the load needs from the model's files (their size; the loader's library
        # imported), in the load's own thread and within its deadline: a stuck mount costs
        # this load its deadline, never the event loop or another load's slot.
        await self._timed(entry, self._prepare, entry.load_spec, what="reading the files of")
        self._place(entry)
        lock = self._device_locks.get(entry.device)
        if lock is None:
            return await self._load_measured(entry)
        async with lock:  # a GPU: one load at a time (see __init__)
            self._device_loading.add(entry.device)
            try:
                return await self._load_measured(entry)
            finally:
                self._device_loading.discard(entry.device)

    def _prepare(self, spec: ModelSpec) -> None:
        if self._estimate_fn is not None:
            self._estimate_fn(spec)
        if self._prepare_fn is not None:
            self._prepare_fn(spec)

    async def _timed(self, entry: Entry, fn: Callable[..., Any], *args: Any, what: str) -> Any:
        """``fn(*args)`` in a thread of its own, within the load timeout. Past it the thread is
        abandoned (Python cannot stop it): its load slot is released at once, and the load counts
        as stuck until the thread returns; bytes reserved for it stay counted until then."""
        future = _in_thread(fn, *args, name=f"load:{entry.model_id[:60]}")
        try:
            return await asyncio.wait_for(asyncio.shield(future), self._load_timeout_s)
        except TimeoutError:
            self._abandon(entry, future)
            raise DeadlineExceeded(f"{what} model {entry.model_id!r} took longer than "
                                   f"{self._load_timeout_s:g} s (runtime.load_timeout_s)") from None

    async def _load_measured(self, entry: Entry) -> LoadedModel:
        spec, budget = entry.load_spec, self._budgets[entry.device]
        gpu_usage = self._gpu_usage if entry.device != "ram" else None
        if entry.pooled and budget.used_bytes + entry.predicted_bytes <= budget.capacity_bytes:
            entry.pooled = False  # the main room has it free: first to go there evicts nobody
        if not (entry.pooled and await self._reserve_pooled(entry, budget, entry.predicted_bytes)):
            entry.pooled = False
            await self._reserve(entry, budget, entry.predicted_bytes)
        if self._before_load is not None:
            await self._before_load(entry)
        self._load_epoch += 1
        epoch, self._loads_running = self._load_epoch, self._loads_running + 1
        rss_before, activity = self._rss(), self._process_activity()
        gpu_before = gpu_usage(entry.device) if gpu_usage else 0
        started = time.perf_counter()
        try:
            model: LoadedModel = await self._timed(entry, self._load_fn, spec, entry.device, what="loading")
        finally:
            self._loads_running -= 1
        if self._fetch is not None and entry.pulled is not None:
            try:  # the pulled files' checksums, compared while the loader ran
                await self._fetch.verified(entry.pulled)
            except BaseException:
                await self._close_model(model)
                raise
        warm_executor = self._device_executors.get(entry.device)
        if warm_executor is not None:
            await self._warm_up(model, warm_executor)
        entry.load_ms = entry.fetch_ms + (time.perf_counter() - started) * 1000
        solo = self._loads_running == 0 and self._load_epoch == epoch and \
            activity == self._process_activity() and activity[1] == 0
        rss_growth = self._rss() - rss_before if solo else 0
        gpu_growth = gpu_usage(entry.device) - gpu_before if gpu_usage else 0
        if entry.device == "ram":
            footprint = model.footprint_bytes()
            measured = measured_size(footprint, rss_growth, entry.predicted_bytes, self._size_floor)
            if measured > budget.capacity_bytes >= footprint:
                # More than the whole room, from RSS growth alone: other threads' allocations (the
                # requests served meanwhile), not this model's, whose own objects fit. Failing the
                # load on that would be failing it on noise (module docstring, "Measured size").
                measured = max(footprint, 1)
        else:
            measured = gpu_measured_size(model.footprint_bytes(), gpu_growth, entry.predicted_bytes)
        self._observe_size(spec, entry.device, measured)
        # Re-weigh with the measured size; reserve more (evicting, or waiting for copies that are
        # draining) if the prediction was too low, so that the sum never passes the capacity.
        delta = measured - entry.reserved_bytes
        if entry.pooled and delta > 0 and not await self._reserve_pooled(entry, budget, delta, wait=False):
            # Larger than the pass-through room can hold now: into the main room, as the first to go.
            self._release(entry)
            entry.pooled = False
            delta = measured
        if entry.pooled:
            budget.pool_used_bytes += measured - entry.reserved_bytes  # a smaller copy gives back the rest
            entry.reserved_bytes = measured
            budget.pool[spec.model_id] = None
        elif delta > 0:
            try:
                if measured > budget.capacity_bytes:
                    raise ResourceExhausted(
                        f"model {spec.model_id!r} measures {measured} bytes once loaded, more than "
                        f"this instance's {entry.device} capacity of {budget.capacity_bytes} bytes")
                await self._reserve(entry, budget, delta, top_up=True)
            except BaseException:
                await self._close_model(model)
                raise
        else:
            budget.used_bytes += delta
            entry.reserved_bytes = measured
        if not entry.pooled:
            budget.policy.insert(spec.model_id, measured, self._clock(),
                                 last_used=entry.initial_last_used, cost=entry.load_ms)
        else:
            self.passed_through += 1
        log.info("model loaded", model_id=spec.model_id, reason=entry.load_reason, device=entry.device,
                 size_bytes=measured, predicted_bytes=entry.predicted_bytes, load_ms=round(entry.load_ms, 2),
                 # The whole time the load has held its slot (reading the files, making room,
                 # announcing it, loading): how long a load takes in the simulator's terms.
                 slot_ms=round((time.perf_counter() - entry.slot_at) * 1000, 2),
                 **({"source": entry.source, "pull_ms": round(entry.fetch_ms, 2)} if entry.source else {}),
                 **({} if entry.admitted else {"admission": f"refused by {budget.policy.name}: " + (
                     "in the pass-through room" if entry.pooled else "first to go")}))
        self.loads += 1
        return model

    async def _warm_up(self, model: LoadedModel, executor: Executor) -> None:
        """``model.warm_up`` on its prediction thread, within the load timeout; a failure is not the
        load's (the first prediction will meet it)."""
        try:
            await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(executor, model.warm_up),
                                   self._load_timeout_s)
        except Exception:
            log.info("warm-up after load failed", model_id=model.model_id, exc_info=True)

    def _abandon(self, entry: Entry, future: asyncio.Future[Any]) -> None:
        """A timed-out step of a load keeps running in its thread: the load is stuck until it
        ends, and its bytes stay counted until then."""
        zombie = Entry(spec=entry.spec, device=entry.device, state=UNLOADING,
                       reserved_bytes=entry.reserved_bytes, ready=entry.ready, pooled=entry.pooled)
        entry.reserved_bytes = 0
        self._unloading.add(zombie)
        self._stuck[id(zombie)] = entry.model_id
        log.warning("load abandoned at its deadline; its thread goes on", model_id=entry.model_id,
                    stuck_loads=len(self._stuck), timeout_s=self._load_timeout_s)

        def finished(f: asyncio.Future[Any]) -> None:
            async def cleanup() -> None:
                self._stuck.pop(id(zombie), None)
                if not f.cancelled() and f.exception() is None and isinstance(f.result(), LoadedModel):
                    await self._close_model(f.result())
                self._unloading.discard(zombie)
                self._release(zombie)
                await self._wake_space_waiters()

            self._spawn(cleanup(), f"abandon:{entry.model_id}")

        future.add_done_callback(finished)

    @property
    def fetch(self) -> Any:
        """What pulls models from object storage before their load (``mesh.storage.puller``), if any."""
        return self._fetch

    @property
    def stuck_loads(self) -> list[str]:
        """Models whose abandoned load threads have not returned yet."""
        return sorted(self._stuck.values())

    async def _reserve(self, entry: Entry, budget: DeviceBudget, size: int, *, top_up: bool = False) -> None:
        """Count ``size`` more bytes for ``entry``, evicting and then waiting for space as needed.

        ``top_up``: the measured size of a loaded model exceeds its reservation. Then wait only for
        copies that are unloading, or for loads in progress that hold a reservation and are not
        waiting in a top-up themselves (each such load ends: loaded, it can be evicted; failed, its
        reservation is freed). Two loads that each wait for the other's reservation would
        deadlock, so with neither kind the load fails at once. (Predictions below the measured size
        are routine since issue 18 dropped the 64 KiB floor; failing every such top-up while a
        concurrent load held the room failed loads, and their requests, under tight capacity.)"""
        deadline = asyncio.get_running_loop().time() + self._load_timeout_s
        if top_up:
            self._topping_up.add(entry.model_id)
        try:
            await self._reserve_locked(entry, budget, size, top_up, deadline)
        finally:
            self._topping_up.discard(entry.model_id)

    async def _reserve_pooled(self, entry: Entry, budget: DeviceBudget, size: int, *, wait: bool = True) -> bool:
        """Count ``size`` more bytes for ``entry`` in the pass-through room, dropping the room's copies
        that ``placement.kernel.pool_room`` names and waiting for their release; while the room is
        held by loads into it, or by copies whose waiters have not taken them yet, wait for those
        (``wait``). A top-up (not ``wait``) waits only for copies leaving the room, those it drops
        among them (their bytes are freed when their close ends), never for loads into it: two
        loads could wait for each other. False, with nothing dropped, if the room cannot hold it
        (module docstring)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._load_timeout_s
        async with self._space_freed:
            while True:
                if budget.pool_used_bytes + size <= budget.pool_capacity_bytes:
                    budget.pool_used_bytes += size
                    entry.reserved_bytes += size
                    return True
                leaving = self._freeing(budget.device, pooled=True)
                pooled = [self._entries[m] for m in budget.pool]
                room = pool_room(budget.pool, {e.model_id: e.reserved_bytes for e in pooled}, size,
                                 used=budget.pool_used_bytes - leaving, capacity=budget.pool_capacity_bytes,
                                 protected={e.model_id for e in pooled if e.waiting})
                for victim_id in room.victims:
                    self._evict(self._entries[victim_id], reason="capacity")
                if budget.pool_used_bytes + size <= budget.pool_capacity_bytes:
                    continue
                remaining = deadline - loop.time()
                # room.enough: only copies leaving the room hold it; a top-up waits for no other
                if remaining <= 0 or not (room.enough or (wait and self._pool_moving(budget.device, entry))):
                    return False
                try:  # for the dropped copies' close, a load into the room, or waiters taking a copy
                    await asyncio.wait_for(self._space_freed.wait(), remaining)
                except TimeoutError:
                    continue

    def _pool_moving(self, device: str, entry: Entry) -> bool:
        """Whether room in ``device``'s pass-through room will be freed without another eviction:
        copies leaving it, loads into it (they end), copies whose waiters will take them."""
        if self._freeing(device, pooled=True):
            return True
        return any(e is not entry and e.device == device and e.pooled and (e.waiting or e.state == LOADING)
                   and e.reserved_bytes > 0 for e in self._entries.values())

    def _may_wait_for_top_up(self, entry: Entry, device: str) -> bool:
        if any(u.device == device for u in self._unloading):
            return True
        return any(e is not entry and e.state == LOADING and e.device == device and e.reserved_bytes > 0
                   and e.model_id not in self._topping_up for e in self._entries.values())

    async def _reserve_locked(self, entry: Entry, budget: DeviceBudget, size: int, top_up: bool,
                              deadline: float) -> None:
        async with self._space_freed:
            while True:
                need = budget.used_bytes + size - budget.capacity_bytes
                if need <= 0:
                    budget.used_bytes += size
                    entry.reserved_bytes += size
                    return
                self._evict_for(budget, size, exclude=entry.model_id)
                if budget.used_bytes + size <= budget.capacity_bytes:
                    continue
                # Space is held by copies still loading or draining: wait for it to be freed.
                remaining = deadline - asyncio.get_running_loop().time()
                if top_up and not self._may_wait_for_top_up(entry, budget.device):
                    remaining = 0.0
                if remaining <= 0:
                    raise ResourceExhausted(
                        f"no room for model {entry.model_id!r} ({size} bytes) on {budget.device}: "
                        f"{budget.used_bytes} of {budget.capacity_bytes} bytes are held by models "
                        "loading or in use")
                try:
                    await asyncio.wait_for(self._space_freed.wait(), remaining)
                except TimeoutError:
                    continue

    def _evict_for(self, budget: DeviceBudget, size: int, *, exclude: str) -> None:
        """Evict what ``placement.kernel.make_room`` names so that ``size`` more bytes fit on
        ``budget``'s device once the copies already draining there are released (counting those as
        free: evicting again for room that is on its way would evict models for nothing)."""
        # Never proposed as victims: copies still loading, and pinned models (registered with
        # minCopies > 0: the operator asked for them to stay loaded).
        protected = {mid for mid, e in self._entries.items()
                     if e.state != LOADED or e.spec.min_copies > 0} | {exclude}
        room = make_room(budget.policy, size, used=budget.used_bytes, capacity=budget.capacity_bytes,
                         now=self._clock(), protected=protected, freeing=self._freeing(budget.device))
        for victim_id in room.victims:
            victim = self._entries.get(victim_id)
            if victim is None or victim.state != LOADED:
                budget.policy.remove(victim_id)
                continue
            self._evict(victim, reason="capacity")

    def _freeing(self, device: str, *, pooled: bool = False) -> int:
        """Bytes on ``device``'s main room (``pooled``: its pass-through room) held by evicted or
        unloaded copies whose release is under way (not those of abandoned, stuck loads: their
        threads may never return)."""
        return sum(e.reserved_bytes for e in self._unloading
                   if e.device == device and e.pooled == pooled and id(e) not in self._stuck)

    def _evict(self, entry: Entry, *, reason: str) -> None:
        """Stop serving ``entry`` now; free its bytes when its in-flight requests are done."""
        del self._entries[entry.model_id]
        budget = self._budgets[entry.device]
        if entry.pooled:
            budget.pool.pop(entry.model_id, None)
        else:
            budget.policy.remove(entry.model_id)
        entry.state = UNLOADING
        self._unloading.add(entry)
        self.evictions += reason == "capacity"
        age_s = self._clock() - entry.last_used
        entry.unload_reason, entry.idle_s, entry.unload_started = reason, age_s, time.perf_counter()
        log.info("model evicted" if reason == "capacity" else "model unloaded",
                 model_id=entry.model_id, device=entry.device, reason=reason,
                 size_bytes=entry.reserved_bytes, idle_s=round(age_s, 3))
        self._notify(entry, "evicted" if reason == "capacity" else "unloaded")
        self._spawn(self._finish_unload(entry), f"unload:{entry.model_id}")

    async def _finish_unload(self, entry: Entry) -> None:
        if entry.in_use:
            await entry.drained.wait()
        if entry.model is not None:
            entry.unload_failed = not await self._close_model(entry.model)
            entry.model = None
        self._unloading.discard(entry)
        self._release(entry)
        entry.gone.set()
        self._notify(entry, "released")
        await self._wake_space_waiters()

    async def _close_model(self, model: LoadedModel) -> bool:
        """Close ``model``; False if its close raised (logged; its memory is counted as free)."""
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, model.close)
        except Exception:
            log.warning("closing a model failed", model_id=model.model_id, exc_info=True)
            return False
        return True

    def _release(self, entry: Entry) -> None:
        if entry.reserved_bytes:
            budget = self._budgets[entry.device]
            if entry.pooled:
                budget.pool_used_bytes -= entry.reserved_bytes
            else:
                budget.used_bytes -= entry.reserved_bytes
            entry.reserved_bytes = 0

    async def _wake_space_waiters(self) -> None:
        async with self._space_freed:
            self._space_freed.notify_all()

    # --- use and removal ----------------------------------------------------------------------
    def begin_use(self, entry: Entry) -> None:
        entry.in_use += 1
        entry.drained.clear()

    def end_use(self, entry: Entry) -> None:
        entry.in_use -= 1
        if entry.in_use == 0:
            entry.drained.set()

    async def unload(self, model_id: str, *, reason: str = "requested") -> bool:
        """Remove a copy (SPI unloadModel, unregistration); waits for a load in progress first."""
        entry = self._entries.get(model_id)
        if entry is None:
            return False
        if entry.state == LOADING:
            try:
                await asyncio.shield(entry.ready)
            except Exception:
                return False
            entry = self._entries.get(model_id)
            if entry is None or entry.state != LOADED:
                return False
        self._evict(entry, reason=reason)
        await entry.gone.wait()
        return True

    async def close(self) -> None:
        """Unload everything (shutdown)."""
        for entry in list(self._entries.values()):
            await self.unload(entry.model_id, reason="shutdown")

    def _notify(self, entry: Entry, event: str) -> None:
        for listener in self._listeners:
            try:
                listener.on_change(entry, event)
            except Exception:
                log.exception("cache listener failed", model_id=entry.model_id, event=event)

    # --- capacity -----------------------------------------------------------------------------
    def resident_bytes(self, device: str) -> int:
        """Bytes of the copies on ``device`` that are in memory: loaded, or still unloading."""
        loaded = sum(e.reserved_bytes for e in self._entries.values() if e.device == device and e.state == LOADED)
        return loaded + sum(e.reserved_bytes for e in self._unloading if e.device == device)

    def loading_on(self, device: str) -> bool:
        """Whether a load is in progress on ``device`` (a GPU: its growth is not yet measured)."""
        return device in self._device_loading

    async def set_capacity(self, device: str, capacity_bytes: int) -> None:
        """A new budget for ``device`` (a GPU whose free memory changed). When what it holds no
        longer fits, copies of *that device* are evicted by its policy until they do; copies in
        use finish their requests first, and pinned or loading ones stay (logged)."""
        budget = self._budgets[device]
        budget.capacity_bytes = capacity_bytes
        if budget.used_bytes > capacity_bytes:
            self._evict_for(budget, 0, exclude="")
            # Evicted copies count until their memory is released; what stays is what could not go.
            staying = budget.used_bytes - sum(e.reserved_bytes for e in self._unloading if e.device == device)
            if staying > capacity_bytes:
                log.warning("device over its budget: the rest is held by copies loading or pinned",
                            device=device, used_bytes=staying, capacity_bytes=capacity_bytes)
        await self._wake_space_waiters()

    # --- reporting ----------------------------------------------------------------------------
    def stats(self) -> CacheStats:
        by_device = dict.fromkeys(self._budgets, 0)
        for e in self._entries.values():
            if e.state == LOADED:
                by_device[e.device] += 1
        loaded = sum(by_device.values())
        lru_times = [t for b in self._budgets.values() if (t := b.policy.oldest_last_used()) is not None]
        return CacheStats(
            devices={d: (b.capacity_bytes, b.used_bytes) for d, b in self._budgets.items()},
            loaded=loaded, loading=len(self._entries) - loaded,
            lru_time=min(lru_times) if lru_times else None,
            loads=self.loads, evictions=self.evictions, hits=self.hits, misses=self.misses,
            refused=self.refused, loaded_by_device=by_device, passed_through=self.passed_through)

    def budgets(self) -> dict[str, DeviceBudget]:
        return self._budgets



def _no_activity() -> tuple[int, int]:
    return 0, 0


def measured_size(footprint: int, rss_growth: int, predicted: int, floor: int) -> int:
    """A loaded model's size from its footprint and the RSS growth across its load (module
    docstring, "Measured size"): RSS growth counts only up to twice the basis plus a slack for
    allocator steps, and the slack is at most the basis itself, so a few-KB model is charged a
    few KB, not one 256 KiB arena step."""
    if footprint > 0 and rss_growth <= footprint + RSS_NOISE_BYTES:
        return footprint  # noise (module docstring): the loader's own accounting
    informed = predicted if predicted > floor or footprint <= 0 else 0
    basis = max(footprint, informed)
    plausible = 2 * basis + min(RSS_SLACK_BYTES, basis)
    return max(footprint, min(rss_growth, plausible), 1)


def _in_thread(fn: Callable[..., Any], *args: Any, name: str) -> asyncio.Future[Any]:
    """``fn(*args)`` in a new daemon thread; its outcome on a future of the running loop. A thread
    per load rather than a pool: a load that never returns must not hold a pool thread that later
    loads wait for (the load slots bound how many run at once)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def run() -> None:
        try:
            result, error = fn(*args), None
        except BaseException as exc:  # delivered to the awaiting coroutine
            result, error = None, exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:
            pass  # the loop closed meanwhile (process exit)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


def gpu_measured_size(footprint: int, growth: int, predicted: int) -> int:
    """A GPU copy's size: the device's growth across its load (module docstring, "Measured size"),
    at least the footprint, and at most ``2 x basis + GPU_SLACK_BYTES``: growth that large is not
    this model's (another process allocating at the same time, where NVML cannot tell processes
    apart)."""
    basis = max(footprint, predicted)
    return max(footprint, min(growth, 2 * basis + GPU_SLACK_BYTES), 1)


def _process_rss() -> Callable[[], int]:
    process = psutil.Process()
    return lambda: int(process.memory_info().rss)
