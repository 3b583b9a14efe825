"""Build the peers' virtualenvs under ``.peers/`` (git-ignored), pinned, idempotent, bounded.

Each venv gets a small ``pins.json`` stamp with the requirement list it was built from; a venv
whose stamp matches is reused untouched, one whose stamp differs (or is missing) is rebuilt from
scratch. scikit-learn, joblib and numpy are pinned to the versions our own environment trains the
models with, so the peers unpickle exactly what we wrote (sklearn warns, and may misbehave, across
versions).

    python -m loadtest.peers.setup [--only ray|mlserver] [--timeout 600]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PEERS_DIR = ROOT / ".peers"

# Versions that installed and ran here (Python 3.11, 2026-11): see the report in peers.md facts.
COMMON = ["scikit-learn==1.9.1", "joblib==1.6.0", "numpy==2.4.6", "psutil==7.2.2"]
PINS: dict[str, list[str]] = {
    "ray": ["ray[serve]==2.60.0", *COMMON],
    # MLServer 1.7.1 needs protobuf<7 and Python<3.13.
    "mlserver": ["mlserver==1.7.1", "mlserver-sklearn==1.7.1", "protobuf==6.33.6", *COMMON],
}


class SetupError(RuntimeError):
    """A peer venv could not be built; the message names the venv and pip's last lines."""


def venv_dir(peer: str) -> Path:
    return PEERS_DIR / f"{peer}-venv"


def venv_python(peer: str) -> Path:
    return venv_dir(peer) / "bin" / "python"


def venv_bin(peer: str, name: str) -> Path:
    return venv_dir(peer) / "bin" / name


def _stamp(peer: str) -> Path:
    return venv_dir(peer) / "pins.json"


def is_ready(peer: str) -> bool:
    stamp = _stamp(peer)
    if not (stamp.exists() and venv_python(peer).exists()):
        return False
    return json.loads(stamp.read_text()) == PINS[peer]


def ensure_venv(peer: str, *, timeout_s: float = 600.0, log=print) -> Path:
    """The venv's python, building the venv first unless a matching one is there."""
    if is_ready(peer):
        return venv_python(peer)
    target = venv_dir(peer)
    if target.exists():
        log(f"[setup] {peer}: pins changed or incomplete venv, rebuilding {target}")
        shutil.rmtree(target)
    started = time.monotonic()
    deadline = started + timeout_s
    subprocess.run([sys.executable, "-m", "venv", str(target)], check=True, timeout=120)
    cmd = [str(venv_python(peer)), "-m", "pip", "install", "--no-input", "--quiet",
           "--disable-pip-version-check", *PINS[peer]]
    log(f"[setup] {peer}: pip install {' '.join(PINS[peer])}")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired as err:
        shutil.rmtree(target, ignore_errors=True)
        raise SetupError(f"{peer}: pip install did not finish within {timeout_s:.0f} s") from err
    if proc.returncode != 0:
        shutil.rmtree(target, ignore_errors=True)
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise SetupError(f"{peer}: pip install failed (rc {proc.returncode}) for "
                         f"{PINS[peer]}:\n{tail}")
    # Written last: a stamp means the install completed.
    _stamp(peer).write_text(json.dumps(PINS[peer]))
    log(f"[setup] {peer}: ready in {time.monotonic() - started:.0f} s")
    return venv_python(peer)


def ensure_all(peers: list[str] | None = None, *, timeout_s: float = 600.0) -> dict[str, Path]:
    return {p: ensure_venv(p, timeout_s=timeout_s) for p in (peers or list(PINS))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(PINS))
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per venv")
    args = parser.parse_args()
    try:
        ensure_all([args.only] if args.only else None, timeout_s=args.timeout)
    except SetupError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
