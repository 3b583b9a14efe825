"""Test servers installed outside the repository, once, into a cache folder: Azurite and moto.

Two servers cannot come from the test extra of pyproject.toml:

- Azurite (Azure's blob emulator) is an npm package: installed with npm into ``azurite/``.
- moto needs botocore, and every botocore wants python-dateutil < 3 while kubernetes 37 (a core
  dependency) wants >= 3, so no single environment resolves both. moto runs as a server process
  anyway, so it gets a virtual environment of its own (``moto/``), created with this Python.

The folder is ``$XDG_CACHE_HOME/mesh-serving-tests`` (``~/.cache/...``). ``scripts/install-test-deps``
installs both; a test that finds one missing, or at another version, installs it then (npm or pip
must reach their registries). A marker file, written last, names what was installed, so an
interrupted install is redone; a lock file keeps concurrent test processes from installing at once.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

AZURITE_VERSION = "3.35.0"  # the newest that runs on Node 20 (3.36 wants Node >= 21, 3.37 >= 22)
# 5.2.6: 5.2.1, with IAM authentication on, refuses every signed request whose query has a '/'
# (werkzeug's decoded URL is re-signed), so listing a prefix failed. flask and flask-cors are all
# that server mode needs for S3 (moto[server] would add cfn-lint, docker, aws-xray-sdk...).
MOTO_REQUIREMENTS = ("moto==5.2.6", "flask==3.1.3", "flask-cors==6.0.2", "werkzeug==3.1.8", "boto3==1.43.11",
                     "botocore==1.43.11")
INSTALL_TIMEOUT_S = 600.0
_MARKER = ".mesh-serving-installed"


class ToolMissing(RuntimeError):
    """A tool could not be found or installed."""


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mesh-serving-tests"


def _once(directory: Path, spec: str, install: Callable[[Path], None]) -> None:
    """``install(directory)`` unless the marker there already names ``spec``."""
    marker = directory / _MARKER
    if marker.is_file() and marker.read_text() == spec:
        return
    directory.parent.mkdir(parents=True, exist_ok=True)
    with (directory.parent / f"{directory.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.is_file() and marker.read_text() == spec:
            return  # another process installed it while this one waited
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir()
        try:
            install(directory)
        except (OSError, subprocess.SubprocessError) as error:
            raise ToolMissing(f"installing {spec} into {directory} failed: {error}") from error
        marker.write_text(spec)


def _run(argv: list[str]) -> None:
    subprocess.run(argv, check=True, timeout=INSTALL_TIMEOUT_S, stdin=subprocess.DEVNULL)


def ensure_azurite() -> Path:
    """Azurite's blob server script (run it with ``node``)."""
    npm = shutil.which("npm")
    directory = cache_dir() / "azurite"
    script = directory / "node_modules" / "azurite" / "dist" / "src" / "blob" / "main.js"
    if npm is None and not script.is_file():
        raise ToolMissing("Azurite needs node and npm on PATH (scripts/install-test-deps)")
    _once(directory, f"azurite@{AZURITE_VERSION}", lambda target: _run(
        [str(npm), "install", "--prefix", str(target), f"azurite@{AZURITE_VERSION}", "--save-exact", "--no-audit",
         "--no-fund"]))
    return script


def ensure_moto() -> Path:
    """The Python of moto's own virtual environment (run ``-m moto.server`` with it)."""
    directory = cache_dir() / "moto"

    def install(target: Path) -> None:
        python = str(target / "bin" / "python")
        try:
            _run([sys.executable, "-m", "venv", str(target)])
            installer = [python, "-m", "pip"]
        except subprocess.CalledProcessError:
            # A Python without ensurepip (Debian's, without python3-venv): an environment with no
            # pip of its own, filled by this Python's pip (pip >= 22.3 installs into another).
            shutil.rmtree(target, ignore_errors=True)
            _run([sys.executable, "-m", "venv", "--without-pip", str(target)])
            installer = [sys.executable, "-m", "pip", "--python", python]
        _run([*installer, "install", "--quiet", "--disable-pip-version-check", *MOTO_REQUIREMENTS])

    _once(directory, " ".join(MOTO_REQUIREMENTS), install)
    return directory / "bin" / "python"


if __name__ == "__main__":
    print("azurite:", ensure_azurite())
    print("moto:", ensure_moto())
