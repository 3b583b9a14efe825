"""Model workers: the runtime's side of running model code in processes of their own (issue 13).

With ``runtime.workers`` > 0 the runtime keeps what is the mesh's (the registry lease and
session, the cache's memory accounting and eviction, the routers' streams) and hands loading and
predicting to that many worker processes (``mesh.runtime.worker``). What changes for the cache
is only the ``load_fn``: it returns a :class:`RemoteModel`, whose inference forwards the request's
bytes to its worker; sizes, eviction, single flight, timeouts and the load journal work as before.

- **Isolation.** A worker is started with a minimal environment (``PATH``, a locale, a home of its
  own, the thread settings of the BLAS libraries): no registry address or password, no tokens, no
  ``MESH_*`` settings. It listens on a Unix socket in a directory of mode 0700.
- **The runtime's memory.** With workers, the runtime makes itself non-dumpable
  (``set_dumpable``): a worker's code, running as the same user, cannot read the runtime's
  ``/proc/<pid>/environ`` or memory. Workers still read what that user may read on disk.
- **Predictions** are forwarded from the event loop, with no thread of the runtime's: per worker,
  a pool of asyncio Unix-socket connections (at most ``CHANNELS_PER_WORKER``, opened on demand,
  reused most recent first), each carrying one request at a time and served by a thread of its
  own in the worker, which reads, predicts and answers with no hand-off; a slow model holds only
  the connections of its own requests. A request is one write (header, model ID and body
  together); the answer is parsed as it arrives (``_Channel``). A connection belongs to its
  worker's generation (those of a restarted worker are dropped); one whose request ended other
  than with a whole answer (a deadline, a cancelled caller, an answer over the limit, bytes
  nobody asked for) is dropped, never reused, so no answer can reach the wrong request. The
  trade-off against one multiplexed connection: that would need a dispatching thread in the
  worker, a hand-off per request, where a connection per request in flight costs a thread (and
  a file descriptor) per connection. Loads and unloads stay blocking calls, on a connection per
  calling thread (the cache's load threads). Before this, a prediction went through
  ``asyncio.to_thread`` and a blocking round trip: 0.81x of in-process throughput through a
  router at c=32, against 0.96x now (BENCHMARKS section 9).
- **Spreading.** A load goes to the worker holding the fewest bytes (ties: the fewest models), so
  the models, and with them the inference work, spread over the workers: with several, predictions
  of different models run on different cores instead of sharing one interpreter's GIL.
- **Measuring.** The worker reports the model's own footprint and its RSS growth across the load
  when no other load ran in that worker meanwhile; the copy is charged the larger.
- **Crashes.** A worker that dies (a segfault in a model's native code, the OOM killer, SIGKILL)
  is noticed by the supervisor within ``POLL_S`` and restarted; only its models are lost: their
  copies are unloaded from the cache (placements withdrawn), requests in flight on them answer
  "not here" and the router retries them elsewhere (or reloads them). The runtime, its lease and
  the other workers' models stay up.
- **Memory.** Each worker caps its data segment (RLIMIT_DATA) at what its libraries took plus
  ``runtime.worker_memory_bytes`` (default: the runtime's RAM capacity for models), so a model
  that balloons while loading fails its own load instead of getting the pod OOM-killed.
- **A load that hangs** past ``runtime.load_timeout_s``, or a prediction past
  ``runtime.predict_timeout_s``, ends its worker (the only way to stop model code for sure); the
  worker's other models are lost with it, as for a crash. A worker's answer is read only within
  the message limit (``router.max_message_bytes``; 1 MiB for the others), so a worker cannot make
  the runtime allocate what it announces.
- **Copies.** Each load carries a token; an evicted copy's unload removes only that copy, never a
  newer one of the same model loaded meanwhile in the same worker.
- **Not yet** (docs/security.md): workers run as the runtime's user, so they are a guard against
  crashes and accidents rather than against hostile model code.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import itertools
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import cast

import structlog

from mesh.errors import DeadlineExceeded, MeshError, ModelLoadError, NotHere, ResourceExhausted, Unavailable
from mesh.registry.records import ModelSpec
from mesh.runtime.forwarding import CopyLost, ForwardingModel
from mesh.runtime.loaders.base import LoadPolicy
from mesh.runtime.tensors import TensorSpec
from mesh.runtime.worker import (
    HEADER,
    OP_INFER,
    OP_LOAD,
    OP_UNLOAD,
    U16,
    U64,
    FrameTooLarge,
    error_of,
    read_frame,
    write_frame,
)

log = structlog.get_logger(__name__)

POLL_S = 0.2
MAX_WORKERS = 64
SMALL_ANSWER = 1 << 20  # a LOAD's metadata, UNLOAD
# Connections the event loop keeps to one worker, each carrying one prediction at a time (a thread
# each in the worker). Past this, predictions wait for one to come free: the worker's threads share
# one GIL, so more in flight buys little for quick models (4 gave no more than 8 on the hop
# scenario, BENCHMARKS section 9), while a few slow predictions still leave connections free.
CHANNELS_PER_WORKER = 8
MAX_BACKOFF_S = 30.0  # a worker that dies right after each start is restarted at most this rarely
_copies = itertools.count(1)  # a token per copy: an old copy's unload never removes a newer one
START_TIMEOUT_S = 60.0
# What a worker inherits from the runtime's environment: nothing secret, only what libraries need.
PASSED_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "PYTHONPATH", "VIRTUAL_ENV", "OMP_NUM_THREADS",
              "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_",
              "CUDA_VISIBLE_DEVICES", "LD_LIBRARY_PATH")


PR_GET_DUMPABLE, PR_SET_DUMPABLE = 3, 4


def set_dumpable(dumpable: bool) -> bool:
    """``set_dumpable(False)``: this process's ``/proc/<pid>/environ``, ``mem`` and file
    descriptors become root's, so model code in a worker running as the same user cannot read the
    runtime's environment (the registry password) or memory through /proc, nor ptrace it. Linux
    only; False where prctl is unavailable. Children start dumpable again at exec; the runtime
    sets it back when it stops (its process may go on: tests run runtimes in process)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_DUMPABLE, int(dumpable), 0, 0, 0) == 0 and \
            libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) == int(dumpable)
    except (OSError, AttributeError):
        return False


