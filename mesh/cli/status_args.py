"""The command-line arguments of ``mesh status``, ``mesh top`` and ``mesh model metadata``, and
which function runs each (``mesh.cli.status_cmd``, ``mesh.cli.metadata_cmd``; ``mesh model
status`` runs there too). Kept apart from those modules, which import gRPC: building the parser
must stay cheap for ``mesh up``, whose process stays resident as the mesh's supervisor."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

MAX_TOP = 100


def add_status_parsers(sub: Any, model_sub: Any, client_options: Callable[[argparse.ArgumentParser], None]) -> None:
    """``mesh status``, ``mesh top``, ``mesh model metadata`` (``mesh model status`` exists already)."""
    p = sub.add_parser("status", help="the mesh at a glance: runtimes, capacity and use, copies, hit ratio, "
                       "loads and failures")
    p.add_argument("--top", type=int, default=5, metavar="N",
                   help=f"hottest models to list (default 5, at most {MAX_TOP})")
    client_options(p)
    p = sub.add_parser("top", help="a live view of the mesh, refreshed in the terminal (Ctrl-C to quit)")
    p.add_argument("--interval", type=float, default=2.0, metavar="SECONDS",
                   help="seconds between frames (default 2; runtimes publish their counters every 2 s)")
    p.add_argument("--once", action="store_true", help="print one frame (rates over the last minute) and exit")
    p.add_argument("--top", type=int, default=10, metavar="N",
                   help=f"hottest models to list (default 10, at most {MAX_TOP})")
    client_options(p)
    p = model_sub.add_parser("metadata", help="a model's inputs and outputs: names, datatypes, shapes")
    p.add_argument("model_id")
    p.add_argument("--vmodel", action="store_true", help="MODEL_ID is a vModel ID")
    client_options(p)


def status_handler(args: argparse.Namespace) -> Callable[[argparse.Namespace, Any], int] | None:
    """The function running ``args``'s command if it is one of these, else None."""
    command, action = args.command, getattr(args, "action", None)
    if command == "status":
        from mesh.cli.status_cmd import status_command

        return status_command
    if command == "top":
        from mesh.cli.status_cmd import top_command

        return top_command
    if command == "model" and action == "status":
        from mesh.cli.status_cmd import model_status_command

        return model_status_command
    if command == "model" and action == "metadata":
        from mesh.cli.metadata_cmd import metadata_command

        return metadata_command
    return None
