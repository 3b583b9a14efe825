"""``mesh-bench``: run the standard benchmark suite and record its results in BENCHMARKS.md.

    mesh-bench [--only NAME]... [--args NAME=ARGS]... [--list] [--no-write] [--budget S]
               [--benchmarks-file PATH]

**The suite.** Every module of ``loadtest.scenarios`` (found with ``pkgutil``) that defines
``SUITE_ARGS`` (its command line in the suite) and ``SUITE_SECONDS`` (its expected wall time with
those arguments on the reference machine, 2 cores) is a member; a new scenario joins the suite by
defining the two constants, with no edit here. Members run one after the other, never together
(they measure, and would share the cores), in the order of ``ORDER`` and then, for members not named
there, alphabetically. A module that fails to import (one being written, say) does not stop the
others: it is a failed member if ``ORDER`` names it, else it is only listed as not in the suite.
``--only NAME`` (repeatable) runs a subset, still in suite order; ``--args NAME=ARGS`` (repeatable,
shell-split) replaces a member's ``SUITE_ARGS`` for this run (ad-hoc runs, tests); ``--list``
prints the members, their commands and expected seconds.

**Budget.** The whole suite must fit in 10 minutes on the reference machine: before anything runs,
the sum of ``SUITE_SECONDS`` is checked against ``--budget`` (600 s) and an over-budget suite is
refused (exit 2) unless ``--only`` was given. The sizes chosen (estimates on 2 shared cores, from tiny
runs and earlier full runs, each explained next to its constants):

=============  =====  ==============================================================================
scenario        s     arguments, and where the estimate comes from
=============  =====  ==============================================================================
hop             35    ``--duration 3 --rounds 2 --warmup 0.25 --profile-seconds 0``: ~7 s start-up
                      (a 1 s run took 14.8 s) + 7 measured segments of 3.5 s
coldstart       20    defaults (bursts of 100, as the target is defined): 14 s in BENCHMARKS.md
router_memory   40    ``--models 20000``: ~15 s fixed (a 2,000-model run took 17 s) + ~17 s of
                      registrations at ~1,200/s
many_models    105    its helper's estimate
scale          120    its helper's estimate (budgeted before it existed)
failover        80    its helper's estimate
placement       60    ``--requests 50000``, every section: 47 s measured with 0.85 cores of other load;
                      ``--quick`` (200,000 requests) would take ~170 s here
peers           75    ``--duration 5 --warmup 1``: 3 systems x 2 phases x 6 s + ~30 s of start-ups
=============  =====  ==============================================================================

That is about 535 s. ``router_memory`` stays in the suite, smaller, rather than being left to the
``scale`` scenario: ``scale`` records the router's RSS after 100,000 registrations, but with loaded
models in its baseline and no verdict, while ``router_memory`` judges the target of issue 2 (growth
over a warmed-up empty router <= 50 MB); that growth does not depend on the count (9.2 MB at
10,000, 11-14 MB at 100,000), and 40 s fits.

**Running.** Each member runs as ``python -m loadtest.scenarios.NAME *ARGS --out FILE`` in its own
session, from the repository root, with its output streamed to stderr line by line, prefixed
``[NAME]``. It is given 3 x ``SUITE_SECONDS`` (at least 120 s); past that it is sent SIGTERM (a
scenario turns it into ``SystemExit`` and stops its servers in ``finally`` blocks), and after a grace
period its process group gets SIGKILL. A member *fails* on a non-zero exit, a timeout, or a missing or
invalid ``--out`` file (JSON with a non-empty ``markdown`` string and a ``result``); the suite goes on
with the next one, the tail of the failed member's output is repeated at the end, and mesh-bench
exits 1. Errors of mesh-bench itself (bad options, an over-budget suite, malformed markers) are one
line on stderr and exit 2.

**Recording.** Each member's block in BENCHMARKS.md lies between ``<!-- mesh-bench:begin NAME -->``
and ``<!-- mesh-bench:end NAME -->`` and holds the exact command in a fence, the wall time, and the
scenario's own Markdown (which starts with the machine line: CPU, cores, RAM, Python, grpcio,
commit, date, command, CPU used by other processes). A failed member's block is left as it was. The
``summary`` block holds the date, the commit and whether the tree had uncommitted changes (``git
status --porcelain``: a warning, not a refusal), the machine (``loadtest.report.machine`` plus the OS
and kernel), the mesh-bench command line, the total wall time and a table of every member: status,
seconds, command. A block whose markers are missing is added at the end of the section ``## Standard
suite (mesh-bench)``, which is created before ``## Notes for whoever changes the router`` (or at the
end) when absent. Text outside the markers is kept byte for byte, so the blocks can be moved and
annotated by hand; the file is re-read after the run (edits made meanwhile survive) and replaced
atomically. ``--no-write`` prints the blocks instead. Marker problems are found before the suite
runs, not after ten minutes.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import importlib
import json
import os
import pkgutil
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NoReturn

from loadtest.benchfile import BenchError, apply_blocks, find_blocks, one_line, read_text, write_atomic
from loadtest.report import REPO, ForeignLoad, git_commit, machine, table

PACKAGE = "loadtest.scenarios"
# The suite's order: fast server scenarios first, so that a broken build shows early; the longest
# and most machine-hungry (placement's worker processes, the peers' three systems) last.
ORDER = ("hop", "coldstart", "router_memory", "many_models", "scale", "failover", "placement", "peers")
DEFAULT_BUDGET_S = 600.0
TIMEOUT_FACTOR = 3.0
MIN_TIMEOUT_S = 120.0
TERM_GRACE_S = 20.0  # after SIGTERM: enough for a scenario to stop its etcd, runtimes and router
TAIL_LINES = 40
@dataclass(frozen=True)
class Scenario:
    name: str
    args: tuple[str, ...]
    seconds: float
    error: str = ""  # why it cannot run (import failed, bad constants); reported as a failure

    @property
    def command(self) -> str:
        return shlex.join(["python", "-m", f"{PACKAGE}.{self.name}", *self.args])

    @property
    def timeout_s(self) -> float:
        return max(MIN_TIMEOUT_S, TIMEOUT_FACTOR * self.seconds)


@dataclass
class Outcome:
    scenario: Scenario
    ok: bool
    seconds: float
    reason: str = ""  # why it failed, short
    markdown: str = ""
    tail: list[str] = field(default_factory=list)


# -- discovery -----------------------------------------------------------------------------------

def discover() -> tuple[list[Scenario], list[str]]:
    """The suite's members in suite order, and the scenario modules that are not members."""
    package = importlib.import_module(PACKAGE)
    members: list[Scenario] = []
    others: list[str] = []
    for info in pkgutil.iter_modules(package.__path__):
        if info.ispkg or info.name.startswith("_"):
            continue
        try:
            module = importlib.import_module(f"{PACKAGE}.{info.name}")
        except (Exception, SystemExit) as err:  # a scenario being written must not stop the others
            if info.name in ORDER:
                members.append(Scenario(info.name, (), 0.0, f"import failed: {one_line(err)}"))
            else:
                others.append(f"{info.name} (import failed: {one_line(err)})")
            continue
        if hasattr(module, "SUITE_ARGS") and hasattr(module, "SUITE_SECONDS"):
            members.append(_member(info.name, module.SUITE_ARGS, module.SUITE_SECONDS))
        else:
            others.append(info.name)
    members.sort(key=lambda s: (0, ORDER.index(s.name), "") if s.name in ORDER else (1, 0, s.name))
    return members, sorted(others)


