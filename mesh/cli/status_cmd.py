"""``mesh status``, ``mesh top`` and ``mesh model status``: what a router knows of the mesh.

All three read ``mmesh.ModelMeshStatus`` on the router's own port (``mesh.router.fleet`` says what
each figure is and where it comes from); nothing else is asked and no other server is needed.

``mesh status`` prints the fleet once: this router, every runtime instance with its capacity and
use per device, the copies, the counters over the last minute (the router's readings) and since
each instance started, the hottest models and the live failure records. ``--json`` prints the
router's answer as it is (protobuf's JSON mapping: camelCase names, 64-bit integers as strings).

``mesh top`` redraws a frame every ``--interval`` seconds: requests, hit rate, loads, load
failures and evictions per second, per instance and in all, and the hottest models. Rates are the
increase of the instances' counters between two readings divided by the time between them (the
first frame, and ``--once``, use the router's last-minute window instead). Instances publish their
counters at most every ``runtime.publish_interval_s`` (2 s), so an interval below that shows
bursts. On a terminal each frame replaces the previous one (ANSI clear and home, no curses);
piped, frames follow each other. Ctrl-C quits with status 0, as does a reader that closes the
pipe (``mesh top | head``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from google.protobuf.json_format import MessageToDict

from mesh.cli.client import CliError, RouterClient, mm
from mesh.cli.errors import printable
from mesh.cli.status_args import MAX_TOP
from mesh.gen.mmesh import status_pb2 as st
from mesh.gen.mmesh import status_pb2_grpc as st_grpc

MIN_INTERVAL_S = 0.2  # each frame is one call that walks the router's view: not a busy loop
CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear the screen
COUNTERS = ("requests", "hits", "misses", "loads", "loadFailures", "evictions")


def _stub(client: RouterClient) -> Any:
    return st_grpc.ModelMeshStatusStub(client.channel)  # type: ignore[no-untyped-call]  # protoc's stubs


def _check_top(n: int) -> int:
    if not 1 <= n <= MAX_TOP:
        raise CliError(f"--top must be 1 to {MAX_TOP}", exit_code=2)
    return n


def fleet_status(client: RouterClient, top: int) -> st.FleetStatus:
    request = st.FleetStatusRequest(topModels=top)
    try:
        status: st.FleetStatus = client.call(_stub(client).getFleetStatus, request)
    except CliError as exc:
        if str(exc).startswith("UNIMPLEMENTED"):
            raise CliError(f"the router at {client.address} has no fleet status (a version before it); "
                           "upgrade it, or read its Prometheus metrics") from None
        raise
    return status


# --- formatting -----------------------------------------------------------------------------------
def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    s = int(max(0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _clock(ms: int) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _ratio(hits: int, misses: int) -> str:
    return f"{hits / (hits + misses):.1%}" if hits + misses else "-"


def _counters(c: st.FleetCounters) -> dict[str, int]:
    return {name: int(getattr(c, name)) for name in COUNTERS}


def _traffic_line(label: str, c: dict[str, int], seconds: float) -> str:
    def per_s(n: int) -> str:
        return f" ({n / seconds:.2f}/s)" if seconds > 0 else ""

    return (f"{label}: {c['requests']} requests{per_s(c['requests'])}, hit ratio {_ratio(c['hits'], c['misses'])} "
            f"({c['hits']} hits, {c['misses']} misses), {c['loads']} loads{per_s(c['loads'])}, "
            f"{c['loadFailures']} load failures, {c['evictions']} evictions{per_s(c['evictions'])}")


def _failure_text(f: st.FailureInfo, now_ms: int) -> str:
    kind = " [crash: no runtime loads it]" if f.kind == "crash" else ""
    expires = (f"expires {_clock(f.expiresMs)} (in {human_duration((f.expiresMs - now_ms) / 1000)})"
               if f.expiresMs else "kept until the model is unregistered")
    return f"{f.reason}{kind} (at {_clock(f.timeMs)}; {expires})"


def _device_text(d: st.DeviceUse) -> str:
    share = f" ({d.usedBytes / d.capacityBytes:.0%})" if d.capacityBytes else ""
    return f"{d.device} {human_bytes(d.usedBytes)}/{human_bytes(d.capacityBytes)}{share}"


def status_text(s: st.FleetStatus, address: str) -> str:
    r = s.router
    ready = "ready" if r.ready else f"NOT READY: {r.notReady}"
    lines = [f"router {address}: {ready}, version {r.version}, up {human_duration((s.timeMs - r.startedMs) / 1000)}, "
             f"{r.inflight} requests in flight to runtimes"
             + ("" if r.registryConnected else ", REGISTRY UNREACHABLE (serving from its last view)")]
    states: dict[str, int] = {}
    for i in s.instances:
        states[i.state] = states.get(i.state, 0) + 1
    lines.append(f"runtimes: {len(s.instances)}" + (" (" + ", ".join(f"{n} {k}" for k, n in sorted(states.items()))
                                                     + ")" if states else ""))
    if s.instances:
        width = max(8, *(len(i.instanceId) for i in s.instances))
        ewidth = max(8, *(len(i.endpoint) for i in s.instances))
        head = (f"  {'INSTANCE':<{width}}  {'ENDPOINT':<{ewidth}}  {'STATE':<13} {'COPIES':>6} {'LOADING':>7} "
                f"{'REQ/S':>7} {'IN-FLIGHT':>9}  DEVICES (used/capacity)")
        lines.append(head)
        for i in s.instances:
            lines.append(f"  {i.instanceId:<{width}}  {i.endpoint:<{ewidth}}  {i.state:<13} {i.loadedCopies:>6} "
                         f"{i.loadingCopies:>7} {i.rateRps:>7.1f} {i.inflight:>9}  "
                         + ", ".join(_device_text(d) for d in i.devices))
    lines.append(f"models: {s.modelsLoaded} loaded in {_plural(s.copiesLoaded, 'copy', 'copies')}, "
                 f"{s.copiesLoading} loading, "
                 f"{s.modelsFailing} failing")
    if s.scoped:
        lines.append("traffic: not shown to a token limited to model-ID prefixes (the counters mix every tenant's)")
    else:
        lines.append(_traffic_line(f"last {s.windowS:.0f} s", _counters(s.window), s.windowS))
        lines.append(_traffic_line("since the runtimes started", _counters(s.total), 0))
    if s.hottest:
        lines.append("hottest models (this router's requests/s, 30 s average):")
        lines += [f"  {h.modelId}: {h.rateRps:.2f}/s, {_plural(h.copies, 'copy', 'copies')}" for h in s.hottest]
    if s.failures:
        lines.append(f"load failures ({len(s.failures)} newest):")
        lines += [f"  {f.modelId} on {f.instanceId}: {_failure_text(f, s.timeMs)}" for f in s.failures]
    return "\n".join(lines)


def status_command(args: argparse.Namespace, client: RouterClient) -> int:
    status = fleet_status(client, _check_top(args.top))
    return _write(lambda: print(json.dumps(_as_dict(status), indent=2, sort_keys=True) if args.json
                                else printable(status_text(status, client.address)), flush=True))


# 64-bit fields, which protobuf's JSON mapping writes as strings: numbers in our JSON.
_INT64_FIELDS = frozenset({"capacityBytes", "usedBytes", "startedMs", "timeMs", "expiresMs", "stateMs", "lastUsedMs",
                           "sizeBytes", "time", "lastRequestMs", *COUNTERS})


def _numbers(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: int(v) if k in _INT64_FIELDS and isinstance(v, str) and v.isdigit() else _numbers(v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    return value


def _as_dict(message: Any) -> dict[str, Any]:
    out: dict[str, Any] = _numbers(MessageToDict(message, always_print_fields_with_no_presence=True))
    return out


def _write(emit: Callable[[], None]) -> int:
    """Run ``emit``; a reader that closed the pipe (``| head``) ends the command quietly."""
    try:
        emit()
    except BrokenPipeError:
        _silence_stdout()
    return 0


def _silence_stdout() -> None:
    # Python flushes stdout again at exit and would report the broken pipe then: point it at
    # /dev/null first.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


# --- mesh top -------------------------------------------------------------------------------------
Key = tuple[str, int]  # (instance ID, started ms): a restarted instance is another one


def _increase(now: dict[Key, dict[str, int]], before: dict[Key, dict[str, int]]) -> dict[Key, dict[str, int]]:
    """Per instance, the counters' increase; new or restarted instances count from 0."""
    out = {}
    for key, counters in now.items():
        old = before.get(key, dict.fromkeys(COUNTERS, 0))
        out[key] = {n: counters[n] - old[n] if counters[n] >= old[n] else counters[n] for n in COUNTERS}
    return out


