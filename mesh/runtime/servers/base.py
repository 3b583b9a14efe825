"""What every external model server adapter shares: channels, forwarding, sizes, liveness.

A flavour (``repository``: MLServer and Triton; ``spi``: ModelMesh runtime-SPI servers) says how
to tell the server to load and unload a model and how a request names it; this module does the
rest, the same for all of them:

- **Loads** run in the cache's load threads on a blocking gRPC channel, bounded by
  ``runtime.load_timeout_s``. A server that cannot be reached is tried again a bounded number of
  times (``LOAD_ATTEMPTS``, backing off) within that time; a refusal is not retried. Either way the
  load fails with ModelLoadError carrying the server's reason, so the model's status is
  LOADING_FAILED with it and the cache withdraws the placement. A load that timed out is
  unloaded again on the server (best effort), so that a late success does not hold memory the
  cache no longer counts.
- **Copies.** Loads and unloads of one model name are serialized (a lock per name in use, none
  kept for names at rest; a load waits for it within its deadline), and each load carries a copy
  token: an evicted copy's unload never removes a newer copy of the same model. Loads of different
  models never wait for each other: one slow model must not make the others miss their deadline
  (and be remembered as failing).
- **Sizes**: the server's own report where it has one (the SPI's ``sizeInBytes``); else the growth
  of the resident memory of the server's processes across the load, where the runtime can see
  them (the process listening on the server's port and its children: the same host, or a pod
  with ``shareProcessNamespace``), used only for a load that ran alone (no other load began or
  was running meanwhile), so that growths do not mix; never less than the model's size on disk.
  Else, and for the first model of each type on a server (whose growth includes the libraries
  the server imports for that type: 79 MB for MLServer's first scikit-learn model), the
  runtime's prediction (file size x the learned ratio).
- **Inference** is forwarded from the event loop on one grpc.aio channel as bytes: the request as
  the client wrote it, with the server's name for the model appended as field 1 (protobuf keeps
  the last value of a scalar field) or the ``mm-model-id`` header, as the flavour says. Before a
  name is appended the request must parse as a whole message (``well_formed``): a last field left
  open would take the appended name as its content, and the server would serve the model the
  client named, not the one it was routed to. The answer is read within
  ``router.max_message_bytes``. NOT_FOUND, or a server's "unknown model", means the server lost
  the copy (it restarted) once its ModelReady says the model is not ready: CopyLost, and the
  service loads it again. While the server still holds the model, such an answer is about the
  request (a ``model_version`` it lacks): INVALID_ARGUMENT, and no reload a client could repeat.
- **Liveness.** ``supervise`` asks the server's ServerLive every ``POLL_S``; after ``DOWN_AFTER``
  failed answers in a row every copy is reported lost (placements withdrawn), and until the server
  answers again the runtime reports not ready and publishes that it takes no loads, so routers
  load its models elsewhere; a load asked of it meanwhile answers UNAVAILABLE, which is not the
  model's failure (not remembered against it). Before the supervisor notices, a load fails after
  its bounded retries with ModelLoadError: LOADING_FAILED with the reason.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import itertools
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path

import psutil
import structlog
from google.protobuf import empty_pb2
from google.protobuf.message import DecodeError

from mesh.errors import (
    DeadlineExceeded,
    InvalidArgument,
    MeshError,
    ModelLoadError,
    NotHere,
    ResourceExhausted,
    Unavailable,
)
from mesh.gen.inference import grpc_service_pb2 as pb
from mesh.registry.records import ModelSpec
from mesh.runtime.forwarding import CopyLost, ForwardingModel
from mesh.runtime.loaders.base import LoadPolicy, resolve_path
from mesh.tensors import TensorSpec
from mesh.transport.model_server import ServerCallError, ServerChannel

log = structlog.get_logger(__name__)

POLL_S = 1.0
DOWN_AFTER = 3  # failed liveness answers in a row before the server's copies count as lost
LOAD_ATTEMPTS = 3  # tries of a load the server could not be reached for
START_TIMEOUT_S = 60.0
UNLOAD_S = 30.0
STOP_UNLOAD_S = 2.0
MAX_TREE_ENTRIES = 10_000  # files a model folder handed to a server may hold
METADATA = "/inference.GRPCInferenceService/ModelMetadata"
READY_TIMEOUT_S = 5.0  # a ModelReady asked to tell a lost copy from a request's error
_copies = itertools.count(1)
# Servers' words for "I do not have that model" on an inference (Triton answers UNAVAILABLE;
# MLServer NOT_FOUND, but UNKNOWN for some calls).
_LOST_WORDS = ("unknown model", "not found", "not loaded", "is not ready", "no model")


def field_one(name: str) -> bytes:
    """``name`` as protobuf field 1 (a length-delimited string): appended to a serialized
    ModelInferRequest it replaces ``model_name``, without decoding the rest of the request."""
    data = name.encode()
    size, varint = len(data), bytearray()
    while True:
        byte = size & 0x7F
        size >>= 7
        varint.append(byte | (0x80 if size else 0))
        if not size:
            return b"\x0a" + bytes(varint) + data


def well_formed(body: bytes) -> None:
    """InvalidArgument unless ``body`` parses as a whole protobuf message, so that bytes appended
    to it (``field_one``) are a field of their own. A request ending in a length that runs past its
    end, a group never closed or a tag cut short would otherwise swallow the appended name, and
    the server would read the client's own ``model_name``: another tenant's model on the same
    server. Parsed as Empty (every field unknown, kept as bytes): about 3 ms for 16 MiB, in C."""
    try:
        empty_pb2.Empty.FromString(body)
    except DecodeError:
        raise InvalidArgument("malformed request: it does not parse as a ModelInferRequest (a field runs "
                              "past the end of the message or is left open)") from None


class ExternalModel(ForwardingModel):
    """A copy held by an external server; requests are forwarded to its V2 endpoint."""

    def __init__(self, server: ExternalServer, spec: ModelSpec, name: str, copy: int, size: int,
                 inputs: list[TensorSpec], outputs: list[TensorSpec], platform: str) -> None:
        super().__init__(model_id=spec.model_id, type=spec.type, device="ram", inputs=inputs, outputs=outputs)
        self.platform = platform  # type: ignore[misc]
        self.server = server
        self.name = name
        self.copy = copy
        self.generation = server.generation
        self._size = size
        self._suffix, self._metadata = server.addressing(spec.model_id, name)

    @property
    def lost(self) -> bool:
        return self.server.generation != self.generation

    def footprint_bytes(self) -> int:
        return self._size

    async def forward(self, body: bytes) -> bytes:
        if self._closed:
            raise NotHere(f"model {self.model_id!r} was unloaded from this instance")
        if self.server.generation != self.generation:
            raise CopyLost(f"model {self.model_id!r} was lost when its {self.server.kind} server went down")
        if self._suffix:
            well_formed(body)
        try:
            return await self.server.channel.forward(body + self._suffix, self.server.predict_timeout_s,
                                                     self._metadata)
        except ServerCallError as exc:
            failed = exc
        error = self.server.inference_error(self.model_id, failed)
        if isinstance(error, CopyLost) and await self.server.channel.ready(
                self.name, min(READY_TIMEOUT_S, self.server.predict_timeout_s), self._metadata):
            # The server still holds the model: its "unknown model" is about the request (a
            # model_version it lacks), not a lost copy to reload for whoever sends one.
            error = InvalidArgument(f"the {self.server.kind} model server: {failed.details}")
        raise error

    def _release(self) -> None:
        self.server.release(self)


class ExternalServer(abc.ABC):
    """One external model server the runtime loads models into and forwards requests to."""

    kind: str = ""
    default_types: tuple[str, ...] = ()

    def __init__(self, address: str, *, types: Sequence[str], policy: LoadPolicy, load_timeout_s: float,
                 predict_timeout_s: float, max_message_bytes: int,
                 predict_size: Callable[[ModelSpec], int] = lambda spec: 0,
                 on_lost: Callable[[list[str]], Awaitable[None]] | None = None) -> None:
        if not address:
            raise InvalidArgument(f"runtime.server_address is required with runtime.server = {self.kind}")
        self.address = address
        self.types = tuple(t.lower() for t in (types or self.default_types))
        self.policy = policy
        self.load_timeout_s = load_timeout_s
        self.predict_timeout_s = predict_timeout_s
        self.max_message_bytes = max_message_bytes
        self.predict_size = predict_size
        self.on_lost = on_lost
        self.on_state: Callable[[], Awaitable[None]] | None = None  # told when ``down`` flips
        # At shutdown (``stopping``) unloads wait STOP_UNLOAD_S, and none after one has timed out
        # (``stalled``): a hung server must not hold the runtime's exit for 30 s per model.
        self.stopping = False
        self.stalled = False
        self.generation = 0  # moves when the server went down: copies of an older one are lost
        self.down = False
        self.loads = 0
        self.channel = ServerChannel(address, max_message_bytes)
        self._held: dict[str, tuple[int, str]] = {}  # server-side name -> (the copy holding it, model ID)
        # Loads and unloads of one name run one at a time: a lock per name in use (with the count
        # of its users), dropped when the last one leaves, so that millions of model names over a
        # runtime's life cost no memory and different models never wait for each other.
        self._names: dict[str, tuple[threading.Lock, list[int]]] = {}
        self._lock = threading.Lock()
        self._running = 0  # loads in progress, and loads begun so far: a growth is measured only
        self._begun = 0  # for a load that ran alone
        self._pid: tuple[int, float] | None = None
        self._types_loaded: set[str] = set()

    # --- the flavour's part ------------------------------------------------------------------
    @abc.abstractmethod
    def server_name(self, model_id: str) -> str:
        """The name the server knows the model by."""

    @abc.abstractmethod
    def _load(self, spec: ModelSpec, path: Path, name: str, timeout: float) -> int:
        """Have the server load the model (blocking); the size it reports, 0 if it reports none.
        ServerCallError for the server's refusal; MeshError for what the runtime refuses."""

    @abc.abstractmethod
    def _unload(self, name: str, timeout: float) -> None:
        """Have the server unload the model (blocking); ServerCallError on failure."""

    def addressing(self, model_id: str, name: str) -> tuple[bytes, tuple[tuple[str, str], ...]]:
        """What to append to a request's bytes and which headers to send, so that the server
        serves ``name``: by default field 1 (``model_name``) rewritten."""
        return field_one(name), ()

    def prepare(self) -> None:  # noqa: B027 (a hook: most flavours have nothing to set up)
        """Runs once the server answers, before the first load (blocking)."""

    # --- start and liveness ------------------------------------------------------------------
    def start(self) -> None:
        """Wait until the server answers ServerLive (bounded), then let the flavour prepare."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.channel.live(timeout=2.0):
            if time.monotonic() > deadline:
                raise Unavailable(f"the {self.kind} model server at {self.address} did not answer within "
                                  f"{START_TIMEOUT_S:g} s (runtime.server_address)")
            time.sleep(0.5)
        self.prepare()
        log.info("model server answers", kind=self.kind, address=self.address, types=list(self.types))

    async def supervise(self) -> None:
        """Follow the server's liveness until cancelled (module docstring); never raises."""
        failures = 0
        while True:
            await asyncio.sleep(POLL_S)
            if await asyncio.to_thread(self.channel.live):
                failures = 0
                if self.down:
                    log.info("model server answers again", kind=self.kind, address=self.address)
                    self.down = False
                    await self._tell()
                continue
            failures += 1
            if failures == DOWN_AFTER:
                await self._lost_all()

    async def _lost_all(self) -> None:
        with self._lock:
            self.down = True
            self.generation += 1
            lost = sorted(model_id for _, model_id in self._held.values())
            self._held.clear()
        log.warning("model server does not answer; its copies are lost", kind=self.kind, address=self.address,
                    models_lost=len(lost))
        await self._tell()
        if lost and self.on_lost is not None:
            try:
                await self.on_lost(lost)
            except Exception:
                log.exception("reporting the server's lost models failed", kind=self.kind)

    async def _tell(self) -> None:
        if self.on_state is not None:
            try:
                await self.on_state()
            except Exception:
                log.exception("reporting the model server's state failed", kind=self.kind)

    # --- loads -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _name_lock(self, name: str, deadline: float | None = None) -> Iterator[None]:
        """Hold ``name``'s lock; with a ``deadline``, DeadlineExceeded if it is not free by then."""
        with self._lock:
            lock, users = self._names.setdefault(name, (threading.Lock(), [0]))
            users[0] += 1
        try:
            wait = -1 if deadline is None else max(0.0, deadline - time.monotonic())
            if not lock.acquire(timeout=wait):
                raise DeadlineExceeded(f"the {self.kind} model server was still loading or unloading another "
                                       f"copy of {name[:200]!r} after {self.load_timeout_s:g} s "
                                       "(runtime.load_timeout_s)")
            try:
                yield
            finally:
                lock.release()
        finally:
            with self._lock:
                users[0] -= 1
                if not users[0]:
                    del self._names[name]

    def load(self, spec: ModelSpec, device: str) -> ExternalModel:
        """The cache's ``load_fn`` (blocking, in a load thread)."""
        if spec.type.lower() not in self.types:
            raise ModelLoadError(f"the {self.kind} model server here does not serve type {spec.type!r} "
                                 f"(runtime.server_types: {', '.join(self.types)})")
        if device != "ram":
            raise ModelLoadError(f"the {self.kind} model server adapter places models in RAM only, not {device}")
        if self.down:  # not the model's failure: the router loads it elsewhere meanwhile
            raise Unavailable(f"the {self.kind} model server at {self.address} does not answer; this "
                              "instance takes no loads until it does")
        path = resolve_path(spec.path, self.policy.roots)  # the runtime's confinement, as for its own loads
        confine_tree(path, self.policy.roots)  # the server follows links inside a folder too
        name = self.server_name(spec.model_id)
        copy = next(_copies)
        deadline = time.monotonic() + self.load_timeout_s
        with self._name_lock(name, deadline):
            generation = self.generation
            with self._lock:
                alone, self._running, self._begun = self._running == 0, self._running + 1, self._begun + 1
                begun = self._begun
            try:
                before = self._server_rss()
                reported = self._load_retrying(spec, path, name, deadline)
                after = self._server_rss()
            finally:
                with self._lock:
                    self._running -= 1
                    alone = alone and self._begun == begun
            with self._lock:
                self._held[name] = (copy, spec.model_id)
            self.loads += 1
        first = spec.type.lower() not in self._types_loaded  # its growth holds the type's libraries too
        self._types_loaded.add(spec.type.lower())
        rss = before is not None and after is not None and not first and alone
        size = reported or (max(after - before, _disk_size(path)) if rss and before is not None and after is not None
                            else max(self.predict_size(spec), _disk_size(path)))
        inputs, outputs, platform = self._metadata(name)
        model = ExternalModel(self, spec, name, copy, max(size, 1), inputs, outputs, platform)
        model.generation = generation
        how = "server" if reported else ("rss" if rss else "predicted")
        log.info("model loaded by its server", model_id=spec.model_id, kind=self.kind,
                 size_bytes=model.footprint_bytes(), measured=how)
        return model

    def _load_retrying(self, spec: ModelSpec, path: Path, name: str, deadline: float) -> int:
        delay = 0.5
        for attempt in range(1, LOAD_ATTEMPTS + 1):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                return self._load(spec, path, name, left)
            except ServerCallError as exc:
                if exc.status == "DEADLINE_EXCEEDED":
                    self._unload_quietly(name)  # a late success must not hold memory nobody counts
                    raise DeadlineExceeded(f"the {self.kind} model server did not load {spec.model_id!r} within "
                                           f"{self.load_timeout_s:g} s (runtime.load_timeout_s)") from None
                if exc.status != "UNAVAILABLE" or attempt == LOAD_ATTEMPTS:
                    raise ModelLoadError(f"the {self.kind} model server refused to load {spec.model_id!r}: "
                                         f"{exc.message}") from None
                log.info("model server unreachable; trying the load again", model_id=spec.model_id,
                         kind=self.kind, attempt=attempt, error=exc.details[:200])
                time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                delay *= 2
        self._unload_quietly(name)
        raise DeadlineExceeded(f"the {self.kind} model server did not load {spec.model_id!r} within "
                               f"{self.load_timeout_s:g} s (runtime.load_timeout_s)")

    def _metadata(self, name: str) -> tuple[list[TensorSpec], list[TensorSpec], str]:
        """The model's inputs and outputs as the server describes them (empty when it cannot)."""
        try:
            answer = self.channel.call(METADATA, pb.ModelMetadataRequest(name=name), pb.ModelMetadataResponse, 10.0)
        except ServerCallError:
            return [], [], self.kind
        def tensors(rows: Sequence[pb.ModelMetadataResponse.TensorMetadata]) -> list[TensorSpec]:
            return [TensorSpec(t.name[:256], t.datatype[:16], tuple(int(x) for x in t.shape[:32])) for t in rows[:256]]
        return tensors(answer.inputs), tensors(answer.outputs), answer.platform[:128] or self.kind

    # --- unloads -----------------------------------------------------------------------------
    def release(self, model: ExternalModel) -> None:
        """An evicted or unloaded copy: unload it on the server unless a newer copy holds the name."""
        with self._name_lock(model.name):
            with self._lock:
                holder = self._held.get(model.name)
                if holder is not None and holder[0] != model.copy:
                    return  # a newer copy holds the name
                if holder is None and model.generation == self.generation:
                    return  # released already
                # (Not held and of an older generation: lost with its server, which
                # forgot it; what the flavour wrote for it goes all the same.)
                self._held.pop(model.name, None)
            if model.generation == self.generation:
                self._unload_quietly(model.name)
            self.forget(model.name)

    def forget(self, name: str) -> None:  # noqa: B027 (a hook)
        """After an unload: the flavour removes what it wrote for ``name``."""

    def _unload_quietly(self, name: str) -> None:
        if self.stopping and self.stalled:
            return  # the runtime is stopping and the server hangs: do not wait once per model
        try:
            self._unload(name, timeout=STOP_UNLOAD_S if self.stopping else UNLOAD_S)
        except MeshError as exc:
            self.stalled = self.stalled or (isinstance(exc, ServerCallError) and exc.status == "DEADLINE_EXCEEDED")
            log.warning("model server did not unload a model", kind=self.kind, model=name[:200],
                        error=exc.message[:300])

    # --- inference ---------------------------------------------------------------------------
    def inference_error(self, model_id: str, exc: ServerCallError) -> MeshError:
        code, why = exc.status, exc.details
        if code == "NOT_FOUND" or (code in ("UNAVAILABLE", "UNKNOWN") and any(w in why.lower() for w in _LOST_WORDS)):
            return CopyLost(f"the {self.kind} model server no longer holds {model_id!r}: {why}")
        if code == "INVALID_ARGUMENT":
            return InvalidArgument(why)
        if code == "DEADLINE_EXCEEDED":
            return DeadlineExceeded(f"model {model_id!r} took longer than {self.predict_timeout_s:g} s on the "
                                    f"{self.kind} model server (runtime.predict_timeout_s)")
        if code == "RESOURCE_EXHAUSTED":
            return ResourceExhausted(f"the {self.kind} model server: {why}")
        if code == "UNAVAILABLE":
            return NotHere(f"the {self.kind} model server at {self.address} is unavailable: {why}")
        return MeshError(f"the {self.kind} model server answered {code}: {why}")

    # --- memory ------------------------------------------------------------------------------
    def _server_rss(self) -> int | None:
        """Resident bytes of the server's processes, where this runtime can see them."""
        process = self._server_process()
        if process is None:
            return None
        try:
            return int(process.memory_info().rss) + sum(
                int(child.memory_info().rss) for child in process.children(recursive=True))
        except psutil.Error:
            self._pid = None
            return None

    def _server_process(self) -> psutil.Process | None:
        if self._pid is not None:
            with contextlib.suppress(psutil.Error):
                process = psutil.Process(self._pid[0])
                if process.create_time() == self._pid[1]:
                    return process
            self._pid = None
        port = self.address.rsplit(":", 1)[-1]
        host = self.address.rsplit(":", 1)[0].strip("[]")
        if not port.isdigit() or host not in ("127.0.0.1", "localhost", "::1", "0.0.0.0"):
            return None  # another host, or a name: not a process of this machine's
        try:
            for conn in psutil.net_connections("tcp"):
                if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == int(port) and conn.pid:
                    process = psutil.Process(conn.pid)
                    self._pid = (conn.pid, process.create_time())
                    return process
        except (psutil.Error, OSError):
            return None
        return None

    async def aclose(self) -> None:
        """Close the channels (the server and its models stay: the server is not ours to stop)."""
        await self.channel.aclose()


def confine_tree(path: Path, roots: Sequence[str]) -> None:
    """Every entry of a model folder must stay inside the model roots on its real path (a link in
    it could otherwise hand the server any file), and the folder is bounded; ModelLoadError."""
    if not roots or not path.is_dir():
        return
    real_roots = [os.path.join(os.path.realpath(r), "") for r in roots]
    for count, entry in enumerate(path.rglob("*")):
        if count >= MAX_TREE_ENTRIES:
            raise ModelLoadError(f"model folder {path.name!r} holds more than {MAX_TREE_ENTRIES} entries")
        real = os.path.realpath(entry)
        if not any(os.path.join(real, "").startswith(root) for root in real_roots):
            raise ModelLoadError(f"model folder {path.name!r}: {entry.relative_to(path)} leads outside the "
                                 "model roots through a symbolic link")


def _disk_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


__all__ = ["ExternalModel", "ExternalServer", "field_one"]