def _member(name: str, args: Any, seconds: Any) -> Scenario:
    if not (isinstance(args, list | tuple) and all(isinstance(a, str) for a in args)):
        return Scenario(name, (), 0.0, "SUITE_ARGS is not a sequence of strings")
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds <= 0:
        return Scenario(name, tuple(args), 0.0, "SUITE_SECONDS is not a positive number")
    return Scenario(name, tuple(args), float(seconds))


def select(members: Sequence[Scenario], only: Sequence[str], overrides: Sequence[str]) -> list[Scenario]:
    """The members to run (``--only``, kept in suite order) with ``--args`` applied."""
    known = {s.name: s for s in members}
    for name in only:
        if name not in known:
            raise BenchError(f"unknown scenario {name!r} for --only; the suite has: {', '.join(known)}")
    args: dict[str, tuple[str, ...]] = {}
    for item in overrides:
        name, sep, value = item.partition("=")
        if not sep or name not in known:
            raise BenchError(f"--args wants NAME=ARGS with NAME one of {', '.join(known)}; got {item!r}")
        try:
            args[name] = tuple(shlex.split(value))
        except ValueError as err:
            raise BenchError(f"--args {item!r}: {err}") from None
    chosen = [s for s in members if not only or s.name in only]
    return [Scenario(s.name, args.get(s.name, s.args), s.seconds, s.error) for s in chosen]


def check_budget(members: Sequence[Scenario], budget_s: float) -> None:
    total = sum(s.seconds for s in members)
    if total > budget_s:
        parts = ", ".join(f"{s.name} {s.seconds:g}" for s in members)
        raise BenchError(f"the suite is expected to take {total:g} s, over the budget of {budget_s:g} s "
                         f"({parts}); shrink a SUITE_ARGS, or pass --budget or --only")