def _readings(s: st.FleetStatus) -> dict[Key, dict[str, int]]:
    return {(i.instanceId, int(i.startedMs)): _counters(i.total) for i in s.instances}


def top_frame(s: st.FleetStatus, address: str, *, seconds: float, total: dict[str, int],
              per_instance: dict[Key, dict[str, int]] | None, interval: float | None) -> str:
    """One frame; ``total`` / ``per_instance``: the counters' increase over ``seconds``, in all and
    per instance (None: not known, for the first frame; each instance's own average rate is shown)."""
    every = f"every {interval:g} s, Ctrl-C to quit" if interval else "once"
    lines = [f"mesh top: router {address}, {time.strftime('%H:%M:%S', time.localtime(s.timeMs / 1000))} ({every})"]
    ready = sum(1 for i in s.instances if i.state == "ready")
    lines.append(f"runtimes {ready} ready of {len(s.instances)}; models {s.modelsLoaded} loaded in "
                 f"{_plural(s.copiesLoaded, 'copy', 'copies')}, {s.copiesLoading} loading, {s.modelsFailing} failing")
    if s.scoped:
        lines.append("traffic: not shown to a token limited to model-ID prefixes")
    else:
        def rate(n: int) -> float:
            return n / seconds if seconds > 0 else 0.0

        lines.append(f"last {seconds:.1f} s: {total['requests']} requests, {rate(total['requests']):.2f} req/s, "
                     f"hit rate {_ratio(total['hits'], total['misses'])} ({total['hits']} hits, {total['misses']} "
                     f"misses), loads {rate(total['loads']):.2f}/s ({total['loads']}), evictions "
                     f"{rate(total['evictions']):.2f}/s ({total['evictions']}), load failures {total['loadFailures']}")
        width = max(8, *(len(i.instanceId) for i in s.instances)) if s.instances else 8
        lines.append("")
        lines.append(f"{'INSTANCE':<{width}}  {'STATE':<13} {'REQ/S':>8} {'HIT%':>6} {'LOADS/S':>8} {'EVICT/S':>8} "
                     f"{'COPIES':>6} {'IN-FLIGHT':>9}  MEMORY")
        for i in s.instances:
            c = None if per_instance is None else per_instance.get((i.instanceId, int(i.startedMs)))
            figures = (f"{i.rateRps:>8.2f} {'-':>6} {'-':>8} {'-':>8}" if c is None else
                       f"{rate(c['requests']):>8.2f} {_ratio(c['hits'], c['misses']):>6} {rate(c['loads']):>8.2f} "
                       f"{rate(c['evictions']):>8.2f}")
            lines.append(f"{i.instanceId:<{width}}  {i.state:<13} {figures} {i.loadedCopies:>6} {i.inflight:>9}  "
                         + ", ".join(_device_text(d) for d in i.devices))
    lines.append("")
    if s.hottest:
        width = max(14, *(len(h.modelId) for h in s.hottest))
        lines.append(f"{'HOTTEST MODELS':<{width}}  {'REQ/S':>8} {'COPIES':>6} {'IN-FLIGHT':>9}   "
                     "(this router's requests, 30 s average)")
        lines += [f"{h.modelId:<{width}}  {h.rateRps:>8.2f} {h.copies:>6} {h.inflight:>9}" for h in s.hottest]
    else:
        lines.append("no model has had requests through this router lately")
    return "\n".join(lines)


