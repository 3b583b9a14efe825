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
  together); the answer is parsed as it arrives (``mesh.runtime.worker_channels``). A
  connection belongs to its worker's generation (those of a restarted worker are dropped); one whose request ended other
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
import builtins
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

import structlog

from mesh.errors import DeadlineExceeded, MeshError, ModelLoadError, NotHere, ResourceExhausted, Unavailable
from mesh.registry.records import ModelSpec
from mesh.runtime.forwarding import ForwardingModel
from mesh.runtime.loaders.base import LoadPolicy
from mesh.runtime.worker import (
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
from mesh.runtime.worker_channels import Channels, OutOfStep, WorkerGone
from mesh.tensors import TensorSpec

log = structlog.get_logger(__name__)

POLL_S = 0.2
MAX_WORKERS = 64
SMALL_ANSWER = 1 << 20  # a LOAD's metadata, UNLOAD
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
        prctl: Callable[..., int] = libc.prctl  # ctypes' default result type: a C int
        return prctl(PR_SET_DUMPABLE, int(dumpable), 0, 0, 0) == 0 and \
            prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) == int(dumpable)
    except (OSError, AttributeError):
        return False


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
        self._channels: Channels | None = None
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
        held: tuple[int, socket.socket] | None = getattr(self._local, "conn", None)
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

    # builtins.bytes: in this class, bytes is the property above.
    def call(self, op: int, payload: builtins.bytes, timeout: float | None = None,
             limit: int = SMALL_ANSWER) -> builtins.bytes:
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

    def channels(self) -> Channels:
        """The running event loop's connections to this worker (created on first use)."""
        loop = asyncio.get_running_loop()
        channels = self._channels
        if channels is None or channels.loop is not loop:
            channels = self._channels = Channels(self, loop)
        return channels

    def _drop_connection(self) -> None:
        held = getattr(self._local, "conn", None)
        if held is not None:
            held[1].close()
            self._local.conn = None


class RemoteModel(ForwardingModel):
    """A model loaded in a worker; the runtime forwards inference bytes to it (``forward``)."""

    mergeable = True  # the runtime may batch its requests (mesh.runtime.batching)

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
        self._footprint: int = max(int(meta["footprint"]), int(meta["rss_growth"]), 1)  # type: ignore[call-overload]
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
        """The answer from the worker, awaited on the event loop (``Channels.infer``). A
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


__all__ = ["MAX_WORKERS", "OutOfStep", "RemoteModel", "WorkerGone", "WorkerPool", "WorkerProcess", "set_dumpable"]
