"""Bearer tokens, roles and model-ID prefixes: who may call what (pure logic, no gRPC).

The tokens file (``auth.tokens_file``, TOML) lists one ``[[token]]`` table per token::

    [[token]]
    name = "deployer-team-a"      # shown in errors and logs instead of the token
    role = "write"                # read | write
    sha256 = "<64 hex digits>"    # sha256 of the token (preferred: the file then holds no secret)
    # token = "..."               # or the token itself (development only)
    prefixes = ["team-a/"]        # optional: model and vModel IDs this token may touch
    paths = ["/models/team-a/"]   # optional: where the models it registers may be read from
    storage_keys = ["team-a-s3"]  # optional: the storage keys its registrations may pull with
    max_models = 1000             # optional quota: models registered under its prefixes
    max_pinned_copies = 20        # optional quota: the sum of minCopies over those models

Decisions:

* **Roles.** ``read`` may call the management API's reading methods (getModelStatus,
  getVModelStatus, listModels) and, when the data plane is protected, infer. ``write`` may also call
  the methods that change state or load models (``WRITE_METHODS``); a method not listed as reading
  counts as writing, so an RPC added later is denied to readers until someone decides otherwise.
* **Prefixes.** With prefixes, every model or vModel ID named by a call (a vModel's target too)
  must start with one of them at a boundary (``team-a`` covers ``team-a/x``, not ``team-ab/x``:
  ``mesh.paths.under_prefix``); ``listModels`` must ask for a prefix inside one of them. Without
  prefixes, a token may touch every ID.
* **Paths.** With paths, the file a registration names (``modelInfo.path``, made absolute under
  the model roots: ``mesh.paths.confine``) must lie under one of them: a tenant's token registers
  models from its tenant's directory only, whatever IDs it may use.
* **Storage keys.** A registration that pulls from object storage (``mesh.storage.location``)
  uses a storage key, whose credentials the runtime holds: the key it names, else
  ``default_<type>`` or ``default``. A token with ``storage_keys`` may use only those keys (a
  ``type: pvc`` location: only the claims listed as ``pvc:<claim>``). A tenant's token (one with
  prefixes or paths) without ``storage_keys`` may not pull from storage at all: otherwise it could
  load another tenant's models with that tenant's credentials, or make the runtime fetch any URL
  (``https://`` locations with no key). A key's credentials decide what can be read with it
  (parameters may change its bucket, not its endpoint): give each tenant a key of its own.
* **Quotas.** ``max_models`` bounds the models registered under the token's prefixes (all models,
  without prefixes), whoever registered them; ``max_pinned_copies`` bounds the sum of their
  ``minCopies`` (copies loaded whether used or not). A registration past either answers
  RESOURCE_EXHAUSTED; registering a model that already exists with the same definition is free.
  Two concurrent registrations may pass a quota by one each (the check reads, then writes).
* **Comparison.** Only sha256 digests are kept in memory; the presented token's digest is compared
  with every entry with ``hmac.compare_digest`` and no early exit, so the time taken says nothing
  about which entry (or how much of one) matched.
* **Secrets.** No message built here contains a token or a digest; entries are named by ``name``.
"""

from __future__ import annotations

import hashlib
import hmac
import posixpath
import re
import tomllib
from collections import Counter
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import structlog

from mesh.errors import InvalidArgument, MeshError, PermissionDenied, Unauthenticated
from mesh.logging import LogLimit
from mesh.paths import as_directory, confine, shown, under_prefix
from mesh.storage.location import locate

log = structlog.get_logger("mesh.transport.auth")

READ, WRITE = "read", "write"
# Management methods a read token may call; every other method of mmesh.ModelMesh needs write.
READ_METHODS = frozenset({"getModelStatus", "getVModelStatus", "listModels",
                          "getGraphStatus", "listGraphs",  # mmesh.ModelMeshGraphs (inference graphs)
                          "getFleetStatus", "getModelCopies"})  # mmesh.ModelMeshStatus (fleet status)
WRITE_METHODS = frozenset({"registerModel", "registerModels", "unregisterModel", "ensureLoaded", "setVModel",
                           "deleteVModel", "setVModelSplit", "promoteVModel", "setGraph", "deleteGraph"})
INVALID_TOKEN = "missing or invalid bearer token"

_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_KEYS = {"name", "role", "sha256", "token", "prefixes", "paths", "storage_keys", "max_models", "max_pinned_copies"}


# Refused calls since the process started, by outcome ("unauthenticated", "permission_denied",
# "invalid"): counted here (pure), exported by the router's metrics (mesh_auth_failures_total).
_failures: Counter[str] = Counter()


def count_failure(kind: str) -> None:
    _failures[kind] += 1