def top_command(args: argparse.Namespace, client: RouterClient) -> int:
    top = _check_top(args.top)
    if args.json:
        raise CliError("mesh top draws text; for JSON use mesh status --json", exit_code=2)
    if not MIN_INTERVAL_S <= args.interval <= 3600:
        raise CliError(f"--interval must be {MIN_INTERVAL_S:g} to 3600 seconds", exit_code=2)
    tty = sys.stdout.isatty()
    status = fleet_status(client, top)
    # The first frame: the router's last-minute window (in all only: per instance, each one's own
    # average rate); afterwards, the increase between two of our own readings.
    try:
        frame = printable(top_frame(status, client.address, seconds=status.windowS, total=_counters(status.window),
                                    per_instance=None, interval=None if args.once else args.interval))
        if args.once:
            return _write(lambda: print(frame, flush=True))
        _draw(frame, tty)
        before, at = _readings(status), time.monotonic()
        while True:
            time.sleep(args.interval)
            status = fleet_status(client, top)
            now = time.monotonic()
            readings = _readings(status)
            per_instance = _increase(readings, before)
            total = {n: sum(c[n] for c in per_instance.values()) for n in COUNTERS}
            frame = printable(top_frame(status, client.address, seconds=now - at, total=total,
                                        per_instance=per_instance, interval=args.interval))
            before, at = readings, now
            _draw(frame, tty)
    except KeyboardInterrupt:
        print(flush=True)
        return 0
    except BrokenPipeError:
        _silence_stdout()
        return 0


