"""What every benchmark prints besides its numbers: the machine, the commit, the command, the date,
and tables in Markdown (so that the output can be pasted into BENCHMARKS.md as it is)."""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=5, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> dict[str, Any]:
    import grpc

    return {"cpu": cpu_model(), "cores": psutil.cpu_count(logical=True),
            "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "grpcio": grpc.__version__,
            "commit": git_commit(),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "command": " ".join(["python", "-m", *_module_argv()])}


def _module_argv() -> list[str]:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    name = spec.name if spec is not None else sys.argv[0]
    args, shown = sys.argv[1:], []
    while args:  # ``--out FILE`` is where mesh-bench collects the result, not part of the run
        arg = args.pop(0)
        if arg == "--out":
            args = args[1:]
        elif not arg.startswith("--out="):
            shown.append(arg)
    return [name, *shown]


class ForeignLoad:
    """CPU used on this machine by processes other than ours while a benchmark ran.

    On a shared machine another job's CPU use is the largest source of error; we cannot stop it,
    but we can say how much there was: machine-wide busy CPU time minus our own process tree's,
    and the hypervisor's steal time. Create it before starting any server and read ``result()``
    after every server has been stopped and reaped: a reaped child's CPU time is then in our
    ``children_user``/``children_system``, so our tree's time is exact.
    """

    def __init__(self) -> None:
        self._start = time.monotonic()
        self._busy, self._steal = self._machine()
        self._ours = self._our_tree()

    @staticmethod
    def _machine() -> tuple[float, float]:
        t = psutil.cpu_times()
        busy = t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
        return busy, getattr(t, "steal", 0.0)

    @staticmethod
    def _our_tree() -> float:
        t = psutil.Process().cpu_times()
        return t.user + t.system + t.children_user + t.children_system

    def result(self) -> dict[str, float]:
        elapsed = max(time.monotonic() - self._start, 1e-6)
        busy, steal = self._machine()
        foreign = (busy - self._busy) - (self._our_tree() - self._ours)
        return {"seconds": round(elapsed, 1), "other_processes_cores": round(max(foreign, 0.0) / elapsed, 2),
                "steal_cores": round((steal - self._steal) / elapsed, 2)}


def machine_line(facts: dict[str, Any]) -> str:
    line = (f"{facts['cpu']}, {facts['cores']} cores, {facts['ram_gib']} GiB RAM, Python {facts['python']}, "
            f"grpcio {facts['grpcio']}; commit {facts['commit']}; {facts['date']}\n"
            f"command: {facts['command']}")
    foreign = facts.get("foreign_load")
    if foreign:
        line += (f"\nother processes on the machine used {foreign['other_processes_cores']} cores on average "
                 f"during the {foreign['seconds']} s run (steal {foreign['steal_cores']})")
    return line


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "n/a"
        return f"{value:.3f}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def error_line(exc: BaseException) -> str:
    """A scenario's own failure (not the system's it measures) as one line, no traceback: the
    first line of the message and, for a server that failed to start, the last one (its reason)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()] or [type(exc).__name__]
    return f"error: {lines[0]}" + (f" {lines[-1]}" if len(lines) > 1 else "")


def add_output_args(parser: argparse.ArgumentParser) -> None:
    """``--json`` (print the raw results after the tables) and ``--out FILE`` (what ``mesh-bench``
    reads: one JSON object with the Markdown and the raw results)."""
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    parser.add_argument("--out", type=Path, metavar="FILE",
                        help="write {markdown, result} as JSON to FILE (used by mesh-bench)")


def emit(args: argparse.Namespace, result: dict[str, Any], markdown: str) -> None:
    """Print a benchmark's tables (and its JSON with ``--json``); write ``--out`` if asked."""
    print(markdown)
    if getattr(args, "json", False):
        print(dump_json(result))
    out: Path | None = getattr(args, "out", None)
    if out is not None:
        out.write_text(dump_json({"markdown": markdown, "result": result}) + "\n")


def dump_json(data: dict[str, Any]) -> str:
    """Indented JSON; NaN (a figure that does not apply) becomes null, so that strict parsers read it."""
    return json.dumps(_nan_to_none(data), indent=2, default=str, allow_nan=False)


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_nan_to_none(v) for v in value]
    return value