def failure_counts() -> dict[str, int]:
    return dict(_failures)


# Who is calling, for the handler of the call: set by the router's auth interceptor (None with auth off).
_caller: ContextVar[Principal | None] = ContextVar("mesh_caller", default=None)


def current_caller() -> Principal | None:
    return _caller.get()


def set_caller(principal: Principal | None) -> None:
    _caller.set(principal)


class Refusals:
    """Refused calls, counted (``count_failure``) and logged where an operator looks: never the
    token, but the principal's name, the method and the reason, at most one line a second per kind
    (a flood of bad tokens must not flood the log too). Shared by the gRPC and REST front ends."""

    def __init__(self) -> None:
        self._limit = LogLimit()

    def note(self, exc: MeshError, method: str, principal: Principal | None, peer: str) -> None:
        kind = ("unauthenticated" if isinstance(exc, Unauthenticated) else
                "invalid" if isinstance(exc, InvalidArgument) else "permission_denied")
        count_failure(kind)
        if self._limit.allow(kind):
            log.warning("request denied", method=method, kind=kind, principal=principal.name if principal else None,
                        reason=exc.message, peer=peer, suppressed_since_last=self._limit.take_suppressed(kind))


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def bearer_token(value: str | bytes | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` value (scheme case-insensitive), else None."""
    if value is None or isinstance(value, bytes):
        return None
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


@dataclass(frozen=True)
class Principal:
    """A token's identity and rights (never its secret)."""

    name: str
    role: str
    prefixes: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    storage_keys: tuple[str, ...] = ()
    max_models: int = 0  # 0: no quota
    max_pinned_copies: int = 0

    def check_method(self, method: str) -> None:
        """``method`` is a management method name (``registerModel``)."""
        if self.role != WRITE and method not in READ_METHODS:
            raise PermissionDenied(f"token {self.name!r} has role {self.role}: it may not call {method} "
                                   "(needs role write)")

    def allows(self, model_id: str) -> bool:
        return not self.prefixes or any(under_prefix(model_id, p) for p in self.prefixes)

    def check_path(self, path: str) -> None:
        """``path`` (absolute, as confine gives it) must lie under one of the token's paths."""
        if not self.paths:
            return
        inside = path.startswith("/") and ".." not in path.split("/") and any(
            under_prefix(posixpath.normpath(path), as_directory(p)) for p in self.paths)
        if not inside:
            raise PermissionDenied(f"token {self.name!r} may not register a model from {shown(path)}: outside "
                                   f"its paths ({', '.join(self.paths)})")

    @property
    def restricted(self) -> bool:
        """Whether a registration's path or storage must be checked against this token."""
        return bool(self.prefixes or self.paths or self.storage_keys)

    def check_storage(self, key_name: str, storage_type: str, claim: str = "") -> None:
        """A registration pulling with storage key ``key_name`` (module docstring)."""
        if not self.restricted:
            return
        needed = f"pvc:{claim}" if storage_type == "pvc" and claim else key_name
        if needed not in self.storage_keys:
            allowed = ", ".join(self.storage_keys) or "none"
            raise PermissionDenied(f"token {self.name!r} may not register models from storage {needed!r}: outside "
                                   f"its storage_keys ({allowed})")

    def check_model(self, model_id: str, what: str = "model") -> None:
        if not self.allows(model_id):
            raise PermissionDenied(f"token {self.name!r} may not access {what} {model_id!r}: outside its "
                                   f"model-ID prefixes ({', '.join(self.prefixes)})")

    def check_source(self, path: str, key: str, roots: tuple[str, ...]) -> None:
        """A registration's ``modelInfo.path`` and ``key``: its storage key (object storage), else
        its file under the token's paths (made absolute under the model roots). INVALID_ARGUMENT
        for a malformed location. The interceptor checks ``registerModel`` with this, and the bulk
        registration (``registerModels``) each of its items."""
        if not path or not self.restricted:
            return
        location = locate(path, key)
        if location is not None:
            self.check_storage(location.key_name, location.type_hint, location.params.get("name", ""))
        elif self.paths:
            self.check_path(confine(path, roots))

    def check_list_prefix(self, prefix: str) -> None:
        """listModels: the requested prefix must lie inside one of the token's prefixes."""
        if self.prefixes and not any(under_prefix(prefix, p) for p in self.prefixes):
            raise PermissionDenied(f"token {self.name!r} may not list models with prefix {prefix!r}: ask "
                                   f"for one inside its model-ID prefixes ({', '.join(self.prefixes)})")


class TokenTable:
    """The tokens of one tokens file, by digest."""

    def __init__(self, entries: Iterable[tuple[bytes, Principal]]) -> None:
        self._entries = list(entries)
        if not self._entries:
            raise InvalidArgument("no tokens: the tokens file must list at least one [[token]]")

    def __len__(self) -> int:
        return len(self._entries)

    def authenticate(self, token: str | None) -> Principal:
        """The principal of ``token``; Unauthenticated when it is missing or unknown."""
        if not token:
            raise Unauthenticated(INVALID_TOKEN)
        digest = token_digest(token)
        found: Principal | None = None
        for known, principal in self._entries:  # no early exit: constant time over the table
            if hmac.compare_digest(digest, known):
                found = principal
        if found is None:
            raise Unauthenticated(INVALID_TOKEN)
        return found

    @classmethod
    def parse(cls, text: str, source: str = "tokens file") -> TokenTable:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise InvalidArgument(f"{source}: not valid TOML: {exc}") from None
        unknown = set(data) - {"token"}
        if unknown:
            raise InvalidArgument(f"{source}: unknown table(s) {', '.join(sorted(unknown))}; "
                                  "expected [[token]] entries")
        items = data.get("token", [])
        if not isinstance(items, list):
            raise InvalidArgument(f"{source}: 'token' must be an array of tables ([[token]])")
        entries: list[tuple[bytes, Principal]] = []
        names: set[str] = set()
        for i, item in enumerate(items, 1):
            entry = _entry(item, f"{source}: token #{i}")
            if entry[1].name in names:
                raise InvalidArgument(f"{source}: token #{i}: duplicate name {entry[1].name!r}")
            if any(hmac.compare_digest(entry[0], d) for d, _ in entries):
                raise InvalidArgument(f"{source}: token #{i} ({entry[1].name!r}): same token as another entry")
            names.add(entry[1].name)
            entries.append(entry)
        return cls(entries)

    @classmethod
    def load(cls, path: str | Path) -> TokenTable:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidArgument(f"setting auth.tokens_file: cannot read {path}: "
                                  f"{getattr(exc, 'strerror', None) or exc}") from None
        return cls.parse(text, f"tokens file {path}")


def _entry(item: object, where: str) -> tuple[bytes, Principal]:
    if not isinstance(item, dict):
        raise InvalidArgument(f"{where}: must be a table")
    unknown = set(item) - _KEYS
    if unknown:
        raise InvalidArgument(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; known: "
                              f"{', '.join(sorted(_KEYS))}")
    name = item.get("name")
    if not isinstance(name, str) or not name.strip():
        raise InvalidArgument(f"{where}: 'name' is required (a label for logs and errors)")
    where = f"{where} ({name!r})"
    role = item.get("role")
    if role not in (READ, WRITE):
        raise InvalidArgument(f"{where}: 'role' must be \"read\" or \"write\"")
    has_hash, has_token = "sha256" in item, "token" in item
    if has_hash == has_token:
        raise InvalidArgument(f"{where}: give exactly one of 'sha256' (hex digest of the token) or 'token'")
    if has_hash:
        value = item["sha256"]
        if not isinstance(value, str) or not _HEX64.match(value):
            raise InvalidArgument(f"{where}: 'sha256' must be 64 hex digits (sha256 of the token)")
        digest = bytes.fromhex(value)
    else:
        value = item["token"]
        if not isinstance(value, str) or len(value) < 16:
            raise InvalidArgument(f"{where}: 'token' must be a string of at least 16 characters")
        digest = token_digest(value)
    prefixes = item.get("prefixes", [])
    if not isinstance(prefixes, list) or not all(isinstance(p, str) and p for p in prefixes):
        raise InvalidArgument(f"{where}: 'prefixes' must be a list of non-empty strings")
    paths = item.get("paths", [])
    if not isinstance(paths, list) or not all(isinstance(p, str) and p.startswith("/") for p in paths):
        raise InvalidArgument(f"{where}: 'paths' must be a list of absolute directories")
    quotas = {}
    for key in ("max_models", "max_pinned_copies"):
        value = item.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 10**9:
            raise InvalidArgument(f"{where}: {key!r} must be a whole number from 0 (no quota) to 10^9")
        quotas[key] = value
    storage_keys = item.get("storage_keys", [])
    if not isinstance(storage_keys, list) or not all(isinstance(k, str) and k for k in storage_keys):
        raise InvalidArgument(f"{where}: 'storage_keys' must be a list of storage key names")
    return digest, Principal(name=name, role=role, prefixes=tuple(prefixes), paths=tuple(paths),
                             storage_keys=tuple(storage_keys), **quotas)


__all__ = ["INVALID_TOKEN", "READ", "READ_METHODS", "WRITE", "WRITE_METHODS", "Principal", "TokenTable",
           "bearer_token", "token_digest"]
