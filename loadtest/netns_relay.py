"""A delay line for hosts' links where the kernel has no ``netem`` (``loadtest.netns`` starts it).

``python -m loadtest.netns_relay INNER:OUTER:DELAY_MS ...``

Each argument is one host's link: two TAP devices this process creates and holds (they vanish
when it exits). ``INNER`` is moved into the host's namespace by the parent and becomes its network
interface; ``OUTER`` stays in the root namespace, attached to the bridge. Every frame the host
sends (read from INNER) is written to OUTER ``DELAY_MS`` after it was read, in order, as ``tc
qdisc ... netem delay`` would hold it on the host's egress; frames towards the host (read from
OUTER) are written to INNER at once. So the one-way delay from one host to another is the sender's
delay, and a round trip between two hosts is the sum of both.

TAP devices rather than veth pairs because a TAP's reader gets whole, checksummed frames no larger
than the MTU (the kernel segments and checksums before handing them to a TAP without a vnet
header), while a veth would hand it offloaded super-frames with partial checksums.

Control: one line per command on stdin, ``delay INDEX MS`` (INDEX is the argument's position),
answered ``ok`` on stdout. ``ready`` is printed once every TAP exists. End of stdin (the parent
closed it or died) ends the process; so does SIGTERM.

Timing: ``select`` (a timeout in microseconds; epoll's is in milliseconds) with the timer slack
set to 1 ns, at real-time priority (``_wake_on_time``). A frame waits its delay plus this loop's
wake-up latency (tens of microseconds); the benchmark measures the round trip it gets.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import ctypes.util
import fcntl
import os
import selectors
import struct
import sys
import time
from dataclasses import dataclass, field

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
PR_SET_TIMERSLACK = 29
RT_PRIORITY = 10  # SCHED_FIFO, below the kernel's own threads (50)
MAX_FRAME = 65536


def open_tap(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    return fd


def _write(fd: int, frame: bytes) -> None:
    try:
        os.write(fd, frame)
    except OSError:
        pass  # the interface is not up yet, or is going away: a down link drops the frame


@dataclass
class Link:
    inner: int
    outer: int
    delay_s: float
    held: collections.deque[tuple[float, bytes]] = field(default_factory=collections.deque)

    def egress(self, frame: bytes, now: float) -> None:
        if self.delay_s <= 0 and not self.held:
            _write(self.outer, frame)
        else:
            self.held.append((now + self.delay_s, frame))

    def release(self, now: float) -> None:
        while self.held and self.held[0][0] <= now:
            _write(self.outer, self.held.popleft()[1])


def _drain(fd: int) -> list[bytes]:
    frames: list[bytes] = []
    while True:
        try:
            frame = os.read(fd, MAX_FRAME)
        except BlockingIOError:
            return frames
        if not frame:  # end of file (stdin only: a TAP never reads empty)
            return [*frames, b""]
        frames.append(frame)


def _wake_on_time() -> None:
    """A wire's delay does not grow when the hosts' CPUs are busy, so the relay runs ahead of them:
    real-time priority (it sleeps between frames, so it takes a core only for the frames it
    moves), else the highest nice; and 1 ns of timer slack, so that a wake-up is not deferred."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(RT_PRIORITY))
    except OSError:
        with contextlib.suppress(OSError):
            os.nice(-20)


def main(argv: list[str]) -> int:
    _wake_on_time()
    links: list[Link] = []
    for spec in argv:
        inner, outer, delay_ms = spec.split(":")
        links.append(Link(open_tap(inner), open_tap(outer), float(delay_ms) / 1000))
    sel = selectors.SelectSelector()
    for link in links:
        sel.register(link.inner, selectors.EVENT_READ, (link, True))
        sel.register(link.outer, selectors.EVENT_READ, (link, False))
    os.set_blocking(0, False)
    sel.register(0, selectors.EVENT_READ, None)
    print("ready", flush=True)
    pending = b""
    while True:
        due = min((link.held[0][0] for link in links if link.held), default=None)
        timeout = None if due is None else max(0.0, due - time.monotonic())
        for key, _ in sel.select(timeout):
            if key.data is None:
                chunks = _drain(0)
                pending += b"".join(chunks)
                if chunks and chunks[-1] == b"":
                    return 0  # end of stdin: the parent is done (or gone)
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    command = line.decode().split()
                    if command[:1] == ["delay"] and len(command) == 3:
                        links[int(command[1])].delay_s = float(command[2]) / 1000
                        print("ok", flush=True)
                    else:
                        print(f"error: unknown command {line!r}", flush=True)
                continue
            link, from_host = key.data
            now = time.monotonic()
            for frame in _drain(key.fd):
                if from_host:
                    link.egress(frame, now)
                else:
                    _write(link.inner, frame)
        now = time.monotonic()
        for link in links:
            link.release(now)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
