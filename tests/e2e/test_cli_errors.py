"""The CLI's mistakes answered as a user meets them (issue 20, parts 3 and 4): `mesh` run as a
subprocess against a real `mesh up` (etcd, a router, a runtime), each error one line on stderr with
what to do and the documented exit code (2 for usage and unusable input, 1 for a failed
operation), never a traceback; and a model whose file was fixed loads at once with
`mesh model load --retry` instead of after its failures' TTL."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import joblib
import numpy as np
import psutil
import pytest
from grpc_health.v1 import health, health_pb2_grpc
from sklearn.linear_model import LogisticRegression

from tests.e2e.test_mesh_up import MeshUp
from tests.support.certs import CertAuthority

pytestmark = [pytest.mark.e2e]


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshUp]:
    mesh = MeshUp(tmp_path_factory.mktemp("up"), "--runtimes", "1")
    try:
        yield mesh
    finally:
        pids = mesh.all_pids() if mesh.proc.poll() is None else []
        mesh.stop()
        for pid in pids:
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    x = rng.random((60, 4))
    path = tmp_path_factory.mktemp("models") / "iris-like.joblib"
    joblib.dump(LogisticRegression().fit(x, (x[:, 0] > 0.5).astype(int)), path)
    return path


def mesh(router: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mesh", *args, "--router", router], capture_output=True,
                          text=True, timeout=60, cwd=cwd, env={**os.environ, "MESH_TOKEN": ""})


def one_line(proc: subprocess.CompletedProcess[str], code: int) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mesh: error: "), proc.stderr
    return lines[0]


def test_ragged_input_is_one_line_and_exit_2(up: MeshUp, model_file: Path) -> None:
    registered = mesh(up.address, "model", "register", "ragged", "--type", "sklearn", "--path", str(model_file))
    assert registered.returncode == 0
    line = one_line(mesh(up.address, "infer", "ragged", "--input", "[[1, 2, 3], [1, 2]]"), 2)
    assert "rectangular" in line and "same length" in line
    line = one_line(mesh(up.address, "infer", "ragged", "--input", '[["a", 1, 2, 3]]', "--datatype", "FP32"), 2)
    assert "does not convert to FP32" in line


def test_closed_pipe_ends_quietly(up: MeshUp, model_file: Path) -> None:
    for i in range(3):
        mesh(up.address, "model", "register", f"piped-{i}", "--type", "sklearn", "--path", str(model_file))
    proc = subprocess.Popen([sys.executable, "-m", "mesh", "model", "list", "--router", up.address],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before the first line is written, as `| head -0`
    err = proc.stderr.read().decode()
    assert proc.wait(60) == 0, err
    assert err == ""


def test_unregistering_a_missing_model_says_so(up: MeshUp) -> None:
    line = one_line(mesh(up.address, "model", "unregister", "never-registered"), 1)
    assert "'never-registered' is not registered" in line and "mesh model list" in line


def test_infer_resolves_a_vmodel_without_flag(up: MeshUp, model_file: Path) -> None:
    assert mesh(up.address, "model", "register", "vm-target", "--type", "sklearn",
                "--path", str(model_file)).returncode == 0
    assert mesh(up.address, "vmodel", "set", "vm-alias", "vm-target").returncode == 0
    plain = mesh(up.address, "infer", "vm-alias", "--input", "[[0.9, 0.1, 0.1, 0.1]]")
    flagged = mesh(up.address, "infer", "vm-alias", "--vmodel", "--input", "[[0.9, 0.1, 0.1, 0.1]]")
    assert plain.returncode == 0 and flagged.returncode == 0, (plain.stderr, flagged.stderr)
    assert plain.stdout == flagged.stdout and "[1]" in plain.stdout
    # --vmodel insists on a vModel: a model's ID is not one.
    line = one_line(mesh(up.address, "infer", "vm-target", "--vmodel", "--input", "[[0.9, 0.1, 0.1, 0.1]]"), 1)
    assert "NOT_FOUND" in line


def test_registering_a_type_no_runtime_loads_exits_1_saying_why(up: MeshUp, model_file: Path) -> None:
    proc = mesh(up.address, "model", "register", "odd-type", "--type", "no-such-format", "--path", str(model_file))
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "no runtime loads type 'no-such-format'" in proc.stdout and "sklearn" in proc.stdout
    assert "Traceback" not in proc.stderr
    # Registered all the same (ModelMesh's contract: a runtime for the type may come later).
    assert "odd-type" in mesh(up.address, "model", "list").stdout


def test_fixed_model_loads_at_once_with_retry(up: MeshUp, tmp_path: Path, model_file: Path) -> None:
    path = tmp_path / "fixed-later.joblib"
    registered = mesh(up.address, "model", "register", "fixed-later", "--type", "sklearn", "--path", str(path))
    assert registered.returncode == 1 and "does not exist" in registered.stdout  # registered, and told
    line = one_line(mesh(up.address, "infer", "fixed-later", "--input", "[[0.1, 0.2, 0.3, 0.4]]"), 1)
    assert "does not exist" in line
    path.write_bytes(model_file.read_bytes())
    # Fixed, but the failure is remembered (by the routers and the runtime): the error says how to retry.
    line = one_line(mesh(up.address, "infer", "fixed-later", "--input", "[[0.1, 0.2, 0.3, 0.4]]"), 1)
    assert "mesh model load fixed-later --retry" in line
    loaded = mesh(up.address, "model", "load", "fixed-later", "--retry")
    assert loaded.returncode == 0 and "fixed-later: LOADED" in loaded.stdout, (loaded.stdout, loaded.stderr)
    answered = mesh(up.address, "infer", "fixed-later", "--input", "[[0.1, 0.2, 0.3, 0.4]]")
    assert answered.returncode == 0 and "predict" in answered.stdout, answered.stderr


def test_relative_path_error_names_the_directory(up: MeshUp) -> None:
    registered = mesh(up.address, "model", "register", "relative", "--type", "sklearn",
                      "--path", "no-such-dir/model.joblib", "--no-check")
    assert registered.returncode == 0  # not checked: registered as ModelMesh would, silently
    line = one_line(mesh(up.address, "infer", "relative", "--input", "[[0.1, 0.2, 0.3, 0.4]]"), 1)
    assert "relative path: resolved against this runtime's working directory" in line
    assert os.getcwd() in line  # `mesh up` ran its runtime in the test's working directory


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, CertAuthority]]:
    """A real TLS gRPC server whose certificate names only other.example (a stand-in for a TLS
    router: the CLI's connection fails before any method is called, whatever the server serves)."""
    ca = CertAuthority(tmp_path_factory.mktemp("tls"), "cli-ca")
    pem = ca.issue("router", hosts=("other.example",))
    server = grpc.server(futures.ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(
        [(pem.key.read_bytes(), pem.cert.read_bytes())]))
    server.start()
    try:
        yield f"127.0.0.1:{port}", ca
    finally:
        server.stop(None)


def test_plaintext_to_a_tls_router_says_tls(tls_server: tuple[str, CertAuthority]) -> None:
    address, _ = tls_server
    line = one_line(mesh(address, "model", "list"), 2)
    assert "may require TLS" in line and "--tls-ca" in line and "is it running" not in line


def test_certificate_name_mismatch_says_which_option(tls_server: tuple[str, CertAuthority]) -> None:
    address, ca = tls_server
    line = one_line(mesh(address, "model", "list", "--tls-ca", str(ca.ca_file)), 2)
    assert "does not name 127.0.0.1" in line and "--tls-server-name" in line
    proc = mesh(address, "model", "list", "--tls-ca", str(ca.ca_file), "--tls-server-name", "other.example")
    # The name fixed, the TLS connection is made: the server answers, just not ModelMesh's API.
    line = one_line(proc, 1)
    assert "UNIMPLEMENTED" in line


def test_nothing_listening_says_is_it_running() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    line = one_line(mesh(f"127.0.0.1:{port}", "model", "list"), 2)
    assert "is it running?" in line


def test_a_model_traceback_is_one_line_for_the_client_and_whole_in_the_runtime_log(
        up: MeshUp, tmp_path: Path) -> None:
    """TorchScript puts its interpreter's whole stack in the error; the client gets the last line
    and a request ID, and the runtime's kept log has the whole text under that ID."""
    import torch

    path = tmp_path / "mlp.pt"
    torch.jit.script(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))).save(
        str(path))
    assert mesh(up.address, "model", "register", "mlp", "--type", "torchscript", "--path", str(path)).returncode == 0
    line = one_line(mesh(up.address, "infer", "mlp", "--input", "[[0.1, 0.2, 0.3]]", "--datatype", "FP32"), 1)
    assert "mat1 and mat2 shapes cannot be multiplied (1x3 and 4x8)" in line and "Traceback" not in line
    match = re.search(r"request id ([0-9a-f]+)\)", line)
    assert match, line
    logs = Path(re.search(r"^logs: (\S+)", up.text(), re.MULTILINE).group(1))  # type: ignore[union-attr]
    logged = [json.loads(raw) for log in logs.glob("runtime-*.log") for raw in log.read_text().splitlines()
              if match.group(1) in raw and '"model error"' in raw]
    assert len(logged) == 1 and "Traceback of TorchScript" in logged[0]["error"]


def test_registration_checks_the_file_and_the_storage_key_on_the_runtime(up: MeshUp, model_file: Path) -> None:
    """Checked without loading, on the runtime that would load it; registered either way."""
    missing = mesh(up.address, "model", "register", "checked-missing", "--type", "sklearn",
                   "--path", "no-such-dir/model.joblib")
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert "model path 'no-such-dir/model.joblib' does not exist (a relative path: resolved against this " \
           "runtime's working directory" in missing.stdout and "(checked on runtime-0-" in missing.stdout
    keyless = mesh(up.address, "model", "register", "checked-key", "--type", "sklearn",
                   "--path", "models/x.joblib", "--storage-key", "no-such-key")
    assert keyless.returncode == 1 and "storage key 'no-such-key' is not configured" in keyless.stdout
    fine = mesh(up.address, "model", "register", "checked-fine", "--type", "sklearn", "--path", str(model_file))
    assert fine.returncode == 0 and "error" not in fine.stdout, fine.stdout
    listed = mesh(up.address, "model", "list").stdout
    assert "checked-missing" in listed and "checked-key" in listed
