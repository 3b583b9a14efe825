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
- **A load that hangs** past ``runtime.load_timeout_s`` ends its worker (the only way to stop
  model code for sure); the worker's other models are lost with it, as for a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import numpy as np
import structlog

from mesh.errors import DeadlineExceeded, MeshError, NotHere, Unavailable
from mesh.registry.records import ModelSpec
from mesh.runtime.loaders.base import LoadedModel, LoadPolicy
from mesh.runtime.tensors import TensorSpec
from mesh.runtime.worker import OP_INFER, OP_LOAD, OP_PING, OP_UNLOAD, U16, error_of, read_frame, write_frame

log = structlog.get_logger(__name__)

POLL_S = 0.2
MAX_WORKERS = 64
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


class WorkerGone(NotHere):
    """The worker holding the model died under the request: the router retries elsewhere."""


class WorkerProcess:
    """One worker: its process, and a connection per calling thread."""

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
        self.models: dict[str, int] = {}  # model -> bytes charged
        self._local = threading.local()
        self._lock = threading.Lock()
        self.ready = threading.Event()  # listening; cleared while it (re)starts

    @property
    def bytes(self) -> int:
        return sum(self.models.values())

    def env(self) -> dict[str, str]:
        env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
        env["HOME"] = str(self.home)
        env.setdefault("LANG", "C.UTF-8")
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start(self) -> None:
        """Start (or restart) the process and wait until it listens; blocking."""
        self.ready.clear()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        self.home.mkdir(mode=0o700, exist_ok=True)
        policy = json.dumps({"roots": list(self.policy.roots), "allow_code_formats": self.policy.allow_code_formats,
                             "trusted_types": list(self.policy.trusted_types)})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mesh.runtime.worker", "--listen", str(self.socket_path), "--policy", policy,
             "--warm", ",".join(self.warm), "--max-model-bytes", str(self.max_model_bytes)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=None, env=self.env(), cwd=self.home,
            start_new_session=False)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        line = b""
        while time.monotonic() < deadline and self.proc.poll() is None:
            line = self.proc.stdout.readline()
            if line.strip() == b"ready":
                break
        if line.strip() != b"ready":
            self.kill()
            raise Unavailable(f"model worker {self.index} did not start")
        self.proc.stdout.close()
        with self._lock:
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

    def call(self, op: int, payload: bytes, timeout: float | None = None) -> bytes:
        """One operation on this thread's connection; blocking. The worker's error as its
        MeshError; WorkerGone when the worker died (or was ended) under the call."""
        conn = self._connection()
        conn.settimeout(timeout)
        try:
            write_frame(conn, op, payload)
            tag, answer = read_frame(conn)
        except TimeoutError:
            self._drop_connection()
            raise
        except (EOFError, OSError):
            self._drop_connection()
            raise WorkerGone(f"model worker {self.index} died during the call") from None
        if tag:
            raise error_of(tag, answer.decode("utf-8", "replace"))
        return answer

    def _drop_connection(self) -> None:
        held = getattr(self._local, "conn", None)
        if held is not None:
            held[1].close()
            self._local.conn = None