class WorkerGone(CopyLost):
    """The worker holding the model died under the request: the router retries elsewhere."""


class OutOfStep(MeshError):
    """A worker wrote what nobody asked for, or more than its answer: its connection is dropped."""


class _Channel(asyncio.Protocol):
    """One connection from the event loop to a worker, carrying one request at a time.

    The answer is parsed as it arrives: the header first, checked against the request's limit
    before anything more is kept (so a worker cannot make the runtime allocate what it announces),
    then the chunks the transport hands over, joined once. Whatever ends the request other than a
    whole answer (a timeout, a cancelled caller, an answer over the limit) leaves the connection
    out of step, and the caller aborts it rather than put it back."""

    def __init__(self, generation: int) -> None:
        self.generation = generation
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self._limit = 0
        self._chunks: list[bytes] = []
        self._have = 0
        self._need = -1  # the whole frame's length once its header is in
        self._tag = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport's subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(EOFError("the worker closed the connection"))

    def eof_received(self) -> None:
        self.closed = True  # at once: the transport closes on the next loop pass, not before a reuse
        self._fail(EOFError("the worker closed the connection"))

    def request(self, frame: bytes, limit: int) -> asyncio.Future[tuple[int, bytes]]:
        """Send ``frame``; the future is the answer's ``(tag, payload)``: FrameTooLarge past
        ``limit``, EOFError when the connection ends first, OutOfStep for bytes beyond the answer."""
        assert self.transport is not None and self._waiter is None
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        self._limit, self._chunks, self._have, self._need = limit, [], 0, -1
        if self.closed or self.transport.is_closing():
            self._fail(EOFError("the worker closed the connection"))
            return waiter
        try:
            self.transport.write(frame)  # sent at once when the socket takes it (no buffered write)
        except (RuntimeError, OSError):  # uvloop's answer for a transport closed meanwhile
            self.closed = True
            self._fail(EOFError("the worker closed the connection"))
        return waiter

    def abort(self) -> None:
        self.closed = True
        self._waiter = None
        self._chunks = []
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._waiter is None:
            self._fail(OutOfStep("a model worker wrote to a connection with no request on it"))
            return
        self._chunks.append(data)
        self._have += len(data)
        if self._need < 0:
            if self._have < HEADER.size:
                return
            if len(self._chunks) > 1:
                self._chunks = [b"".join(self._chunks)]
            length, tag = HEADER.unpack_from(self._chunks[0])
            if length > self._limit:
                self._fail(FrameTooLarge(f"a frame of {length} bytes, over the limit of {self._limit}"))
                return
            self._tag, self._need = tag, HEADER.size + length
        if self._have < self._need:
            return
        if self._have > self._need:
            self._fail(OutOfStep("a model worker wrote more than its answer"))
            return
        chunks = self._chunks
        answer = chunks[0][HEADER.size:] if len(chunks) == 1 else \
            b"".join([chunks[0][HEADER.size:], *chunks[1:]])  # the body copied once, not per chunk
        waiter, self._waiter, self._chunks = self._waiter, None, []
        if not waiter.done():
            waiter.set_result((self._tag, answer))

    def _fail(self, exc: Exception) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        if not isinstance(exc, EOFError):
            self.abort()


