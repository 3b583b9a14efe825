"""``mesh serve router|runtime|controller``: one component in the foreground, until SIGTERM or Ctrl-C."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from mesh import gctune
from mesh.errors import InvalidArgument, MeshError
from mesh.logging import configure
from mesh.malloc import limit_arenas
from mesh.settings import Settings
from mesh.tasks import RootTasks

# serve(settings, roots, on_ready): each component's entry point (the router's takes more, with defaults).
Serve = Callable[[Settings, RootTasks, Callable[[str], None] | None], Coroutine[Any, Any, None]]


async def _watch_parent(parent: int) -> None:
    """Under `mesh up`: exit when the supervising process is gone (even if it was SIGKILLed)."""
    while os.getppid() == parent:  # noqa: ASYNC110 - no event exists for a parent's death
        await asyncio.sleep(1.0)
    raise RuntimeError(f"parent process {parent} is gone")


async def _main(serve: Serve, settings: Settings, ready_file: Path | None) -> int:
    roots = RootTasks()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, roots.stop)
    parent = os.environ.get("MESH_PARENT_PID")
    if parent:
        roots.spawn(_watch_parent(int(parent)), "parent-watch")

    def on_ready(endpoint: str) -> None:
        gctune.tune()  # start-up is done: freeze its objects, collect less often (mesh.gctune)
        if ready_file is not None:
            tmp = ready_file.with_suffix(".tmp")
            tmp.write_text(endpoint)
            tmp.replace(ready_file)  # atomic: the supervisor never reads half a line

    await serve(settings, roots, on_ready)
    return 1 if roots.failure is not None else 0


def run_component(component: str, settings: Settings, ready_file: Path | None = None) -> int:
    limit_arenas()  # before gRPC's and the loaders' threads exist (mesh.malloc says why)
    configure(settings.log, component=component)
    serve: Serve
    if component == "router":
        from mesh.router.app import serve_router as serve
    elif component == "runtime":
        from mesh.runtime.app import serve_runtime as serve
    elif component == "controller":
        from mesh.controller.app import serve_controller as serve
    else:
        print(f"mesh serve: unknown component {component!r} (router, runtime, controller)", file=sys.stderr)
        return 2
    import uvloop

    try:
        return uvloop.run(_main(serve, settings, ready_file))
    except MeshError as exc:
        # A start-up failure the user can act on (port taken, registry unreachable, bad setting):
        # one line, no traceback; exit code 2 for configuration errors (as the CLI's usage errors).
        print(f"mesh serve {component}: {exc.message}", file=sys.stderr)
        return 2 if isinstance(exc, InvalidArgument) else 1