class RemoteModel(LoadedModel):
    """A model loaded in a worker; the runtime forwards inference bytes (``infer_bytes``)."""

    def __init__(self, worker: WorkerProcess, generation: int, spec: ModelSpec, device: str,
                 meta: Mapping[str, object]) -> None:
        def tensors(rows: object) -> list[TensorSpec]:
            return [TensorSpec(str(n), str(d), tuple(int(x) for x in s)) for n, d, s in rows]  # type: ignore[attr-defined]

        super().__init__(model_id=spec.model_id, type=spec.type, device=device, inputs=tensors(meta["inputs"]),
                         outputs=tensors(meta["outputs"]), default_outputs=list(meta["default_outputs"]))  # type: ignore[call-overload]
        self.platform = str(meta["platform"])  # type: ignore[misc]
        self.worker = worker
        self.generation = generation
        self._footprint = max(int(meta["footprint"]), int(meta["rss_growth"]))  # type: ignore[call-overload]
        self._prefix = U16.pack(len(spec.model_id.encode())) + spec.model_id.encode()

    @property
    def lost(self) -> bool:
        """Its worker died (or was ended) since the load: the copy is gone."""
        return self.worker.generation != self.generation or not self.worker.alive()

    def infer_bytes(self, body: bytes) -> bytes:
        if self._closed:
            raise NotHere(f"model {self.model_id!r} was unloaded from this instance")
        if self.lost:
            raise WorkerGone(f"model {self.model_id!r} was lost with its worker")
        return self.worker.call(OP_INFER, self._prefix + body)

    def _predict(self, inputs: Mapping[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        raise MeshError("a worker's model answers infer_bytes only")

    def footprint_bytes(self) -> int:
        return self._footprint

    def _release(self) -> None:
        self.worker.models.pop(self.model_id, None)
        if self.worker.generation == self.generation:
            with contextlib.suppress(MeshError, OSError, TimeoutError):
                self.worker.call(OP_UNLOAD, self.model_id.encode(), timeout=30)


class WorkerPool:
    """``count`` workers under one supervisor. ``load`` is the runtime cache's ``load_fn``;
    ``on_lost(model_ids)`` is told of the models a dead worker took with it."""

    def __init__(self, count: int, policy: LoadPolicy, *, load_timeout_s: float, warm: tuple[str, ...] = (),
                 max_model_bytes: int = 0,
                 on_lost: Callable[[list[str]], Awaitable[None]] | None = None,
                 directory: Path | None = None) -> None:
        self._own_dir = directory is None
        self.directory = directory or Path(tempfile.mkdtemp(prefix="mesh-workers-"))
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)  # the sockets answer anyone who can reach them
        self.workers = [WorkerProcess(i, self.directory, policy, warm, max_model_bytes) for i in range(count)]
        self.load_timeout_s = load_timeout_s
        self.on_lost = on_lost
        self.restarts = 0
        self._lock = threading.Lock()

    def start(self) -> None:
        for worker in self.workers:
            worker.start()

    def _pick(self, model_id: str) -> WorkerProcess:
        with self._lock:
            for worker in self.workers:  # a copy again (after an eviction): where it was
                if model_id in worker.models:
                    return worker
            serving = [w for w in self.workers if w.serving()] or self.workers  # none: wait for a restart
            worker = min(serving, key=lambda w: (w.bytes, len(w.models), w.index))
            worker.models[model_id] = 0  # counted at once: concurrent loads spread too
            return worker

    def load(self, spec: ModelSpec, device: str) -> RemoteModel:
        """Load ``spec`` in a worker; blocking (the cache calls it in the load's thread). A load
        that passes the timeout ends its worker (model code cannot be stopped otherwise)."""
        worker = self._pick(spec.model_id)
        generation = worker.generation
        request = json.dumps({"spec": spec.to_json().decode(), "device": device}).encode()
        try:
            meta = json.loads(worker.call(OP_LOAD, request, timeout=self.load_timeout_s))
        except TimeoutError:
            worker.models.pop(spec.model_id, None)
            log.warning("a load passed its deadline; ending its model worker", model_id=spec.model_id,
                        worker=worker.index, timeout_s=self.load_timeout_s)
            worker.kill()
            raise DeadlineExceeded(f"loading model {spec.model_id!r} took longer than {self.load_timeout_s:g} s "
                                   "(runtime.load_timeout_s); its worker was ended") from None
        except BaseException:
            worker.models.pop(spec.model_id, None)
            raise
        model = RemoteModel(worker, generation, spec, device, meta)
        worker.models[spec.model_id] = model.footprint_bytes()
        return model

    def ping(self) -> list[bool]:
        out = []
        for worker in self.workers:
            try:
                worker.call(OP_PING, b"", timeout=5)
                out.append(True)
            except (MeshError, TimeoutError):
                out.append(False)
        return out

    async def supervise(self) -> None:
        """Restart dead workers and report the models they took; runs until cancelled."""
        while True:
            await asyncio.sleep(POLL_S)
            for worker in self.workers:
                if worker.alive():
                    continue
                worker.ready.clear()
                code = worker.proc.returncode if worker.proc is not None else None
                with self._lock:
                    lost = sorted(worker.models)
                    worker.models.clear()
                log.warning("model worker died; restarting it", worker=worker.index, exit_code=code,
                            models_lost=len(lost))
                self.restarts += 1
                with self._lock:
                    worker.generation += 1  # its models' copies answer "not here" from now on
                if lost and self.on_lost is not None:
                    await self.on_lost(lost)  # before the restart: no request waits on a dead copy
                try:
                    await asyncio.to_thread(worker.start)
                except MeshError as exc:
                    log.error("model worker did not restart; trying again", worker=worker.index, error=exc.message)

    def close(self) -> None:
        for worker in self.workers:
            worker.kill()
            worker.ready.set()  # threads waiting for a restart give up now (the socket is gone)
            with contextlib.suppress(FileNotFoundError):
                worker.socket_path.unlink()
        if self._own_dir:
            import shutil

            shutil.rmtree(self.directory, ignore_errors=True)

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self.workers if w.proc is not None and w.serving()]


__all__ = ["MAX_WORKERS", "RemoteModel", "WorkerGone", "WorkerPool", "WorkerProcess", "set_dumpable"]
