"""A peer server as a process tree we started: launch, watch its memory, and stop every process in it.

Ray forks a dozen processes (GCS, raylet, agents, workers) that outlive a killed driver, so
"stop" cannot just terminate the root. The tree is re-walked on every memory sample and each
process seen is remembered with its create time; at stop the root gets SIGTERM (a clean shutdown
first), then every remembered process still alive *with the same create time* (so never a reused
PID) gets SIGTERM, then SIGKILL. Only processes that descend from the one we launched are touched.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import psutil


class PeerProcess:
    def __init__(self, name: str, argv: Sequence[str], *, env: dict[str, str] | None = None,
                 cwd: Path | None = None, log_path: Path | None = None,
                 sample_interval_s: float = 0.25) -> None:
        self.name = name
        self._log = open(log_path, "ab") if log_path else subprocess.DEVNULL
        self.popen = subprocess.Popen(list(argv), env={**os.environ, **(env or {})}, cwd=cwd,
                                      stdout=self._log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        self.root = psutil.Process(self.popen.pid)
        self._seen: dict[int, float] = {self.root.pid: self.root.create_time()}
        self._lock = threading.Lock()
        self.peak_rss_bytes = 0
        self._interval = sample_interval_s
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample_loop, name=f"rss-{name}", daemon=True)
        self._sampler.start()

    # -- memory ---------------------------------------------------------------------------------
    def tree(self) -> list[psutil.Process]:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            procs = []
        with self._lock:
            for p in procs:
                try:
                    self._seen.setdefault(p.pid, p.create_time())
                except psutil.NoSuchProcess:
                    pass
        return procs

    def rss_bytes(self) -> int:
        total = 0
        for p in self.tree():
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def reset_peak(self) -> None:
        self.peak_rss_bytes = self.rss_bytes()

    def _sample_loop(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak_rss_bytes = max(self.peak_rss_bytes, self.rss_bytes())

    # -- lifetime -------------------------------------------------------------------------------
    def alive(self) -> bool:
        return self.popen.poll() is None

    def survivors(self) -> list[psutil.Process]:
        """Processes of this tree (ever seen, same create time) that are still running."""
        self.tree()
        out = []
        with self._lock:
            seen = dict(self._seen)
        for pid, created in seen.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.NoSuchProcess:
                pass
        return out

    def stop(self, grace_s: float = 15.0) -> list[int]:
        """Stop the whole tree; returns the PIDs that had to be SIGKILLed."""
        self.tree()  # remember the latest children before the root goes
        self._stop.set()
        if self.alive():
            self.popen.terminate()
            try:
                self.popen.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        rest = self.survivors()
        for p in rest:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, still = psutil.wait_procs(rest, timeout=5)
        killed = []
        for p in still:
            try:
                p.kill()
                killed.append(p.pid)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(still, timeout=5)
        if self.alive():
            self.popen.kill()
        self.popen.wait(timeout=5)
        if self._log is not subprocess.DEVNULL:
            self._log.close()
        return killed


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, *, timeout_s: float, what: str, proc: PeerProcess | None = None,
               interval_s: float = 0.25) -> None:
    """Poll ``check()`` until true; TimeoutError after ``timeout_s``, RuntimeError if ``proc`` died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited (rc {proc.popen.returncode}) before {what}")
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(interval_s)
    raise TimeoutError(f"{what} not reached within {timeout_s:.0f} s")
