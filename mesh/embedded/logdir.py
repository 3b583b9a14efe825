"""Where ``mesh up`` keeps its logs, and how much they may take.

Decisions, for an operator who comes back after the mesh has stopped (or crashed):

- **Kept by default**, one directory per run:
  ``$XDG_STATE_HOME/mesh-serving/up/<YYYYmmdd-HHMMSS>-<pid>/`` (``~/.local/state/...`` when
  ``XDG_STATE_HOME`` is unset). The XDG base-directory spec names the state directory for exactly
  this ("logs, history"); the working directory was the alternative, but ``mesh up`` is often run
  from a source checkout, where a log folder would be one more untracked thing to trip over. The
  path is printed before anything starts.
- ``--logs DIR`` puts this run's logs in DIR instead (created if missing). Files already there are
  appended to, after a line saying a new run starts; nothing in DIR is ever deleted.
- **Bounded.** Each component's log (``router.log``, ``runtime-N.log``, ``etcd.log``) is rotated
  when it passes ``--log-max-size`` (default 10 MiB): copied to ``<name>.1`` (replacing the one
  before) and truncated, as logrotate's ``copytruncate`` does, because the child keeps its file
  open (opened for appending, so it writes at the new end). Lines written between the copy and the
  truncation are lost: a few at most, at 10 MiB intervals. So a run holds at most
  2 x 10 MiB per component (80 MiB for the default router, 2 runtimes and etcd). In the default
  location the newest ``KEEP_RUNS`` (10) run directories are kept; older ones are removed at start,
  and the console says which, so a default install holds at most about 800 MiB of logs.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

KEEP_RUNS = 10
LOG_MAX_BYTES = 10 * 1024 * 1024


def default_base() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "mesh-serving" / "up"


@dataclass
class LogDir:
    path: Path
    kept: bool = True  # False: a temporary directory, removed with the rest at exit
    max_bytes: int = LOG_MAX_BYTES

    def rotate(self) -> list[str]:
        """Copy-truncate every log over ``max_bytes``; what was done, for the console."""
        events = []
        for log in sorted(self.path.glob("*.log")):
            try:
                if log.stat().st_size <= self.max_bytes:
                    continue
                shutil.copyfile(log, log.with_name(log.name + ".1"))
                os.truncate(log, 0)
            except OSError as exc:  # a full disk must not stop the supervisor
                events.append(f"logs: cannot rotate {log}: {exc.strerror or exc}")
                continue
            events.append(f"logs: {log.name} passed {_size(self.max_bytes)}, rotated to {log.name}.1")
        return events


def open_log_dir(explicit: Path | None, *, max_bytes: int = LOG_MAX_BYTES,
                 keep_runs: int = KEEP_RUNS) -> tuple[LogDir, list[str]]:
    """This run's log directory, created; and lines for the console (pruned runs)."""
    notes: list[str] = []
    if explicit is not None:
        path = explicit.expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        for log in path.glob("*.log"):  # runs before ours wrote here: mark where ours begins
            with open(log, "a") as f:
                f.write(f"==== mesh up (pid {os.getpid()}) started at {stamp} ====\n")
        return LogDir(path, max_bytes=max_bytes), notes
    base = default_base()
    base.mkdir(parents=True, exist_ok=True)
    path = base / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    path.mkdir()
    # Names sort by start time; ours is the newest. Only directories named as ours are touched.
    runs = sorted(p for p in base.iterdir() if p.is_dir() and _is_run_name(p.name))
    for old in runs[:max(0, len(runs) - keep_runs)]:
        shutil.rmtree(old, ignore_errors=True)
        notes.append(f"logs: removed the logs of an older run, {old} (the newest {keep_runs} are kept)")
    return LogDir(path, max_bytes=max_bytes), notes


def _size(n: int) -> str:
    return f"{n / 2**20:g} MiB" if n >= 2**20 else f"{n / 1024:g} KiB"


def _is_run_name(name: str) -> bool:
    parts = name.split("-")
    return len(parts) == 3 and all(p.isdigit() for p in parts) and len(parts[0]) == 8


__all__ = ["KEEP_RUNS", "LOG_MAX_BYTES", "LogDir", "default_base", "open_log_dir"]
