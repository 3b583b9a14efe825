"""A model worker: the process that runs model code, apart from the runtime (issue 13).

The runtime (``mesh.runtime.workers``) starts it with a minimal environment: no registry
address or credentials, no tokens, no ``MESH_*`` settings, a home directory of its own. It
listens on a Unix socket in a directory only the runtime's user can enter, and answers three
operations on any number of connections, a thread per connection (the runtime's load threads
each hold one; its event loop holds a bounded pool for predictions, each carrying one request at
a time), so a slow prediction holds only its own connection's thread:

- LOAD: a registration (JSON) and a device; the built-in loader runs here, confined by the load
  policy the runtime passed on the command line. The answer is the model's metadata, its own
  footprint, and the growth of this process's RSS across the load when no other load ran
  meanwhile (else 0): what the runtime's cache charges.
- INFER: a model ID and a serialized ``ModelInferRequest``; decoding, predicting and encoding
  happen here, and the answer is the serialized response. The runtime forwards the bytes it got.
- UNLOAD: a copy's token and its model ID (only that copy goes).

Frames (little-endian): a request is ``u32 length | u8 op | payload``, an answer ``u32 length |
u8 code | payload`` with code 0 (OK, the payload is the result) or an error's tag (``ERRORS``;
the payload is the message). A connection carries one request at a time, so the worker reads
one with a single ``recv`` at inference sizes (``read_request``) and parses the body in place.
A model that raises answers its precise status; a model that kills the process kills only this
worker: the runtime restarts it and re-homes nothing but its models.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import resource
import socket
import struct
import sys
import threading
import time
from typing import Any, cast

from mesh.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    MeshError,
    ModelLoadError,
    ModelNotFound,
    NotHere,
    ResourceExhausted,
    Unavailable,
)
from mesh.registry.records import ModelSpec
from mesh.runtime.loaders.base import LoadedModel, LoadPolicy
from mesh.tensors import infer_bytes

OP_LOAD, OP_INFER, OP_UNLOAD = 1, 2, 3
# An error crosses as its class (the runtime treats NotHere and ModelLoadError apart): the tag is
# 1 + its index here, the most specific first; anything else is a MeshError (INTERNAL).
ERRORS: tuple[type[MeshError], ...] = (NotHere, ModelLoadError, InvalidArgument, ModelNotFound, DeadlineExceeded,
                                       ResourceExhausted, FailedPrecondition, Unavailable, MeshError)


def error_tag(exc: MeshError) -> int:
    return 1 + next(i for i, cls in enumerate(ERRORS) if isinstance(exc, cls))


def error_of(tag: int, message: str) -> MeshError:
    cls = ERRORS[tag - 1] if 0 < tag <= len(ERRORS) else MeshError
    return cls(message)


HEADER = struct.Struct("<IB")
U16 = struct.Struct("<H")
U64 = struct.Struct("<Q")
MAX_FRAME = 1 << 31  # what the worker takes from the runtime (which bounds it far below)
RECV_BYTES = 1 << 16  # a worker's first read of a request: the whole frame at inference sizes


class FrameTooLarge(EOFError):
    """A frame announced more bytes than the reader takes: the connection is out of step."""


def read_exact(sock: socket.socket, n: int, deadline: float | None = None) -> bytes:
    """``n`` bytes, or EOFError when the peer closed (a dead worker, or the runtime leaving);
    TimeoutError past ``deadline`` (``time.monotonic``), however the bytes trickle in."""
    view = bytearray(n)
    got = 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer before the deadline")
            sock.settimeout(left)
        chunk = sock.recv_into(memoryview(view)[got:], n - got)
        if chunk == 0:
            raise EOFError("connection closed")
        got += chunk
    return bytes(view)


def read_frame(sock: socket.socket, limit: int = MAX_FRAME, deadline: float | None = None) -> tuple[int, bytes]:
    """One frame; FrameTooLarge, before reading or allocating it, when it announces more than
    ``limit`` bytes (the runtime reads a worker's answers with a limit: a worker's code may write
    anything to its connections)."""
    length, tag = HEADER.unpack(read_exact(sock, HEADER.size, deadline))
    if length > limit:
        raise FrameTooLarge(f"a frame of {length} bytes, over the limit of {limit}")
    return tag, read_exact(sock, length, deadline) if length else b""


def read_request(sock: socket.socket) -> tuple[int, memoryview]:
    """A worker's read of one request frame: header and payload in one system call when the
    frame fits ``RECV_BYTES`` (inference sizes), else the payload received into one buffer of its
    size (up to ``MAX_FRAME``). The runtime sends a request and waits for its answer, so a
    connection never holds more than one frame: bytes beyond it are refused (EOFError)."""
    data = sock.recv(RECV_BYTES)
    while 0 < len(data) < HEADER.size:
        more = sock.recv(RECV_BYTES)
        data = data + more if more else b""
    if not data:
        raise EOFError("connection closed")
    length, op = HEADER.unpack_from(data)
    if length > MAX_FRAME:
        raise FrameTooLarge(f"a frame of {length} bytes, over the limit of {MAX_FRAME}")
    got = len(data) - HEADER.size
    if got == length:
        return op, memoryview(data)[HEADER.size:]
    if got > length:
        raise FrameTooLarge("more than one frame at once: the connection is out of step")
    view = memoryview(bytearray(length))
    view[:got] = memoryview(data)[HEADER.size:]
    while got < length:
        chunk = sock.recv_into(view[got:], length - got)
        if chunk == 0:
            raise EOFError("connection closed")
        got += chunk
    return op, view


def write_frame(sock: socket.socket, tag: int, payload: bytes) -> None:
    header = HEADER.pack(len(payload), tag)
    if len(payload) < 65536:
        sock.sendall(header + payload)  # one write: a small copy beats a second system call
    else:
        sock.sendall(header)
        sock.sendall(payload)


def bound_memory(max_model_bytes: int) -> None:
    """Cap this process's data segment (RLIMIT_DATA: heap and private anonymous mappings, which
    is where models live) at what it holds now, the libraries imported, plus ``max_model_bytes``.
    A model that balloons while loading then fails its own load (MemoryError, or its library's
    allocation failure) instead of getting the pod OOM-killed."""
    data = 0
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmData:"):
                data = int(line.split()[1]) * 1024
    limit = data + max_model_bytes
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def _rss() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Worker:
    def __init__(self, policy: LoadPolicy) -> None:
        self.policy = policy
        self.models: dict[str, tuple[int, LoadedModel]] = {}  # model -> (its copy's token, the copy)
        self._lock = threading.Lock()
        self._loads = 0
        self._epoch = 0

    def handle(self, op: int, payload: memoryview) -> bytes:
        if op == OP_INFER:
            (n,) = U16.unpack_from(payload, 0)
            model_id = str(payload[2:2 + n], "utf-8")
            held = self.models.get(model_id)
            if held is None:
                raise NotHere(f"model {model_id!r} is not loaded in this worker")
            # The body as a view of the frame: protobuf parses any buffer, so it is not copied here.
            return infer_bytes(held[1], model_id, cast(bytes, payload[2 + n:]))
        if op == OP_LOAD:
            return self._load(json.loads(bytes(payload)))
        if op == OP_UNLOAD:
            (copy,) = U64.unpack_from(payload, 0)
            model_id = str(payload[U64.size:], "utf-8")
            with self._lock:  # only that copy: a newer load of the same model stays
                held = self.models.get(model_id)
                if held is not None and held[0] == copy:
                    del self.models[model_id]
            if held is not None and held[0] == copy:
                held[1].close()
            return b""
        raise ValueError(f"unknown operation {op}")

    def _load(self, request: dict[str, Any]) -> bytes:
        from mesh.runtime.service import load_model  # the loaders' imports: here, not at start-up

        spec = ModelSpec.from_json(request["spec"].encode())
        with self._lock:
            self._loads += 1
            self._epoch += 1
            epoch = self._epoch
        before = _rss()
        try:
            model = load_model(spec, request["device"], self.policy)
        except MemoryError:
            raise ResourceExhausted(f"model {spec.model_id!r} needs more memory than its worker may take "
                                    "(runtime.worker_memory_bytes)") from None
        finally:
            with self._lock:
                self._loads -= 1
                solo = self._loads == 0 and self._epoch == epoch
        growth = max(0, _rss() - before) if solo else 0
        try:
            answer = json.dumps({
                "platform": str(model.platform),
                "inputs": [[t.name, t.datatype, list(t.shape)] for t in model.inputs],
                "outputs": [[t.name, t.datatype, list(t.shape)] for t in model.outputs],
                "default_outputs": list(model.default_outputs),
                "footprint": int(model.footprint_bytes()), "rss_growth": growth,
            }).encode()
        except Exception:
            model.close()
            raise
        with self._lock:
            old = self.models.get(spec.model_id)
            self.models[spec.model_id] = (int(request["copy"]), model)
        if old is not None:
            old[1].close()  # its runtime copy was evicted; a request still on it answers "not here"
        return answer

    def answer(self, op: int, payload: memoryview) -> tuple[int, bytes]:
        """The answer frame's code and payload: 0 and the result, or the error's tag and message."""
        try:
            return 0, self.handle(op, payload)
        except MeshError as exc:
            return error_tag(exc), exc.message.encode("utf-8", "replace")
        except Exception as exc:  # a bug of the model's own code: said, not a traceback
            error = MeshError(f"model code failed: {type(exc).__name__}: {exc}"[:1000])
            return error_tag(error), error.message.encode("utf-8", "replace")

    def serve(self, conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    op, payload = read_request(conn)
                except (EOFError, OSError):
                    return
                tag, answer = self.answer(op, payload)
                del payload  # the request's buffer goes now, not when the next request comes
                try:
                    write_frame(conn, tag, answer)
                except OSError:
                    return


def _die_with_parent(parent: int) -> None:
    """A runtime that dies (SIGKILL) leaves no worker behind holding its models' memory."""
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mesh.runtime.worker")
    parser.add_argument("--listen", required=True, help="the Unix socket to listen on")
    parser.add_argument("--policy", default="{}", help="the load policy as JSON (roots, allow_code_formats, "
                                                       "trusted_types)")
    parser.add_argument("--warm", default="", help="model types whose libraries to import before listening")
    parser.add_argument("--max-model-bytes", type=int, default=0,
                        help="memory the models may add beyond the libraries imported at start (0: no bound)")
    args = parser.parse_args(argv)
    faulthandler.enable(all_threads=True)  # to stderr: the runtime's log
    from mesh.runtime.service import _import_type

    for model_type in filter(None, args.warm.split(",")):
        try:  # a first load then neither waits for the import nor is charged the library's memory
            _import_type(model_type)
        except Exception as exc:  # the runtime left the type out already if its library fails
            print(f"worker: {model_type} does not import: {exc}", file=sys.stderr)
    raw = json.loads(args.policy)
    policy = LoadPolicy(roots=tuple(raw.get("roots", ())), allow_code_formats=bool(raw.get("allow_code_formats", True)),
                        trusted_types=tuple(raw.get("trusted_types", ())))
    worker = Worker(policy)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(args.listen)
    listener.listen(64)
    if args.max_model_bytes > 0:
        bound_memory(args.max_model_bytes)
    print("ready", flush=True)
    os.dup2(2, 1)  # the runtime stops reading stdout: a model's print() goes to its log instead
    parent = os.getppid()
    threading.Thread(target=_die_with_parent, args=(parent,), daemon=True, name="parent-watch").start()
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return 1
        try:
            threading.Thread(target=worker.serve, args=(conn,), daemon=True, name="conn").start()
        except RuntimeError:  # no thread to be had: this connection is refused, the others go on
            conn.close()


if __name__ == "__main__":
    sys.exit(main())
