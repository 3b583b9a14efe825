"""What the benchmark's own little servers (echo, naive proxy) share: the ready file and the wait
for a stop (SIGTERM/SIGINT, or the benchmark process that started them going away)."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path


def write_ready(ready_file: Path | None, endpoint: str) -> None:
    if ready_file is not None:
        tmp = ready_file.with_suffix(".tmp")
        tmp.write_text(endpoint)
        tmp.replace(ready_file)  # atomic: the benchmark never reads half a line


async def wait_for_stop() -> None:
    """Until SIGTERM/SIGINT, or until ``MESH_PARENT_PID`` (when set) is no longer our parent."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    parent = int(os.environ.get("MESH_PARENT_PID", "0") or 0)
    while not stop.is_set():
        if parent and os.getppid() != parent:
            return
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except TimeoutError:
            pass