class _Channels:
    """A worker's connections from one event loop, for predictions: idle ones of the worker's
    current generation are reused, at most ``CHANNELS_PER_WORKER`` exist, and the next caller
    waits for one to come free."""

    def __init__(self, worker: WorkerProcess, loop: asyncio.AbstractEventLoop) -> None:
        self.worker = worker
        self.loop = loop
        self.idle: list[_Channel] = []
        self.slots = asyncio.Semaphore(CHANNELS_PER_WORKER)

    def clear(self) -> None:
        idle, self.idle = self.idle, []
        for channel in idle:
            channel.abort()

    async def infer(self, generation: int, prefix: bytes, body: bytes, *, timeout: float, limit: int) -> bytes:
        """One prediction, on a connection to the worker's ``generation``; no thread. The same
        answers as ``WorkerProcess.call``: the worker's error as its MeshError, TimeoutError past
        ``timeout``, ResourceExhausted over ``limit``, WorkerGone when the worker died (or
        restarted) under the call. A caller cancelled in flight costs its connection (the answer
        would arrive on it later), never the next request's answer."""
        worker = self.worker
        await self.slots.acquire()
        try:
            channel = None
            while self.idle:
                held = self.idle.pop()
                if not held.closed and held.generation == generation and held.transport is not None \
                        and not held.transport.is_closing():
                    channel = held
                    break
                held.abort()
            if channel is None:
                channel = await self._connect(generation)
            # One write of header, model and body (the body copied once): a second system call
            # costs more than the copy at inference sizes.
            waiter = channel.request(b"".join((HEADER.pack(len(prefix) + len(body), OP_INFER), prefix, body)), limit)
            # The deadline is the worker's answer's: the wait for a free connection is not counted
            # (the requests holding them end by their own deadlines).
            timer = self.loop.call_later(timeout, _expire, waiter)
            whole = False
            try:
                tag, answer = await waiter
                whole = True
            except FrameTooLarge as exc:
                raise ResourceExhausted(f"model worker {worker.index} answered {exc}") from None
            except EOFError:
                raise WorkerGone(f"model worker {worker.index} died during the call") from None
            finally:
                timer.cancel()
                if whole and not channel.closed and channel.generation == worker.generation:
                    self.idle.append(channel)
                else:  # out of step (a timeout, a cancelled caller, an answer refused) or stale
                    channel.abort()
        finally:
            self.slots.release()
        if tag:
            raise error_of(tag, answer.decode("utf-8", "replace"))
        return answer

    async def _connect(self, generation: int) -> _Channel:
        worker = self.worker
        if generation != worker.generation or not worker.ready.is_set():
            raise WorkerGone(f"model worker {worker.index} is not running")
        try:
            _, channel = await self.loop.create_unix_connection(lambda: _Channel(generation), str(worker.socket_path))
        except OSError as exc:
            raise WorkerGone(f"model worker {worker.index} is not running ({exc.strerror})") from None
        return channel


