"""Object storage with `mesh up` as a user runs it (real processes): storage keys in a folder
(``MESH_STORAGE_CONFIG_DIR``), a model uploaded to a real S3 server (moto, IAM on), registered with
``mesh model register --storage-key`` and inferred with ``mesh infer``; and a runtime killed with
SIGKILL in the middle of a download from a slow HTTP server (a real server in the test's thread,
sending 64 KiB every 20 ms): `mesh up` restarts it, the restarted runtime removes the partial pull,
and the model then loads from a complete download and answers correctly. Nothing half-written is
ever loaded."""

from __future__ import annotations

import http.server
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.e2e.test_mesh_up import MeshUp
from tests.support.models import make_model
from tests.support.object_stores import moto_s3

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


class _Slow(http.server.BaseHTTPRequestHandler):
    body = b""
    gets = 0

    def do_GET(self) -> None:
        type(self).gets += 1
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        try:
            for i in range(0, len(self.body), 64 * 1024):
                self.wfile.write(self.body[i:i + 64 * 1024])
                time.sleep(0.02)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def slow_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Slow)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _bundle(model_file: Path) -> bytes:
    """A tar of the model and 6 MiB of padding the loader ignores (no model extension)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(model_file, arcname="model/iris.joblib")
        padding = os.urandom(6 * 1024 * 1024)
        info = tarfile.TarInfo("model/padding.bin")
        info.size = len(padding)
        tar.addfile(info, io.BytesIO(padding))
    return buffer.getvalue()


def _runtimes(up: MeshUp) -> list[int]:
    """The runtime processes of ``up`` (a killed one may be a zombie until `mesh up` reaps it)."""
    try:
        return up.runtime_pids()
    except psutil.Error:
        return []


def test_mesh_up_pulls_from_s3_and_survives_a_kill_mid_download(
        tmp_path: Path, slow_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model("sklearn", tmp_path / "trained", seed=5)
    keys, cache = tmp_path / "keys", tmp_path / "cache"
    keys.mkdir()
    _Slow.body, _Slow.gets = _bundle(model.file), 0
    with moto_s3() as s3:
        s3.put("models", "sklearn/iris.joblib", model.file.read_bytes())
        (keys / "localMinIO").write_text(json.dumps(s3.storage_key("models")))
        monkeypatch.setenv("MESH_STORAGE_CONFIG_DIR", str(keys))
        monkeypatch.setenv("MESH_STORAGE_CACHE_DIR", str(cache))
        up = MeshUp(tmp_path, "--runtimes", "1")
        try:
            def cli(*args: str) -> subprocess.CompletedProcess[str]:
                return subprocess.run([sys.executable, "-m", "mesh", *args, "--router", up.address],
                                      capture_output=True, text=True, timeout=60)

            rows = model.sample[:2].tolist()
            r = cli("model", "register", "iris", "--type", "sklearn", "--storage-key", "localMinIO",
                    "--path", "sklearn/iris.joblib")
            assert r.returncode == 0, r.stderr
            r = cli("infer", "iris", "--input", str(rows), "--datatype", "FP32", "--json")
            assert r.returncode == 0, r.stderr
            assert json.loads(r.stdout)["outputs"]["predict"]["data"] == model.expected["predict"][:2].tolist()
            r = cli("model", "register", "denied", "--type", "sklearn", "--storage-key", "nope",
                    "--path", "sklearn/iris.joblib")
            # Registered, and the runtime's check says at once what the load would fail on.
            assert r.returncode == 1 and "storage key 'nope' is not configured" in r.stdout, r.stdout
            r = cli("infer", "denied", "--input", str(rows), "--datatype", "FP32")
            assert r.returncode == 1 and "storage key 'nope' is not configured" in r.stderr, r.stderr

            r = cli("model", "register", "slow", "--type", "sklearn", "--path", f"{slow_server}/bundle.tar")
            assert r.returncode == 0, r.stderr
            loading = subprocess.Popen([sys.executable, "-m", "mesh", "infer", "slow", "--input", str(rows),
                                        "--datatype", "FP32", "--router", up.address],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 30
            while not list(cache.glob("*/.partial-*/bundle.tar")):
                assert time.monotonic() < deadline, "no download started"
                time.sleep(0.05)
            [runtime] = up.runtime_pids()
            os.kill(runtime, signal.SIGKILL)  # mid-download
            loading.wait(60)
            deadline = time.monotonic() + 60
            while _runtimes(up) in ([], [runtime]):
                assert time.monotonic() < deadline, "runtime not restarted"
                time.sleep(0.1)
            deadline = time.monotonic() + 60
            while (r := cli("infer", "slow", "--input", str(rows), "--datatype", "FP32", "--json")).returncode:
                # Until the restarted runtime is ready, the router has nowhere to send it.
                assert time.monotonic() < deadline and ("UNAVAILABLE" in r.stderr or "reach" in r.stderr), r.stderr
                time.sleep(0.5)
            assert json.loads(r.stdout)["outputs"]["predict"]["data"] == model.expected["predict"][:2].tolist()
            assert _Slow.gets >= 2  # the interrupted download was not taken for a complete one
            assert not list(cache.glob("*/.partial-*"))
            [entry] = [p for p in cache.glob("*/*/bundle") if p.is_dir()]
            assert (entry / "model" / "iris.joblib").read_bytes() == model.file.read_bytes()
        finally:
            assert up.stop() == 0
