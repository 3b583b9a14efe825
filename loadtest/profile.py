"""Where a server process spends its time: py-spy sampling of a running PID, summarised.

``py-spy record --pid P --format raw`` writes one line per distinct stack, ``frame;frame;... N``
(outermost first). The summary counts, per function (line numbers dropped), the samples where it is
the innermost frame ("self") and the samples where it is anywhere on the stack ("total"). Idle
samples (a thread blocked in epoll) are excluded by py-spy unless ``--idle`` is given, so the
percentages are of the time the process was busy.

With ``native=True`` py-spy also unwinds C and Cython frames (grpc's ``cygrpc``, uvloop), which is
where a byte-forwarding proxy spends most of its time; that mode pauses the process at each sample
(py-spy cannot unwind native stacks without stopping the thread), so it runs in a phase of its own,
never during a measured one.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

_LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")
_LINENO = re.compile(r":\d+\)$")


@dataclass
class Profile:
    samples: int
    self_counts: Counter[str]
    total_counts: Counter[str]

    def top(self, n: int = 15, *, by: str = "self") -> list[tuple[str, int, float]]:
        counts = self.self_counts if by == "self" else self.total_counts
        return [(frame, c, 100.0 * c / max(self.samples, 1)) for frame, c in counts.most_common(n)]


def available() -> bool:
    return shutil.which("py-spy") is not None


def start_record(pid: int, output: Path, *, duration_s: float, rate: int = 250,
                 native: bool = False) -> subprocess.Popen[bytes]:
    """Start ``py-spy record`` on ``pid`` in the background; wait on the returned process."""
    argv = ["py-spy", "record", "--pid", str(pid), "--format", "raw", "--output", str(output),
            "--duration", str(max(1, round(duration_s))), "--rate", str(rate)]
    argv += ["--native"] if native else ["--nonblocking"]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _frame_name(frame: str) -> str:
    return _LINENO.sub(")", frame.strip())


def parse_raw(text: str) -> Profile:
    self_counts: Counter[str] = Counter()
    total_counts: Counter[str] = Counter()
    samples = 0
    for line in text.splitlines():
        m = _LINE.match(line.strip())
        if not m:
            continue
        count = int(m["count"])
        frames = [_frame_name(f) for f in m["stack"].split(";") if f.strip()]
        if not frames:
            continue
        samples += count
        self_counts[frames[-1]] += count
        for frame in set(frames):
            total_counts[frame] += count
    return Profile(samples, self_counts, total_counts)


def format_top(profile: Profile, n: int = 15) -> str:
    lines = [f"{profile.samples} busy samples"]
    for by in ("self", "total"):
        lines.append(f"top {n} by {by} time:")
        for frame, count, pct in profile.top(n, by=by):
            lines.append(f"  {pct:5.1f}%  {count:6d}  {frame}")
    return "\n".join(lines)
