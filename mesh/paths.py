"""Where model files may come from: the model roots, and prefixes that stop at a boundary.

A registration's ``path`` is client input: without a bound it names any file the runtime can
read (``/proc/self/environ``, another tenant's model, a pickle that runs code). So a runtime reads
model files only under its **model roots** (``runtime.model_roots``, environment
``MESH_RUNTIME_MODEL_ROOTS``, comma-separated). The same rule is applied twice:

* **At registration**, by the router, lexically (the router does not share the runtimes'
  filesystem): :func:`confine` turns the path into the absolute path the runtimes will read, or
  refuses it with INVALID_ARGUMENT. A relative path lies under the first root; an absolute one must
  lie under some root; ``file://`` URIs are absolute paths; ``..`` components are refused outright,
  even when they would stay inside (they are how paths escape, and no model needs one). Models in
  object storage (``s3://``..., or a key naming a storage key) are not local paths: routers and
  runtimes tell them apart first (``mesh.storage.location``), and the runtime pulls them into its
  disk cache (``mesh.storage.puller``), whose files it reads under the same rule.
* **At load**, by the runtime, on the real path (``mesh.runtime.loaders.base.resolve_path``):
  symbolic links are resolved and the result must still lie under a root's own real path; the
  model must be a regular file (or a directory of them, walked within bounds); its extension must
  be one of its type's.

With no roots configured, paths are not confined (relative ones resolve against the runtime's
working directory): the embedded ``mesh up`` on a developer's machine. deploy/ sets ``/models``.

:func:`under_prefix` is the one prefix rule for model IDs and paths in tokens: a prefix matches
what equals it, or starts with it at a boundary (the prefix ends with ``/``, or the next character
is ``/``), so that ``team-a`` covers ``team-a/x`` but not ``team-ab/x``.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Sequence
from urllib.parse import unquote, urlparse

from mesh.errors import InvalidArgument

_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_SHOWN = 200  # characters of a client's path quoted in an error


def shown(path: str) -> str:
    """A client's path for an error message: quoted, and cut to a bound."""
    return repr(path if len(path) <= _SHOWN else path[:_SHOWN] + "...")


def local_path(path_or_uri: str) -> str:
    """The local path a registration names (``file://`` URIs unwrapped); InvalidArgument for URIs
    of other schemes and for a ``file://`` URI naming another host."""
    if not path_or_uri:
        raise InvalidArgument("the model has no storage path")
    m = _URI.match(path_or_uri)
    if not m:
        return path_or_uri
    scheme = m.group(1).lower()
    if scheme != "file":
        raise InvalidArgument(f"unsupported storage URI scheme {scheme[:20]!r}; only local paths and file:// are "
                              "supported")
    parsed = urlparse(path_or_uri)
    if parsed.netloc not in ("", "localhost"):
        raise InvalidArgument(f"file URI {shown(path_or_uri)} names host {parsed.netloc[:100]!r}; only local "
                              "files are supported")
    return unquote(parsed.path)


def confine(path_or_uri: str, roots: Sequence[str]) -> str:
    """The absolute path under ``roots`` that the registration names (module docstring); with no
    roots, the local path as given. InvalidArgument, naming the roots, when it is outside them."""
    path = local_path(path_or_uri)
    if not roots:
        return path
    if "\x00" in path:
        raise InvalidArgument("the model path contains a NUL character")
    if ".." in path.split("/"):
        raise InvalidArgument(f"model path {shown(path)} has a '..' component; name the file under the model "
                              "roots directly")
    if path.startswith("~"):
        raise InvalidArgument(f"model path {shown(path)} starts with '~'; give it under the model roots")
    candidate = posixpath.normpath(path if path.startswith("/") else posixpath.join(roots[0], path))
    for root in roots:
        if under_prefix(candidate, as_directory(root)):
            return candidate
    raise InvalidArgument(f"model path {shown(path)} is outside the model roots ({', '.join(roots)}): "
                          "runtime.model_roots")


def as_directory(root: str) -> str:
    """``root`` normalised, ending with one ``/``."""
    root = posixpath.normpath(root)
    return root if root.endswith("/") else root + "/"


def under_prefix(value: str, prefix: str) -> bool:
    """Whether ``value`` equals ``prefix`` or starts with it at a boundary (module docstring)."""
    if not value.startswith(prefix):
        return False
    return len(value) == len(prefix) or prefix.endswith("/") or value[len(prefix)] == "/"


__all__ = ["as_directory", "confine", "local_path", "shown", "under_prefix"]