class WorkerProcess:
    """One worker: its process, a connection per calling thread (loads, unloads), and the event
    loop's connections for predictions (``channels``)."""

    def __init__(self, index: int, directory: Path, policy: LoadPolicy, warm: tuple[str, ...] = (),
                 max_model_bytes: int = 0) -> None:
        self.index = index
        self.warm = warm
        self.max_model_bytes = max_model_bytes
        self.socket_path = directory / f"worker-{index}.sock"
        self.home = directory / f"home-{index}"
        self.policy = policy
        self.proc: subprocess.Popen[bytes] | None = None
        self.generation = 0
        self.models: dict[str, tuple[int, int]] = {}  # model -> (its copy's token, bytes charged)
        self._local = threading.local()
        self._channels: _Channels | None = None
        self.lock = threading.Lock()
        self.ready = threading.Event()  # listening; cleared while it (re)starts

    @property
    def bytes(self) -> int:
        return sum(size for _, size in self.models.values())

    def env(self) -> dict[str, str]:
        env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
        env["HOME"] = str(self.home)
        env.setdefault("LANG", "C.UTF-8")
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start(self) -> None:
        """Start (or restart) the process and wait until it listens; blocking. The home starts
        empty each time: nothing a model wrote there outlives its worker."""
        self.ready.clear()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        shutil.rmtree(self.home, ignore_errors=True)
        self.home.mkdir(mode=0o700)
        policy = json.dumps({"roots": list(self.policy.roots), "allow_code_formats": self.policy.allow_code_formats,
                             "trusted_types": list(self.policy.trusted_types)})
        # -P: no working directory on the import path; -s: no user site-packages under its home
        # (a model could plant a module there for the next worker to import).
        self.proc = subprocess.Popen(
            [sys.executable, "-P", "-s", "-m", "mesh.runtime.worker", "--listen", str(self.socket_path),
             "--policy", policy, "--warm", ",".join(self.warm), "--max-model-bytes", str(self.max_model_bytes)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=None, env=self.env(), cwd="/")
        assert self.proc.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        seen = b""
        while b"ready\n" not in seen and self.proc.poll() is None and time.monotonic() < deadline:
            readable, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if readable:
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                seen = (seen + chunk)[-4096:]
        self.proc.stdout.close()
        if b"ready\n" not in seen:
            code = self.proc.poll()
            self.kill()
            raise Unavailable(f"model worker {self.index} exited at start (code {code}; its log says why)"
                              if code is not None else
                              f"model worker {self.index} did not start within {START_TIMEOUT_S:g} s")
        with self.lock:
            self.generation += 1
        self.ready.set()
        log.info("model worker started", worker=self.index, pid=self.proc.pid)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def serving(self) -> bool:
        return self.ready.is_set() and self.alive()

    def kill(self) -> None:
        self.ready.clear()  # calls wait for the supervisor's restart
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        channels = self._channels
        if channels is not None and not channels.loop.is_closed():  # kill() runs on any thread
            with contextlib.suppress(RuntimeError):
                channels.loop.call_soon_threadsafe(channels.clear)

    def _connection(self) -> socket.socket:
        held = getattr(self._local, "conn", None)
        if held is not None and held[0] == self.generation:
            return held[1]
        if held is not None:
            held[1].close()
        if not self.ready.wait(START_TIMEOUT_S):  # a restart in progress: calls wait for it
            raise WorkerGone(f"model worker {self.index} is not running")
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(str(self.socket_path))
        except OSError as exc:
            conn.close()
            raise WorkerGone(f"model worker {self.index} is not running ({exc.strerror})") from None
        self._local.conn = (self.generation, conn)
        return conn

    def call(self, op: int, payload: bytes, timeout: float | None = None, limit: int = SMALL_ANSWER) -> bytes:
        """One operation on this thread's connection; blocking. The worker's error as its
        MeshError; TimeoutError past ``timeout`` (the answer whole, however it trickles in);
        ResourceExhausted for an answer over ``limit`` bytes (read no further: the connection is
        dropped); WorkerGone when the worker died (or was ended) under the call."""
        conn = self._connection()
        deadline = time.monotonic() + timeout if timeout is not None else None
        conn.settimeout(timeout)
        try:
            write_frame(conn, op, payload)
            tag, answer = read_frame(conn, limit, deadline)
        except TimeoutError:
            self._drop_connection()
            raise
        except FrameTooLarge as exc:
            self._drop_connection()
            raise ResourceExhausted(f"model worker {self.index} answered {exc}") from None
        except (EOFError, OSError):
            self._drop_connection()
            raise WorkerGone(f"model worker {self.index} died during the call") from None
        if tag:
            raise error_of(tag, answer.decode("utf-8", "replace"))
        return answer

    def channels(self) -> _Channels:
        """The running event loop's connections to this worker (created on first use)."""
        loop = asyncio.get_running_loop()
        channels = self._channels
        if channels is None or channels.loop is not loop:
            channels = self._channels = _Channels(self, loop)
        return channels

    def _drop_connection(self) -> None:
        held = getattr(self._local, "conn", None)
        if held is not None:
            held[1].close()
            self._local.conn = None


def _expire(waiter: asyncio.Future[tuple[int, bytes]]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError("no answer before the deadline"))


class RemoteModel(ForwardingModel):
    """A model loaded in a worker; the runtime forwards inference bytes to it (``forward``)."""

    def __init__(self, worker: WorkerProcess, generation: int, copy: int, spec: ModelSpec, device: str,
                 meta: Mapping[str, object], *, predict_timeout_s: float, max_answer_bytes: int) -> None:
        """``meta``: the worker's answer to the load; ValueError, KeyError or TypeError when it is
        not the shape a worker writes (a worker's code may write anything)."""
        def tensors(rows: object) -> list[TensorSpec]:
            return [TensorSpec(str(n), str(d), tuple(int(x) for x in s)) for n, d, s in rows]  # type: ignore[attr-defined]

        super().__init__(model_id=spec.model_id, type=spec.type, device=device, inputs=tensors(meta["inputs"]),
                         outputs=tensors(meta["outputs"]),
                         default_outputs=[str(o) for o in meta["default_outputs"]])  # type: ignore[attr-defined]
        self.platform = str(meta["platform"])  # type: ignore[misc]
        self.worker = worker
        self.generation = generation
        self.copy = copy
        self.predict_timeout_s = predict_timeout_s
        self.max_answer_bytes = max_answer_bytes
        self._footprint = max(int(meta["footprint"]), int(meta["rss_growth"]), 1)  # type: ignore[call-overload]
        self._prefix = U16.pack(len(spec.model_id.encode())) + spec.model_id.encode()

    @property
    def lost(self) -> bool:
        """Its worker died (or was ended) since the load: the copy is gone."""
        return self.worker.generation != self.generation or not self.worker.alive()

    def _check(self) -> None:
        if self._closed:
            raise NotHere(f"model {self.model_id!r} was unloaded from this instance")
        if self.lost:
            raise WorkerGone(f"model {self.model_id!r} was lost with its worker")

    def _deadline_passed(self) -> DeadlineExceeded:
        log.warning("a prediction passed its deadline; ending its model worker", model_id=self.model_id,
                    worker=self.worker.index, timeout_s=self.predict_timeout_s)
        return DeadlineExceeded(f"model {self.model_id!r} took longer than {self.predict_timeout_s:g} s to "
                                "predict (runtime.predict_timeout_s); its worker was ended")

    async def forward(self, body: bytes) -> bytes:
        """The answer from the worker, awaited on the event loop (``_Channels.infer``). A
        prediction past ``runtime.predict_timeout_s`` ends the worker (a predict that hangs, or
        holds the interpreter, cannot be stopped otherwise): DEADLINE_EXCEEDED here, and the
        worker's other models are lost as in a crash."""
        self._check()
        try:
            return await self.worker.channels().infer(self.generation, self._prefix, body,
                                                      timeout=self.predict_timeout_s, limit=self.max_answer_bytes)
        except TimeoutError:
            error = self._deadline_passed()
            await asyncio.to_thread(self.worker.kill)  # waits for the process's end: off the loop
            raise error from None

    def infer_bytes(self, body: bytes) -> bytes:
        """``forward``, blocking, on this thread's connection (tests and tools off the loop)."""
        self._check()
        try:
            return self.worker.call(OP_INFER, self._prefix + body, timeout=self.predict_timeout_s,
                                    limit=self.max_answer_bytes)
        except TimeoutError:
            error = self._deadline_passed()
            self.worker.kill()
            raise error from None

    def footprint_bytes(self) -> int:
        return self._footprint

    def _release(self) -> None:
        with self.worker.lock:
            held = self.worker.models.get(self.model_id)
            if held is not None and held[0] == self.copy:
                del self.worker.models[self.model_id]
        if self.worker.generation == self.generation:
            with contextlib.suppress(MeshError, OSError, TimeoutError):
                self.worker.call(OP_UNLOAD, U64.pack(self.copy) + self.model_id.encode(), timeout=30)


class WorkerPool:
    """``count`` workers under one supervisor. ``load`` is the runtime cache's ``load_fn``;
    ``on_lost(model_ids)`` is told of the models a dead worker took with it."""

    def __init__(self, count: int, policy: LoadPolicy, *, load_timeout_s: float, warm: tuple[str, ...] = (),
                 max_model_bytes: int = 0, predict_timeout_s: float = 60.0, max_answer_bytes: int = 16 << 20,
                 on_lost: Callable[[list[str]], Awaitable[None]] | None = None,
                 directory: Path | None = None) -> None:
        self._own_dir = directory is None
        self.directory = directory or Path(tempfile.mkdtemp(prefix="mesh-workers-"))
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)  # the sockets answer anyone who can reach them
        self.workers = [WorkerProcess(i, self.directory, policy, warm, max_model_bytes) for i in range(count)]
        self.load_timeout_s = load_timeout_s
        self.predict_timeout_s = predict_timeout_s
        self.max_answer_bytes = max_answer_bytes
        self.on_lost = on_lost
        self.restarts = 0
        self._lock = threading.Lock()
        self._closed = False

    def start(self) -> None:
        for worker in self.workers:
            worker.start()

    def _pick(self, model_id: str, copy: int) -> WorkerProcess:
        with self._lock:
            for worker in self.workers:  # a copy again (after an eviction): where it was
                if model_id in worker.models:
                    break
            else:
                serving = [w for w in self.workers if w.serving()] or self.workers  # none: wait for a restart
                worker = min(serving, key=lambda w: (w.bytes, len(w.models), w.index))
            with worker.lock:
                worker.models[model_id] = (copy, 0)  # counted at once: concurrent loads spread too
            return worker

    def _forget(self, worker: WorkerProcess, model_id: str, copy: int) -> None:
        with worker.lock:
            held = worker.models.get(model_id)
            if held is not None and held[0] == copy:
                del worker.models[model_id]

    def load(self, spec: ModelSpec, device: str) -> RemoteModel:
        """Load ``spec`` in a worker; blocking (the cache calls it in the load's thread). A load
        that passes the timeout ends its worker (model code cannot be stopped otherwise)."""
        copy = next(_copies)
        worker = self._pick(spec.model_id, copy)
        generation = worker.generation
        request = json.dumps({"spec": spec.to_json().decode(), "device": device, "copy": copy}).encode()
        try:
            answer = worker.call(OP_LOAD, request, timeout=self.load_timeout_s)
        except TimeoutError:
            self._forget(worker, spec.model_id, copy)
            log.warning("a load passed its deadline; ending its model worker", model_id=spec.model_id,
                        worker=worker.index, timeout_s=self.load_timeout_s)
            worker.kill()
            raise DeadlineExceeded(f"loading model {spec.model_id!r} took longer than {self.load_timeout_s:g} s "
                                   "(runtime.load_timeout_s); its worker was ended") from None
        except BaseException:
            self._forget(worker, spec.model_id, copy)
            raise
        try:
            model = RemoteModel(worker, generation, copy, spec, device, json.loads(answer),
                                predict_timeout_s=self.predict_timeout_s, max_answer_bytes=self.max_answer_bytes)
        except (ValueError, KeyError, TypeError, IndexError):
            self._forget(worker, spec.model_id, copy)
            with contextlib.suppress(MeshError, OSError, TimeoutError):
                worker.call(OP_UNLOAD, U64.pack(copy) + spec.model_id.encode(), timeout=30)
            raise ModelLoadError(f"model {spec.model_id!r}: its worker's answer to the load is malformed") from None
        with worker.lock:
            if worker.models.get(spec.model_id, (0, 0))[0] == copy:
                worker.models[spec.model_id] = (copy, model.footprint_bytes())
        return model

    async def supervise(self) -> None:
        """Restart dead workers and report the models they took; runs until cancelled. Nothing
        here ends the runtime: a failure is logged and tried again, with a backoff for a worker
        that dies right after each start."""
        backoff: dict[int, float] = {}
        next_start: dict[int, float] = {}
        while True:
            await asyncio.sleep(POLL_S)
            for worker in self.workers:
                if worker.alive() or self._closed or time.monotonic() < next_start.get(worker.index, 0.0):
                    continue
                try:
                    await self._restart(worker)
                    backoff.pop(worker.index, None)
                except Exception as exc:
                    delay = min(MAX_BACKOFF_S, 2 * backoff.get(worker.index, 0.5))
                    backoff[worker.index] = delay
                    next_start[worker.index] = time.monotonic() + delay
                    log.error("model worker did not restart; trying again", worker=worker.index,
                              retry_in_s=delay, error=getattr(exc, "message", None) or repr(exc))

    async def _restart(self, worker: WorkerProcess) -> None:
        worker.ready.clear()
        with self._lock, worker.lock:
            lost = sorted(worker.models)
            worker.models.clear()
            worker.generation += 1  # its models' copies answer "not here" from now on
        code = worker.proc.returncode if worker.proc is not None else None
        log.warning("model worker died; restarting it", worker=worker.index, exit_code=code, models_lost=len(lost))
        self.restarts += 1
        if lost and self.on_lost is not None:
            try:
                await self.on_lost(lost)  # before the restart: no request waits on a dead copy
            except Exception:
                log.exception("reporting a dead worker's models failed", worker=worker.index)
        await asyncio.to_thread(worker.start)

    def close(self) -> None:
        self._closed = True
        for worker in self.workers:
            worker.kill()
            worker.ready.set()  # threads waiting for a restart give up now (the socket is gone)
            with contextlib.suppress(FileNotFoundError):
                worker.socket_path.unlink()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self.workers if w.proc is not None and w.serving()]


__all__ = ["MAX_WORKERS", "RemoteModel", "WorkerGone", "WorkerPool", "WorkerProcess", "set_dumpable"]
