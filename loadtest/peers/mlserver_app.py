"""MLServer (Seldon) as a peer: the same sklearn files, served over its V2 gRPC (and REST) endpoint.

``write_repository`` writes MLServer's ``settings.json`` and one ``<id>/model-settings.json`` per
model (``mlserver_sklearn.SKLearnModel``, ``uri`` = the absolute path of our joblib file) into a
directory of its own, so the shared models directory stays untouched. ``start`` runs
``mlserver start DIR`` from the mlserver venv on free 127.0.0.1 ports and waits for
``/v2/health/ready``, which MLServer answers only once every model at startup has loaded.

MLServer has no eviction: every model is resident, which is the case to compare it with.
``parallel_workers=0`` keeps inference in the main process: for µs-scale sklearn predicts the
worker pool only adds an IPC hop (and a process per worker to the RSS).
"""

from __future__ import annotations

import json
import tempfile
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


def write_repository(repo: Path, models: Mapping[str, Path], *, http_port: int, grpc_port: int,
                     metrics_port: int, parallel_workers: int = 0) -> Path:
    """``models`` maps model ID -> model file. Returns ``repo``."""
    repo.mkdir(parents=True, exist_ok=True)
    settings = {
        "debug": False, "host": "127.0.0.1", "http_port": http_port, "grpc_port": grpc_port,
        "metrics_port": metrics_port, "parallel_workers": parallel_workers,
        "load_models_at_startup": True,
    }
    (repo / "settings.json").write_text(json.dumps(settings, indent=2))
    for model_id, file in models.items():
        (repo / model_id).mkdir(exist_ok=True)
        (repo / model_id / "model-settings.json").write_text(json.dumps({
            "name": model_id,
            "implementation": "mlserver_sklearn.SKLearnModel",
            "parameters": {"uri": str(Path(file).resolve())},
        }, indent=2))
    return repo


@dataclass
class MLServerPeer:
    proc: object  # _proc.PeerProcess
    http_url: str
    grpc_target: str  # host:port for grpc channels
    work_dir: Path

    def stop(self) -> list[int]:
        return self.proc.stop(grace_s=15.0)  # type: ignore[attr-defined]


def _ready(url: str) -> bool:
    with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2) as resp:
        return resp.status == 200


def start_empty(work: Path, *, ready_timeout_s: float = 120.0) -> tuple[MLServerPeer, Path]:
    """MLServer with an empty model repository and no loads at start-up, for the mesh's runtime
    to load into (``runtime.server = mlserver``); returns the peer and the repository directory.
    A dummy ``MLSERVER_MODEL_NAME`` as modelmesh-serving sets it; the grpc message limit lifted
    as there (the runtime bounds what it forwards)."""
    from loadtest.peers import setup
    from loadtest.peers._proc import PeerProcess, free_port, wait_until

    setup.ensure_venv("mlserver")
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    repo = work / "repo"
    write_repository(repo, {}, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port)
    settings = json.loads((repo / "settings.json").read_text())
    settings["load_models_at_startup"] = False
    (repo / "settings.json").write_text(json.dumps(settings, indent=2))
    argv = [str(setup.venv_bin("mlserver", "mlserver")), "start", str(repo)]
    proc = PeerProcess("mlserver", argv, env={"PYTHONPATH": "", "MLSERVER_MODEL_NAME": "dummy-model-fixme",
                                              "MLSERVER_GRPC_MAX_MESSAGE_LENGTH": "-1"},
                       cwd=work, log_path=work / "mlserver.log")
    url = f"http://127.0.0.1:{http_port}"
    try:
        wait_until(lambda: _ready(url), timeout_s=ready_timeout_s, what="MLServer ready", proc=proc)
    except BaseException:
        proc.stop(grace_s=10.0)
        raise
    return MLServerPeer(proc, url, f"127.0.0.1:{grpc_port}", work), repo


def start(models: Mapping[str, Path], *, ready_timeout_s: float = 120.0,
          work_dir: Path | None = None) -> MLServerPeer:
    from loadtest.peers import setup
    from loadtest.peers._proc import PeerProcess, free_port, wait_until

    setup.ensure_venv("mlserver")
    work = work_dir or Path(tempfile.mkdtemp(prefix="mlsp-"))
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    repo = write_repository(work / "repo", models, http_port=http_port, grpc_port=grpc_port,
                            metrics_port=metrics_port)
    argv = [str(setup.venv_bin("mlserver", "mlserver")), "start", str(repo)]
    proc = PeerProcess("mlserver", argv, env={"PYTHONPATH": ""}, cwd=work,
                       log_path=work / "mlserver.log")
    url = f"http://127.0.0.1:{http_port}"
    try:
        wait_until(lambda: _ready(url), timeout_s=ready_timeout_s, what="MLServer ready",
                   proc=proc)
    except BaseException:
        proc.stop(grace_s=10.0)
        raise
    return MLServerPeer(proc, url, f"127.0.0.1:{grpc_port}", work)
