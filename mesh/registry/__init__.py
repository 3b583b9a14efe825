"""The registry: where models, instances and placements live (etcd, or in memory for ``mesh up``).

Components never construct a store themselves: they call :func:`open_store` with the registry URL
from their settings and get the store and the key prefix to build :class:`~mesh.registry.keys.Keys`.

URLs:

* ``memory://[name][/prefix]`` -- an in-process registry shared by everyone in this process who
  opens the same ``memory://name`` (each caller gets its own store handle over one backend, so closing
  one handle ends only its watches and leases).
* ``etcd://host:port[,host:port...][/prefix]`` -- an etcd cluster; the endpoints are members of one
  cluster, tried in turn on connection failure.

The prefix defaults to ``/mesh/`` and always ends with ``/``. The etcd module (and so aetcd) is imported
only when an etcd URL is opened.
"""

from __future__ import annotations

from mesh.errors import InvalidArgument
from mesh.registry.base import EventType, KeyValue, KVStore, Lease, WatchEvent, WatchReset
from mesh.registry.memory import MemoryBackend, MemoryStore
from mesh.registry.security import EtcdSecurity

__all__ = [
    "DEFAULT_PREFIX",
    "EventType",
    "KVStore",
    "KeyValue",
    "Lease",
    "MemoryStore",
    "WatchEvent",
    "WatchReset",
    "open_store",
]

DEFAULT_PREFIX = "/mesh/"
_USAGE = "use memory://[name][/prefix] or etcd://host:port[,host:port...][/prefix]"

# One backend per memory:// URL for the life of the process: that is what lets the router and the
# runtimes of `mesh up`, each opening the URL on its own, see one registry.
_memory_backends: dict[str, MemoryBackend] = {}


def open_store(url: str, *, timeout_s: float = 2.0,
               security: EtcdSecurity | None = None) -> tuple[KVStore, str]:
    """The store named by ``url`` and the key prefix to use in it; ``security``: etcd's TLS and
    credentials (``mesh.registry.security.etcd_security``)."""
    scheme, sep, rest = url.strip().partition("://")
    if not sep:
        raise InvalidArgument(f"registry URL {url!r} has no scheme: {_USAGE}")
    if "?" in rest or "#" in rest:
        raise InvalidArgument(f"registry URL {url!r} must not have a query or fragment: {_USAGE}")
    authority, _, path = rest.partition("/")
    if "@" in authority:  # the error must not repeat the URL: it may hold a password
        raise InvalidArgument("registry URL must not carry credentials (user:password@): set registry.username "
                              "and registry.password (or MESH_REGISTRY_PASSWORD) instead")
    prefix = "/" + path.strip("/") + "/" if path.strip("/") else DEFAULT_PREFIX
    scheme = scheme.lower()
    if scheme == "memory":
        name = f"memory://{authority}"
        backend = _memory_backends.get(name)
        if backend is None:
            backend = _memory_backends[name] = MemoryBackend(name=name)
        return MemoryStore(backend), prefix
    if scheme == "etcd":
        if timeout_s <= 0:
            raise InvalidArgument(f"registry timeout must be positive, got {timeout_s}")
        endpoints = [_endpoint(e, url) for e in authority.split(",")]
        from mesh.registry.etcd import EtcdStore

        return EtcdStore(endpoints, timeout_s=timeout_s, security=security), prefix
    raise InvalidArgument(f"registry URL {url!r} has an unsupported scheme {scheme!r}: {_USAGE}")


def _endpoint(text: str, url: str) -> str:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(f"registry URL {url!r}: endpoint {text!r} is not host:port ({_USAGE})")
    return f"{host}:{int(port)}"
