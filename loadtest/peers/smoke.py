"""Smoke run of both peers: build the venvs if needed, serve N sklearn models, drive, report, stop.

    python -m loadtest.peers.smoke --models 20 --duration 10

Each peer runs in a child process of this one (``--phase``), inside a fresh network namespace
with only loopback (``unshare -n``) when that is allowed (root): Ray's core (GCS, raylet, agents,
core workers) hard-codes ``0.0.0.0`` listeners with no option to bind loopback, so the namespace is
what keeps "127.0.0.1 only" true for Ray. MLServer gets the same wrapper so both run alike. The
child starts the peer, drives it, stops it, checks that no process of the peer's tree survives,
and prints one ``RESULT {json}`` line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from loadtest.peers import setup
from loadtest.peers.drive import Target, drive_grpc, drive_http

ROOT = Path(__file__).resolve().parents[2]
PEERS = ("ray", "mlserver")


def make_models(directory: Path, n: int) -> list[tuple[Target, Path]]:
    """``n`` sklearn models ``sklearn-<seed>/model.{joblib,pkl}`` (tests/support/models.py)."""
    sys.path.insert(0, str(ROOT))
    from tests.support.models import make_model

    out = []
    for seed in range(n):
        art = make_model("sklearn", directory, seed)
        out.append((Target(art.path.name, art.sample), art.file))
    return out


def run_phase(peer: str, models_dir: Path, n: int, *, concurrency: int, duration_s: float,
              warmup_s: float, max_models: int) -> dict[str, object]:
    """Start ``peer``, drive it, stop it. Runs in the child."""
    from loadtest.peers import mlserver_app, ray_app

    models = make_models(models_dir, n)  # deterministic: same files, same samples as the parent
    targets = [t for t, _ in models]
    t0 = time.monotonic()
    if peer == "ray":
        handle = ray_app.start(models_dir, max_models=max_models)
    else:
        handle = mlserver_app.start({t.model_id: f for t, f in models})
    startup_s = time.monotonic() - t0
    proc = handle.proc
    try:
        if peer == "ray":
            coro = drive_http(handle.url, targets, name="ray", concurrency=concurrency,
                              duration_s=duration_s, warmup_s=warmup_s, proc=proc)
        else:
            coro = drive_grpc(handle.grpc_target, targets, name="mlserver",
                              concurrency=concurrency, duration_s=duration_s,
                              warmup_s=warmup_s, proc=proc)
        result = asyncio.run(coro)
        n_procs = len(proc.tree())
    finally:
        killed = handle.stop()
    survivors = [p.pid for p in proc.survivors()]
    return {**result.summary(), "startup_s": round(startup_s, 1), "processes": n_procs,
            "peak_rss_mb": round(result.extra.get("peak_rss_mb", 0.0), 1),
            "sigkilled": killed, "survivors": survivors}


def netns_prefix() -> list[str]:
    """argv prefix that runs a command in a new network namespace with loopback up, or []."""
    if shutil.which("unshare") is None or shutil.which("ip") is None or os.geteuid() != 0:
        return []
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=10)
    return [] if probe.returncode else ["unshare", "-n", "sh", "-c",
                                        'ip link set lo up && exec "$@"', "netns"]


def run_isolated(module: str, system: str, flags: list[str], *, limit_s: float,
                 allow_wildcard: bool) -> dict[str, Any]:
    """Run ``python -m module --phase system *flags`` in a loopback-only network namespace (when
    possible) and return the JSON of its ``RESULT`` line, with ``netns`` added."""
    prefix = netns_prefix()
    if not prefix and system == "ray" and not allow_wildcard:
        raise RuntimeError("Ray binds 0.0.0.0 and no network namespace is available "
                           "(needs root + unshare); pass --allow-wildcard to run it anyway")
    argv = [*prefix, sys.executable, "-m", module, "--phase", system, *flags]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=limit_s)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            out: dict[str, Any] = json.loads(line[len("RESULT "):])
            out["netns"] = bool(prefix)
            return out
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
    raise RuntimeError(f"{system} phase failed (rc {proc.returncode}):\n{tail}")


def run_child(peer: str, models_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    flags = ["--models-dir", str(models_dir), "--models", str(args.models),
             "--duration", str(args.duration), "--warmup", str(args.warmup),
             "--concurrency", str(args.concurrency), "--max-models", str(args.max_models)]
    return run_isolated("loadtest.peers.smoke", peer, flags,
                        limit_s=180 + args.warmup + args.duration,
                        allow_wildcard=args.allow_wildcard)


def smoke(*, models: int, duration: float, warmup: float = 1.0, concurrency: int = 8,
          max_models: int | None = None, allow_wildcard: bool = False,
          peers: tuple[str, ...] = PEERS) -> dict[str, dict[str, object]]:
    args = argparse.Namespace(models=models, duration=duration, warmup=warmup,
                              concurrency=concurrency, max_models=max_models or models,
                              allow_wildcard=allow_wildcard)
    t0 = time.monotonic()
    setup.ensure_all(list(peers))
    print(f"[smoke] venvs ready in {time.monotonic() - t0:.0f} s", flush=True)
    results = {}
    with tempfile.TemporaryDirectory(prefix="peer-models-") as tmp:
        models_dir = Path(tmp)
        make_models(models_dir, models)
        for peer in peers:
            results[peer] = run_child(peer, models_dir, args)
    return results


def table(results: dict[str, dict[str, object]]) -> str:
    rows = [f"{'peer':<9} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} "
            f"{'peak RSS MB':>12} {'procs':>6} {'start s':>8}"]
    for peer, r in results.items():
        errs = sum(r["errors"].values())  # type: ignore[union-attr]
        rows.append(f"{peer:<9} {r['throughput_rps']:>8} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} "
                    f"{errs:>7} {r['peak_rss_mb']:>12} {r['processes']:>6} {r['startup_s']:>8}")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description="Smoke run of Ray Serve and MLServer peers")
    parser.add_argument("--models", type=int, default=20)
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per peer")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-models", type=int, default=None,
                        help="Ray's max_num_models_per_replica (default: --models)")
    parser.add_argument("--peer", choices=PEERS, action="append", help="default: both")
    parser.add_argument("--allow-wildcard", action="store_true",
                        help="run Ray even where no loopback-only network namespace is possible")
    parser.add_argument("--json", action="store_true", help="print the raw results too")
    parser.add_argument("--phase", choices=PEERS, help=argparse.SUPPRESS)
    parser.add_argument("--models-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        out = run_phase(args.phase, args.models_dir, args.models, concurrency=args.concurrency,
                        duration_s=args.duration, warmup_s=args.warmup,
                        max_models=args.max_models or args.models)
        print("RESULT " + json.dumps(out), flush=True)
        return
    try:
        results = smoke(models=args.models, duration=args.duration, warmup=args.warmup,
                        concurrency=args.concurrency, max_models=args.max_models,
                        allow_wildcard=args.allow_wildcard, peers=tuple(args.peer or PEERS))
    except (setup.SetupError, RuntimeError, subprocess.TimeoutExpired) as err:
        sys.exit(f"error: {err}")
    print(table(results))
    if args.json:
        print(json.dumps(results, indent=2))
    bad = {p: r["survivors"] for p, r in results.items() if r["survivors"]}
    if bad:
        sys.exit(f"error: peer processes survived: {bad}")


if __name__ == "__main__":
    main()