def render_list(members: Sequence[Scenario], others: Sequence[str], budget_s: float) -> str:
    rows = [[s.name, f"{s.seconds:g}" if not s.error else "-", f"{s.timeout_s:g}" if not s.error else "-",
             s.error or s.command] for s in members]
    total = sum(s.seconds for s in members)
    lines = [table(["scenario", "seconds", "timeout s", "command"], rows), "",
             f"expected in all: {total:g} s; budget {budget_s:g} s ({'fits' if total <= budget_s else 'OVER'})"]
    if others:
        lines.append(f"not in the suite (no SUITE_ARGS/SUITE_SECONDS): {', '.join(others)}")
    return "\n".join(lines)


# -- running -------------------------------------------------------------------------------------

def run_scenario(scenario: Scenario, workdir: Path) -> Outcome:
    """Run one member as a subprocess, streaming its output; never raises for the member's faults."""
    if scenario.error:
        return Outcome(scenario, False, 0.0, scenario.error)
    out = workdir / f"{scenario.name}.json"
    cmd = [sys.executable, "-m", f"{PACKAGE}.{scenario.name}", *scenario.args, "--out", str(out)]
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    started = time.monotonic()
    # Its own session: Ctrl-C at the terminal reaches us, not it, and a timeout can end its whole group.
    proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    pump = threading.Thread(target=_pump, args=(proc.stdout, scenario.name, tail), daemon=True,
                            name=f"mesh-bench-{scenario.name}")
    pump.start()
    timed_out = False
    try:
        try:
            rc = proc.wait(timeout=scenario.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            rc = _stop(proc)
    except BaseException:  # KeyboardInterrupt: stop what we started, then let it propagate
        _stop(proc)
        raise
    finally:
        pump.join(timeout=5.0)  # a server that inherited the pipe must not hold us up
    seconds = time.monotonic() - started
    if timed_out:
        return Outcome(scenario, False, seconds, f"timed out after {scenario.timeout_s:g} s", tail=list(tail))
    if rc != 0:
        return Outcome(scenario, False, seconds, f"exit status {rc}", tail=list(tail))
    try:
        markdown = read_out(out)
    except BenchError as err:
        return Outcome(scenario, False, seconds, str(err), tail=list(tail))
    return Outcome(scenario, True, seconds, markdown=markdown, tail=list(tail))


def _pump(stream: IO[str], name: str, tail: collections.deque[str]) -> None:
    for line in stream:
        line = line.rstrip("\n")
        tail.append(line)
        print(f"[{name}] {line}", file=sys.stderr, flush=True)


def _stop(proc: subprocess.Popen[str]) -> int:
    """SIGTERM (the scenario stops its servers), then SIGKILL to its process group after a grace period."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=TERM_GRACE_S)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the group we created for it: only what it started
            except ProcessLookupError:
                pass
    return proc.wait()


def read_out(path: Path) -> str:
    """The Markdown of a scenario's ``--out`` file; BenchError if it is missing or not as agreed."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BenchError("it wrote no --out file") from None
    except (OSError, ValueError) as err:
        raise BenchError(f"its --out file is not JSON: {one_line(err)}") from None
    if not (isinstance(data, dict) and isinstance(data.get("markdown"), str) and data["markdown"].strip()
            and "result" in data):
        raise BenchError("its --out file lacks a non-empty 'markdown' string or a 'result'")
    return str(data["markdown"])


# -- facts ---------------------------------------------------------------------------------------

def uncommitted_paths() -> int | None:
    """How many paths ``git status --porcelain`` lists (None: not a git checkout, or git failed)."""
    try:  # --no-optional-locks: a status must not take the index lock from someone committing
        out = subprocess.run(["git", "--no-optional-locks", "status", "--porcelain"], cwd=REPO,
                             capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return sum(1 for line in out.stdout.splitlines() if line.strip())


def os_line() -> str:
    name = ""
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                name = line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    kernel = f"{platform.system()} {platform.release()} {platform.machine()}"
    return f"{kernel} ({name})" if name else kernel


@dataclass
class Run:
    """What the summary says about the run as a whole."""

    date: str
    commit: str
    dirty: int | None
    facts: dict[str, Any]
    command: str
    seconds: float
    budget_s: float
    foreign: dict[str, float]


def summary_block(run: Run, members: Sequence[Scenario], outcomes: Sequence[Outcome]) -> str:
    done = {o.scenario.name: o for o in outcomes}
    rows = []
    for s in members:
        o = done.get(s.name)
        if o is None:
            rows.append([s.name, "not run", "-", _cell(s.command)])
        else:
            status = "ok" if o.ok else f"FAILED: {o.reason}"
            rows.append([s.name, _cell(status), f"{o.seconds:.1f}", _cell(o.scenario.command)])
    tree = {None: "tree state unknown", 0: "clean tree"}.get(run.dirty, f"uncommitted changes in {run.dirty} paths")
    f = run.facts
    expected = sum(o.scenario.seconds for o in outcomes)
    return "\n".join([
        f"{run.date}; commit {run.commit} ({tree}); {len(outcomes)} of {len(members)} scenarios, "
        f"{run.seconds:.1f} s in all (expected {expected:g} s, budget {run.budget_s:g} s)",
        "",
        f"machine: {f['cpu']}, {f['cores']} cores, {f['ram_gib']} GiB RAM, {os_line()}, Python {f['python']}, "
        f"grpcio {f['grpcio']}; other processes used {run.foreign['other_processes_cores']} cores on average "
        f"during the run (steal {run.foreign['steal_cores']})",
        "",
        "```",
        run.command,
        "```",
        "",
        table(["scenario", "status", "seconds", "command"], rows),
    ])


def scenario_block(outcome: Outcome, date: str) -> str:
    markdown = outcome.markdown.strip("\n").replace("<!-- mesh-bench:", "<!-- mesh-bench :")
    return "\n".join(["```", outcome.scenario.command, "```", "",
                      f"wall time {outcome.seconds:.1f} s (mesh-bench, {date})", "", markdown])


def _cell(text: str) -> str:
    return f"`{text}`".replace("|", "\\|") if text.startswith("python ") else text.replace("|", "\\|")


# -- command line --------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not argparse's usage block
        self.exit(2, f"mesh-bench: error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mesh-bench", description="Run the standard benchmark suite and record it in "
                     "BENCHMARKS.md (see the docstring of loadtest/bench.py).")
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help="run only this scenario (repeatable; skips the budget check)")
    parser.add_argument("--args", action="append", default=[], metavar="NAME=ARGS",
                        help="replace a scenario's SUITE_ARGS for this run (repeatable; shell-split)")
    parser.add_argument("--list", action="store_true", help="list the suite: names, commands, expected seconds")
    parser.add_argument("--benchmarks-file", type=Path, default=REPO / "BENCHMARKS.md", metavar="PATH",
                        help="the file whose mesh-bench blocks are rewritten (default: BENCHMARKS.md)")
    parser.add_argument("--no-write", action="store_true", help="print the blocks instead of writing them")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, metavar="S",
                        help=f"seconds the whole suite may be expected to take (default {DEFAULT_BUDGET_S:g})")
    return parser


