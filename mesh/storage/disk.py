"""The runtime's disk cache of pulled models: atomic, bounded, least recently used out.

Layout under ``storage.cache_dir`` (created 0700: models of every tenant are there): one folder
per runtime process, ``<slot>/``, held with an exclusive ``flock`` on ``<slot>.lock`` for the
process's life, so that runtimes sharing a cache folder (``mesh up`` starts several on one machine)
never delete each other's pulls, and a restarted runtime finds its slot, and its models, again.
Inside a slot:

- ``<digest>/``: one pulled model, complete. ``<digest>`` is the SHA-256 of what identifies the
  bytes (the store, the path, the registration: ``mesh.storage.puller``). Its files, and
  ``.mesh-pulled.json`` (what was pulled, from where, how many bytes), whose modification time
  is the entry's last use.
- ``.partial-<digest>-<random>/``: a pull in progress. It becomes ``<digest>/`` by one
  ``rename`` once every file is downloaded, verified and unpacked, so a model folder is never
  seen half-written; a runtime killed mid-pull leaves a partial folder, removed at the next start
  (:meth:`DiskCache.start`) and never loaded.

Bound: ``storage.cache_bytes``. Before a pull, room is made for its size by deleting the least
recently used entries that no load is reading (``pin``); a model larger than the bound fails its
load naming the setting, as does a pull for which no room can be made. The bound counts what the
entries' manifests say they hold, and a pull in progress counts what it reserved.

Thread-safe: pulls run in threads (``mesh.storage.puller``); one lock guards the index.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from mesh.errors import InvalidArgument, ModelLoadError

log = structlog.get_logger(__name__)

MANIFEST = ".mesh-pulled.json"
PARTIAL = ".partial-"


@dataclass
class _Entry:
    size: int
    last_used: float
    pins: int = 0
    verified: bool = True  # False while its checksums are being compared (``mark_verified``)


class DiskCache:
    MAX_SLOTS = 64

    def __init__(self, root: str | os.PathLike[str], max_bytes: int) -> None:
        self.base = Path(root)
        self.root = self.base / "0"  # the slot, chosen by start()
        self._lock_fd = -1
        self.max_bytes = max_bytes
        self._entries: dict[str, _Entry] = {}
        self._reserved = 0  # bytes of pulls in progress
        self._lock = threading.Lock()
        self.evictions = 0

    def start(self) -> None:
        """Take a slot, create it (0700), remove what interrupted pulls left, index the entries."""
        self.base.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.base.is_symlink() or self.base.stat().st_uid != os.getuid():
            # Another user made it first (the default lies in the shared temp folder): it could
            # read, or plant, the models this runtime loads.
            raise InvalidArgument(f"the disk cache {self.base} (storage.cache_dir) is a link or belongs to another "
                                  "user; give the runtime a folder of its own")
        os.chmod(self.base, 0o700)
        for slot in range(self.MAX_SLOTS):
            fd = os.open(self.base / f"{slot}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self._lock_fd, self.root = fd, self.base / str(slot)
            break
        else:
            raise ModelLoadError(f"{self.MAX_SLOTS} runtimes already use the disk cache {self.base} "
                                 "(storage.cache_dir)")
        self.root.mkdir(exist_ok=True, mode=0o700)
        removed = 0
        for child in self.root.iterdir():
            if child.name.startswith(PARTIAL) or child.name.startswith(".trash-"):
                shutil.rmtree(child, ignore_errors=True)
                removed += 1
                continue
            manifest = child / MANIFEST
            try:
                written = json.loads(manifest.read_text())
                size, verified = int(written["bytes"]), written.get("verified", True) is True
                used = manifest.stat().st_mtime
            except (OSError, ValueError, KeyError, TypeError):
                verified = False
            if not verified:  # not ours, damaged, or its checksums never compared: never loaded
                shutil.rmtree(child, ignore_errors=True)
                removed += 1
                continue
            self._entries[child.name] = _Entry(size, used)
        if removed:
            log.info("disk cache: removed interrupted or damaged pulls", cache_dir=str(self.root), removed=removed)

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the slot
            self._lock_fd = -1

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(e.size for e in self._entries.values()) + self._reserved

    def lookup(self, digest: str) -> Path | None:
        """The complete entry, touched and pinned (``unpin`` when the load is done); None if absent."""
        with self._lock:
            entry = self._entries.get(digest)
            if entry is None:
                return None
            entry.pins += 1
            entry.last_used = time.time()
        path = self.root / digest
        try:
            os.utime(path / MANIFEST)
        except OSError:  # deleted behind our back: a miss
            with self._lock:
                self._entries.pop(digest, None)
            return None
        return path

    def unpin(self, digest: str) -> None:
        with self._lock:
            entry = self._entries.get(digest)
            if entry is not None and entry.pins > 0:
                entry.pins -= 1

    def reserve(self, size: int, what: str) -> None:
        """Make room for ``size`` more bytes (LRU entries not pinned go), or fail naming the bound."""
        if size > self.max_bytes:
            raise ModelLoadError(f"{what} is {size} bytes, more than the disk cache's bound of {self.max_bytes} "
                                 "bytes (storage.cache_bytes)")
        victims: list[str] = []
        with self._lock:
            used = sum(e.size for e in self._entries.values()) + self._reserved
            for digest, entry in sorted(self._entries.items(), key=lambda item: item[1].last_used):
                if used + size <= self.max_bytes:
                    break
                if entry.pins:
                    continue
                victims.append(digest)
                used -= entry.size
            if used + size > self.max_bytes:
                raise ModelLoadError(f"the disk cache is full: {what} needs {size} bytes and the models being "
                                     f"loaded hold the rest of storage.cache_bytes ({self.max_bytes} bytes)")
            for digest in victims:
                del self._entries[digest]
            self._reserved += size
        for digest in victims:
            self._delete(digest)

    def room(self) -> int:
        """Bytes a pull could still take: the bound less what loads are reading and pulls reserved
        (entries no load reads can be evicted for it)."""
        with self._lock:
            pinned = sum(e.size for e in self._entries.values() if e.pins)
            return max(0, self.max_bytes - pinned - self._reserved)

    def reserved_bytes(self) -> int:
        """Bytes reserved by pulls in progress."""
        with self._lock:
            return self._reserved

    def release(self, size: int) -> None:
        with self._lock:
            self._reserved = max(0, self._reserved - size)

    def _delete(self, digest: str) -> None:
        """Rename first (atomic: no reader sees a half-deleted folder), then remove."""
        self.evictions += 1
        trash = self.root / f".trash-{digest}-{os.getpid()}-{threading.get_ident()}"
        try:
            os.rename(self.root / digest, trash)
        except OSError:
            return
        shutil.rmtree(trash, ignore_errors=True)
        log.info("disk cache: evicted", digest=digest[:16])

    def partial(self, digest: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"{PARTIAL}{digest}-", dir=self.root))

    def commit(self, partial: Path, digest: str, manifest: dict[str, object], size: int, *,
               verified: bool = True) -> Path:
        """Write the manifest, rename the partial folder into place, index it (pinned). An entry
        not ``verified`` yet is removed at the next start unless ``mark_verified`` came first."""
        (partial / MANIFEST).write_text(json.dumps({**manifest, "bytes": size, "verified": verified}))
        final = self.root / digest
        try:
            os.rename(partial, final)
        except OSError:  # another pull of the same bytes finished first: keep that one
            shutil.rmtree(partial, ignore_errors=True)
        with self._lock:
            held = self._entries.get(digest)
            if held is None:
                self._entries[digest] = _Entry(size, time.time(), pins=1, verified=verified)
            else:
                held.pins += 1
        return final

    def mark_verified(self, digest: str) -> None:
        """The entry's checksums matched: rewrite its manifest (atomically) so it survives a restart."""
        manifest = self.root / digest / MANIFEST
        try:
            written = json.loads(manifest.read_text())
            temporary = manifest.with_name(MANIFEST + ".tmp")
            temporary.write_text(json.dumps({**written, "verified": True}))
            os.replace(temporary, manifest)
        except (OSError, ValueError):
            return
        with self._lock:
            entry = self._entries.get(digest)
            if entry is not None:
                entry.verified = True

    def discard(self, digest: str) -> None:
        """Drop an entry whatever reads it (its checksums did not match): a load reading it fails."""
        with self._lock:
            self._entries.pop(digest, None)
        self._delete(digest)

    def abandon(self, partial: Path) -> None:
        shutil.rmtree(partial, ignore_errors=True)

    def remove(self, digest: str) -> bool:
        """Drop an entry no load is reading (tests, operators); False if absent or pinned."""
        with self._lock:
            entry = self._entries.get(digest)
            if entry is None or entry.pins:
                return False
            del self._entries[digest]
        self._delete(digest)
        return True


__all__ = ["MANIFEST", "DiskCache"]
