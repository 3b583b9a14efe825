"""Ray Serve model multiplexing as a peer: V2 JSON REST over Serve's HTTP proxy, sklearn by model ID.

Two halves in one file. ``serve_main`` runs *inside the ray venv* (``python ray_app.py serve ...``):
it starts a one-node Ray (``num_cpus=2``, no dashboard, everything on 127.0.0.1), deploys
``Multiplexed`` (one replica; ``@serve.multiplexed(max_num_models_per_replica=K)`` keeps an LRU of
K joblib models per replica), writes a ready file, and on SIGTERM shuts Serve and Ray down.
``start``/``stop`` run in our environment and treat all that as one process tree (see ``_proc``).

Requests: ``POST /v2/models/{id}/infer`` with the V2 JSON body for one FP32 tensor, and the
``serve_multiplexed_model_id: {id}`` header, which Serve's router uses to prefer a replica that
holds the model. The handler takes the ID from the header and falls back to the path.

Loads counted: with ``--loads-file F`` the multiplexed loader appends one line (the model ID) to
``F`` for every model it loads. Serve calls the loader only on a miss of its LRU, one load at a
time per replica (its model-cache lock, which also makes concurrent misses for one model a single
load), so the line count is the number of loads; ``RayPeer.loads()`` reads it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve()


# ---------------------------------------------------------------------------------------------
# Inside the ray venv.
# ---------------------------------------------------------------------------------------------
def _v2_datatype(arr) -> str:  # arr: a numpy array (numpy is imported only in the ray venv)
    kind = arr.dtype.kind
    if kind in "OUS":
        return "BYTES"
    return {"float64": "FP64", "float32": "FP32", "int64": "INT64", "int32": "INT32",
            "bool": "BOOL"}.get(str(arr.dtype), "FP64")


def build_app(models_dir: str, max_models: int, max_ongoing: int, loads_file: str = ""):
    import joblib
    import numpy as np
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    @serve.deployment(num_replicas=1, max_ongoing_requests=max_ongoing,
                      ray_actor_options={"num_cpus": 1})
    class Multiplexed:
        def __init__(self) -> None:
            self.loads = 0
            # Line-buffered, appending: each load's line is in the file as soon as it is written.
            self._loads_out = open(loads_file, "a", buffering=1) if loads_file else None

        @serve.multiplexed(max_num_models_per_replica=max_models)
        async def get_model(self, model_id: str):
            folder = Path(models_dir) / model_id
            files = sorted(folder.glob("model.joblib")) or sorted(folder.glob("model.*"))
            if not files:
                raise FileNotFoundError(f"no model file in {folder}")
            model = joblib.load(files[0])
            self.loads += 1
            if self._loads_out is not None:  # one short write per load, nothing next to the load
                self._loads_out.write(model_id + "\n")
            return model

        async def __call__(self, request: Request) -> JSONResponse:
            parts = request.url.path.strip("/").split("/")
            if len(parts) != 4 or parts[0] != "v2" or parts[1] != "models" or parts[3] != "infer":
                return JSONResponse({"error": f"no route {request.url.path}"}, status_code=404)
            model_id = serve.get_multiplexed_model_id() or parts[2]
            body = await request.json()
            tensor = body["inputs"][0]
            x = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
            try:
                model = await self.get_model(model_id)
            except FileNotFoundError as err:
                return JSONResponse({"error": str(err)}, status_code=404)
            y = np.asarray(model.predict(x))
            data = y.astype(str).tolist() if y.dtype.kind in "OUS" else y.tolist()
            return JSONResponse({
                "model_name": model_id, "id": body.get("id", ""),
                "outputs": [{"name": "predict", "shape": list(y.shape),
                             "datatype": _v2_datatype(y), "data": data}],
            })

    return Multiplexed.bind()


def serve_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models-dir", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-models", type=int, default=20)
    parser.add_argument("--max-ongoing", type=int, default=16)
    parser.add_argument("--ready-file", required=True)
    parser.add_argument("--temp-dir", required=True)
    parser.add_argument("--loads-file", default="", help="append one line per model load here")
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             _temp_dir=args.temp_dir, configure_logging=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        serve.run(build_app(args.models_dir, args.max_models, args.max_ongoing, args.loads_file),
                  name="peer", route_prefix="/")
        Path(args.ready_file).write_text(json.dumps({"port": args.port}))
        stop.wait()
    finally:
        # Serve first (its controller and proxy are actors), then the node (GCS, raylet, workers).
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


# ---------------------------------------------------------------------------------------------
# In our environment.
# ---------------------------------------------------------------------------------------------
@dataclass
class RayPeer:
    proc: object  # _proc.PeerProcess
    url: str  # http://127.0.0.1:PORT
    work_dir: Path
    loads_file: Path  # one line per model the replica loaded

    def loads(self) -> int:
        """Models loaded so far (the loader's lines; 0 before the first)."""
        try:
            return self.loads_file.read_bytes().count(b"\n")
        except FileNotFoundError:
            return 0

    def stop(self) -> list[int]:
        return self.proc.stop(grace_s=20.0)  # type: ignore[attr-defined]


def start(models_dir: Path, *, max_models: int = 20, max_ongoing: int = 16,
          ready_timeout_s: float = 90.0, work_dir: Path | None = None) -> RayPeer:
    from loadtest.peers import setup
    from loadtest.peers._proc import PeerProcess, free_port, wait_until

    python = setup.ensure_venv("ray")
    # Ray's socket paths must stay short (AF_UNIX 107-char limit): a fresh dir under /tmp.
    work = work_dir or Path(tempfile.mkdtemp(prefix="rayp-"))
    ready = work / "ready.json"
    loads_file = work / "loads.txt"
    port = free_port()
    env = {
        "RAY_USAGE_STATS_ENABLED": "0",
        "HOME": str(work),  # Ray 2.60 writes ~/.ray/auth_token; keep it out of the real home
        "PYTHONPATH": "",
    }
    argv = [str(python), str(HERE), "serve", "--models-dir", str(models_dir), "--port", str(port),
            "--max-models", str(max_models), "--max-ongoing", str(max_ongoing),
            "--ready-file", str(ready), "--temp-dir", str(work / "t"),
            "--loads-file", str(loads_file)]
    proc = PeerProcess("ray", argv, env=env, log_path=work / "ray.log")
    try:
        wait_until(ready.exists, timeout_s=ready_timeout_s, what="Ray Serve ready", proc=proc)
    except BaseException:
        proc.stop(grace_s=10.0)
        raise
    return RayPeer(proc, f"http://127.0.0.1:{port}", work, loads_file)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        serve_main(sys.argv[2:])
    else:
        sys.exit("usage: ray_app.py serve --models-dir D --port P --ready-file F --temp-dir T")