def _draw(frame: str, tty: bool) -> None:
    sys.stdout.write((CLEAR + frame + "\n") if tty else (frame + "\n\n"))
    sys.stdout.flush()


# --- mesh model status ----------------------------------------------------------------------------
def model_status_command(args: argparse.Namespace, client: RouterClient) -> int:
    """getModelStatus, and where there is something to show, getModelCopies's details."""
    info = client.call(client.mesh.getModelStatus, mm.GetStatusRequest(modelId=args.model_id))
    copies: st.ModelCopies | None = None
    found = info.status != mm.ModelStatusInfo.NOT_FOUND
    if found:
        try:
            copies = client.call(_stub(client).getModelCopies, st.ModelCopiesRequest(modelId=args.model_id))
        except CliError as exc:
            if not str(exc).startswith("UNIMPLEMENTED"):  # an older router: its status alone
                raise
    if args.json:
        data = _as_dict(info)
        if copies is not None:
            details = _as_dict(copies)
            data["copies"], data["failures"] = details["copies"], details["failures"]
        text = json.dumps(data, indent=2, sort_keys=True)
    else:
        text = printable(model_status_text(info, copies, args.model_id))
    _write(lambda: print(text, flush=True))
    return 0 if found else 1


def model_status_text(info: mm.ModelStatusInfo, copies: st.ModelCopies | None, model_id: str) -> str:
    name = mm.ModelStatusInfo.ModelStatus.Name
    lines = [f"{model_id}: {name(info.status)}"]
    if copies is None:  # what getModelStatus alone says
        for c in info.modelCopyInfos:
            size = f", {human_bytes(c.sizeBytes)}" if c.sizeBytes else ""
            size += f" in {c.device}" if c.device else ""
            lines.append(f"  copy on {c.location}: {name(c.copyStatus)}{size}")
        lines += [f"  error: {e}" for e in info.errors]
        return "\n".join(lines)
    now_ms = int(copies.timeMs)
    for c in copies.copies:
        where = f" ({c.endpoint})" if c.endpoint else " (instance gone)"
        size = f", {human_bytes(c.sizeBytes)} in {c.device}" if c.sizeBytes else f", in {c.device}"
        loaded = f", loaded in {c.loadMs:.0f} ms" if c.state == "loaded" and c.loadMs else ""
        lines.append(f"  copy on {c.instanceId}{where}: {c.state.upper()}{size}, since {_clock(c.stateMs)}{loaded}")
    if copies.lastRequestMs:
        # Runtimes publish no per-request use (that would be a registry write per request); the
        # routers see the requests they forward.
        lines.append(f"  last request through this router: {_clock(copies.lastRequestMs)} "
                     f"({human_duration((now_ms - copies.lastRequestMs) / 1000)} ago)")
    for f in copies.failures:
        lines.append(f"  failed on {f.instanceId}: {_failure_text(f, now_ms)}")
    if copies.failures and any(f.kind != "crash" for f in copies.failures):
        lines.append("  (routers do not retry an instance while its failure record lives)")
    return "\n".join(lines)