def log(message: str) -> None:
    print(f"mesh-bench: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    shown = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    try:
        return _main(args, "mesh-bench " + shlex.join(shown) if shown else "mesh-bench")
    except BenchError as err:
        print(f"mesh-bench: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mesh-bench: interrupted; nothing written", file=sys.stderr)
        return 130


def _main(args: argparse.Namespace, command: str) -> int:
    if args.budget <= 0:
        raise BenchError("--budget must be positive")
    members, others = discover()
    selected = select(members, args.only, args.args)
    if args.list:
        print(render_list(selected, others, args.budget))
        return 0
    if not args.only:
        check_budget(selected, args.budget)
    path: Path = args.benchmarks_file
    if not args.no_write:
        find_blocks(read_text(path))  # malformed markers: say so now, not after the run
    dirty = uncommitted_paths()
    if dirty:
        log(f"warning: the working tree has uncommitted changes ({dirty} paths); the results will say so")

    foreign = ForeignLoad()
    started = time.monotonic()
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="mesh-bench-") as tmp:
        for i, s in enumerate(selected, 1):
            log(f"[{i}/{len(selected)}] {s.command} (expected {s.seconds:g} s, timeout {s.timeout_s:g} s)")
            outcome = run_scenario(s, Path(tmp))
            outcomes.append(outcome)
            log(f"{s.name}: {'ok' if outcome.ok else 'FAILED: ' + outcome.reason} ({outcome.seconds:.1f} s)")
    facts = machine()
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    run = Run(date=date, commit=git_commit(), dirty=dirty, facts=facts, command=command,
              seconds=time.monotonic() - started, budget_s=args.budget, foreign=foreign.result())
    blocks = {"summary": summary_block(run, members, outcomes)}
    blocks.update({o.scenario.name: scenario_block(o, date) for o in outcomes if o.ok})

    failed = [o for o in outcomes if not o.ok]
    for o in failed:
        log(f"{o.scenario.name} FAILED ({o.reason}); its block is left as it was. Last lines of its output:")
        for line in o.tail or ["(no output)"]:
            print(f"    {line}", file=sys.stderr)
    if args.no_write:
        for name, body in blocks.items():
            print(f"<!-- mesh-bench:begin {name} -->\n{body}\n<!-- mesh-bench:end {name} -->\n")
    else:
        print(blocks["summary"])
        try:
            write_atomic(path, apply_blocks(read_text(path), blocks))
        except OSError as err:
            raise BenchError(f"cannot write {path}: {one_line(err)}") from None
        log(f"wrote {len(blocks)} blocks to {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
