"""Hosts on one machine: network namespaces on a bridge, with a delay on each host's link.

``Hosts(["etcd", "router", "runtime"], delay_ms=0.5)`` (a context manager) makes one network
namespace per name, each with an interface ``eth0`` on a bridge in the root namespace and an
address in a /24 of its own (``10.233.TAG.I``; the root namespace is ``.254`` on the bridge, so this
process reaches every host). :meth:`Host.argv` runs a command inside a host (``ip netns exec``,
which execs: the PID we get is the command's), bound to :attr:`Host.address`. ``loadtest.cluster``
places etcd, routers and runtimes on hosts this way.

Delay. Every frame a host sends waits ``delay_ms`` on its link before it reaches the bridge, as
``tc qdisc add dev eth0 root netem delay D`` on the host's side of a veth pair would do; frames to a
host are not held. One way from host to host takes D, a round trip 2D; a request through a router
(client -> router -> runtime and back) crosses four links, 4D, against 2D straight to the runtime.
Frames sent by the root namespace (this process) are not held, so a round trip from here is D.
:meth:`Hosts.set_delay` changes it while everything runs.

Two ways to hold frames, picked by ``method``:

* ``netem``: the host's link is a veth pair (``eth0`` inside, the other end on the bridge) with a
  ``netem`` qdisc on ``eth0``: the kernel's own delay.
* ``relay``: for kernels built without ``sch_netem`` (this machine's: ``CONFIG_NET_SCH_NETEM`` is
  not set). The host's ``eth0`` is a TAP device whose frames a relay process
  (``loadtest.netns_relay``) writes to a second TAP on the bridge after the delay. Each frame
  costs the relay a few microseconds of CPU and waits its wake-up latency on top of the delay;
  the benchmark measures the round trip each setting really gives.
* ``auto`` (the default): ``netem`` where ``tc`` can add one, else ``relay``.

Names. A free TAG (1-249) is claimed by creating the bridge ``mhbTAG`` (creation fails if another
run holds it), so parallel runs never share names or addresses; namespaces are ``mesh-hTAG-PID-I``.
Namespaces of a run whose process is gone (SIGKILLed: no clean-up ran) are removed by the next
run's start (:func:`sweep_stale`).

Clean-up (:meth:`Hosts.close`, also on any exception): the relay is stopped by its PID, any
process still inside one of our namespaces gets SIGKILL (only this run can have started one there),
the namespaces are deleted (which removes their links) and the bridge last. Needs root and iproute2.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

from mesh.procs import die_with_parent

SUBNET = "10.233"  # tests/e2e/test_etcd_partition.py uses 10.231 and 10.232
_NAMESPACE = re.compile(r"^mesh-h(\d+)-(\d+)-\d+$")


class NetnsError(RuntimeError):
    """A namespace, link or qdisc could not be made; the message has the command and its stderr."""


def ip(*args: str, netns: str | None = None) -> str:
    argv = ["ip", *(("-n", netns) if netns else ()), *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=15)
    if done.returncode != 0:
        raise NetnsError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


def _tc(netns: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", netns, "tc", *args], capture_output=True, text=True,
                          timeout=15)


@dataclass(frozen=True)
class Host:
    name: str  # what runs there: "etcd", "router", ...
    netns: str
    address: str

    def argv(self, command: Sequence[str]) -> list[str]:
        """``command`` run inside this host."""
        return ["ip", "netns", "exec", self.netns, *command]


def sweep_stale() -> list[str]:
    """Delete namespaces (and bridges) of runs whose process no longer exists; returns their names."""
    removed = []
    for line in ip("netns", "list").splitlines():
        name = line.split()[0] if line.strip() else ""
        match = _NAMESPACE.match(name)
        if match is None or _alive(int(match.group(2))):
            continue
        _kill_inside(name)
        with contextlib.suppress(NetnsError):
            ip("netns", "del", name)
            removed.append(name)
        with contextlib.suppress(NetnsError):
            ip("link", "del", f"mhb{match.group(1)}")
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_inside(netns: str) -> None:
    """SIGKILL what still runs in one of our namespaces: only the run that made it started anything there."""
    with contextlib.suppress(NetnsError, subprocess.TimeoutExpired):
        for pid in ip("netns", "pids", netns).split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


class Hosts:
    """Namespaces on one bridge with a delay on each host's link; see the module docstring."""

    def __init__(self, names: Sequence[str], *, delay_ms: float = 0.0, method: str = "auto") -> None:
        if method not in ("auto", "netem", "relay"):
            raise ValueError(f"method {method!r}: auto, netem or relay")
        if len(set(names)) != len(names) or not 0 < len(names) < 200:
            raise ValueError(f"host names must be distinct, 1 to 199 of them: {list(names)}")
        self.names = list(names)
        self.delay_ms = delay_ms
        self.method = method
        self.tag = 0
        self.hosts: list[Host] = []
        self._relay: subprocess.Popen[str] | None = None

    def __getitem__(self, name: str) -> Host:
        for host in self.hosts:
            if host.name == name:
                return host
        raise KeyError(f"no host {name!r} (hosts: {', '.join(self.names)})")

    @property
    def bridge(self) -> str:
        return f"mhb{self.tag}"

    @property
    def relay_pid(self) -> int | None:
        """The delay relay's PID (method ``relay``), to meter its CPU."""
        return self._relay.pid if self._relay is not None else None

    @property
    def gateway(self) -> str:
        """This process's address on the bridge (the root namespace)."""
        return f"{SUBNET}.{self.tag}.254"

    def __enter__(self) -> Hosts:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # --- making -----------------------------------------------------------------------------------
    def start(self) -> None:
        sweep_stale()
        self._claim_tag()
        ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        if self.method == "auto":
            self.method = "netem" if self._netem_works() else "relay"
        self.hosts = [Host(name, f"mesh-h{self.tag}-{os.getpid()}-{i}", f"{SUBNET}.{self.tag}.{i + 1}")
                      for i, name in enumerate(self.names)]
        for host in self.hosts:
            ip("netns", "add", host.netns)
            ip("link", "set", "lo", "up", netns=host.netns)
        if self.method == "relay":
            self._start_relay()
        for i, host in enumerate(self.hosts):
            inner, outer = f"mh{self.tag}i{i}", f"mh{self.tag}o{i}"
            if self.method == "netem":
                ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            ip("link", "set", inner, "netns", host.netns)
            ip("link", "set", inner, "name", "eth0", netns=host.netns)
            ip("addr", "add", f"{host.address}/24", "dev", "eth0", netns=host.netns)
            ip("link", "set", "eth0", "up", netns=host.netns)
            ip("link", "set", outer, "master", self.bridge, "up")
        if self.method == "netem":
            self.set_delay(self.delay_ms)

    def _claim_tag(self) -> None:
        rng = random.Random(os.getpid() ^ int.from_bytes(os.urandom(4), "little"))
        for _ in range(50):
            tag = rng.randint(1, 249)
            try:
                ip("link", "add", "name", f"mhb{tag}", "type", "bridge")
            except NetnsError as exc:
                if "exists" in str(exc):
                    continue  # another run holds this tag
                raise
            self.tag = tag
            return
        raise NetnsError("no free bridge name mhb1..mhb249 after 50 tries")

    def _netem_works(self) -> bool:
        probe = subprocess.run(["tc", "qdisc", "add", "dev", self.bridge, "root", "netem", "delay", "1ms"],
                               capture_output=True, text=True, timeout=15)
        if probe.returncode != 0:
            return False
        subprocess.run(["tc", "qdisc", "del", "dev", self.bridge, "root"], capture_output=True, timeout=15)
        return True

    def _start_relay(self) -> None:
        links = [f"mh{self.tag}i{i}:mh{self.tag}o{i}:{self.delay_ms:g}" for i in range(len(self.hosts))]
        self._relay = subprocess.Popen([sys.executable, "-m", "loadtest.netns_relay", *links],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                       preexec_fn=die_with_parent())
        assert self._relay.stdout is not None
        line = self._relay.stdout.readline().strip()
        if line != "ready":
            raise NetnsError(f"the delay relay did not start (it said {line!r}; exit code {self._relay.poll()})")

    # --- using ------------------------------------------------------------------------------------
    def set_delay(self, delay_ms: float, names: Sequence[str] | None = None) -> None:
        """Hold each frame the named hosts (all by default) send for ``delay_ms``."""
        for i, host in enumerate(self.hosts):
            if names is not None and host.name not in names:
                continue
            if self.method == "relay":
                assert self._relay is not None and self._relay.stdin is not None and self._relay.stdout
                self._relay.stdin.write(f"delay {i} {delay_ms:g}\n")
                self._relay.stdin.flush()
                answer = self._relay.stdout.readline().strip()
                if answer != "ok":
                    raise NetnsError(f"the delay relay answered {answer!r}")
            elif delay_ms > 0:
                done = _tc(host.netns, "qdisc", "replace", "dev", "eth0", "root", "netem", "delay", f"{delay_ms:g}ms")
                if done.returncode != 0:
                    raise NetnsError(f"tc netem on {host.name}: {done.stderr.strip()}")
            else:
                _tc(host.netns, "qdisc", "del", "dev", "eth0", "root")  # none there is fine too
        if names is None:
            self.delay_ms = delay_ms

    # --- removing ---------------------------------------------------------------------------------
    def close(self) -> None:
        relay, self._relay = self._relay, None
        if relay is not None:
            with contextlib.suppress(OSError):
                relay.stdin.close()  # type: ignore[union-attr]  # end of stdin ends it
            try:
                relay.wait(timeout=5)
            except subprocess.TimeoutExpired:
                relay.kill()
                relay.wait()
            with contextlib.suppress(OSError):
                relay.stdout.close()  # type: ignore[union-attr]
        for host in self.hosts:
            _kill_inside(host.netns)
            with contextlib.suppress(NetnsError):
                ip("netns", "del", host.netns)  # takes eth0 (and a veth's other end) with it
        for i in range(len(self.hosts)):  # the relay's TAPs went with it; a veth end that outlived its ns
            with contextlib.suppress(NetnsError):
                ip("link", "del", f"mh{self.tag}o{i}")
        if self.tag:
            with contextlib.suppress(NetnsError):
                ip("link", "del", self.bridge)
        self.hosts = []
