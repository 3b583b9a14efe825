"""Pulls a registration's model from object storage into the disk cache: the runtime's side.

``Puller.pull(spec)`` is awaited by the model cache at the start of each load, inside the load's
slot and deadline (``mesh.runtime.cache``), so the download is part of the load: its time is in
``modelmesh_loadmodel_milliseconds`` and its own metrics (``mesh_storage_*``), and the load's log
line says where the model came from. It answers the local path the loader reads:

- a local registration (``mesh.storage.location.locate`` is None): nothing to pull;
- ``type: pvc``: ``<storage.pvc_mounts_dir>/<name>/<path>``, read in place (no copy), confined to
  that claim's mount on its real path;
- anything else: ``<storage.cache_dir>/<digest>/<basename(path)>``, downloaded once
  (``mesh.storage.disk``): a model evicted from memory and loaded again reads the disk copy and
  touches no network. ``<digest>`` covers the store (endpoint, bucket), the path, and the
  registration (model ID and registration time), so re-registering a model after uploading new
  bytes to the same path pulls them again, while a copy evicted and reloaded does not. A single
  archive (``.zip``, ``.tar.gz``, ``.tgz``, ``.tar``) is unpacked into ``<basename without the
  suffix>/`` and the archive removed (``mesh.storage.archives``).

Verified: every file's size as it is written; the MD5 (where the store's ETag is one) is compared
on a thread of its own while the model loads (hashing 1 MB takes 1.4 ms of CPU here, as long as
the whole loopback download): the load waits for it (``verified``) before the copy counts, a
mismatch fails the load and deletes the files, and an entry whose comparison never finished
(the runtime died) is removed at the next start. An archive is compared before it is unpacked.

Single flight: concurrent pulls of one digest share one download (the model cache already runs
one load per model; this covers two registrations of the same bytes too).

Confinement: the runtime's model roots gain the cache folder and the claims' mounts, for the
loaders (``roots``); a *local* registration naming a path in either is refused, so a tenant can
reach another's pulled model or claim only through storage it may use (``mesh.auth``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import json
import os
import posixpath
import re
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from mesh.errors import MeshError, ModelLoadError
from mesh.paths import as_directory, local_path, shown, under_prefix
from mesh.registry.records import ModelSpec
from mesh.runtime.loaders.base import MAX_WALK_ENTRIES
from mesh.settings import StorageSettings
from mesh.storage.archives import archive_kind, unpack
from mesh.storage.config import TYPES, Resolved, StorageKeys, resolve
from mesh.storage.disk import MANIFEST, DiskCache
from mesh.storage.location import Location, locate
from mesh.storage.providers import Cancelled, Check, Provider, StoredObject, provider_for

log = structlog.get_logger(__name__)

_CLAIM = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")  # a Kubernetes object name
OBJECT_PARALLELISM = 4  # objects of one model downloaded at once
MAX_REMEMBERED = 1000  # checksum results kept for loads still to ask (mismatches only, in practice)
# How long the oldest of several downloads of unknown sizes waits for the others' room (_grow).
UNSIZED_WAIT_S = 30.0
PULL_THREADS = 8  # pulls at once (a runtime runs runtime.max_concurrent_loads loads at once: 2 by default)


@dataclass(frozen=True)
class Pulled:
    path: str  # what the loader reads
    source: str  # where it came from, for the load's log line (no secret)
    downloaded_bytes: int = 0
    from_disk: bool = False  # served by the disk cache (or read in place)
    seconds: float = 0.0
    digest: str = ""  # the disk-cache entry, pinned until ``done``
    type: str = ""


def default_cache_dir() -> str:
    return os.path.join(tempfile.gettempdir(), f"mesh-storage-{os.getuid()}")


class Puller:
    def __init__(self, settings: StorageSettings, metrics: Any = None, model_roots: tuple[str, ...] = ()) -> None:
        self.settings = settings
        self.model_roots = model_roots
        self.keys = StorageKeys(settings.config_dir) if settings.config_dir else None
        self.disk = DiskCache(settings.cache_dir or default_cache_dir(), settings.cache_bytes)
        self.metrics = metrics  # RuntimeMetrics (storage_pulled / storage_failed), or None
        self._flights: dict[tuple[str, int, str, str], asyncio.Future[Pulled]] = {}
        self._cancels: set[threading.Event] = set()  # one per pull in flight: set when it is abandoned
        self._closing = False
        # Pulls run on threads of their own, never asyncio's default pool: a store that drips
        # bytes holds a pull thread until its load's deadline, and nothing else waits for it.
        self._threads = ThreadPoolExecutor(max_workers=PULL_THREADS, thread_name_prefix="pull")
        self._pool = ThreadPoolExecutor(max_workers=OBJECT_PARALLELISM, thread_name_prefix="pull-object")
        # Checksums compared while the model loads (providers.Check), by digest.
        self._verify_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="pull-verify")
        self._verifications: dict[str, Future[None]] = {}
        # Downloads of sizes their store did not give, in the order they started (_download_all):
        # when they outgrow the bound together, the oldest waits for the others to give way.
        self._unsized: list[int] = []
        self._unsized_lock = threading.Lock()
        self._unsized_seq = 0

    def start(self) -> None:
        self.disk.start()

    def close(self) -> None:
        self._closing = True
        for cancel in list(self._cancels):
            cancel.set()
        self._threads.shutdown(wait=False, cancel_futures=True)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._verify_pool.shutdown(wait=False, cancel_futures=True)
        self.disk.close()

    def roots(self) -> tuple[str, ...]:
        """Folders the loaders may read besides the model roots."""
        return (str(self.disk.base), self.settings.pvc_mounts_dir)

    def check_local(self, path: str) -> None:
        """A local registration must not name a pulled model or a claim, nor hold a link to one
        (module docstring)."""
        try:
            local = os.path.expanduser(local_path(path))
        except MeshError:
            return  # the loader gives the reason
        storage = [as_directory(os.path.realpath(root)) for root in self.roots()]

        def refuse(real: str) -> bool:
            return any(under_prefix(real, root) for root in storage)

        if refuse(os.path.realpath(local)):
            raise ModelLoadError(f"model path {shown(path)} is in the runtime's storage folders "
                                 f"({', '.join(self.roots())}); register the model by its storage, not by this path")
        _check_links(Path(local), refuse, f"model path {shown(path)} holds a link into the runtime's storage folders")

    def check(self, spec: ModelSpec) -> None:
        """What can be told of a registration's source without reading it: a storage location's key
        is configured here and applies (``mesh.storage.config.resolve``); ModelLoadError otherwise.
        A local path is the loader's to check (``resolve_path``), after ``check_local``."""
        location = locate(spec.path, spec.key)
        if location is None:
            self.check_local(spec.path)
        else:
            self._resolve(location)

    async def pull(self, spec: ModelSpec) -> Pulled | None:
        """The model's local path (module docstring); None for a local registration."""
        try:
            location = locate(spec.path, spec.key)
        except MeshError as exc:
            raise ModelLoadError(exc.message) from None
        if location is None:
            await asyncio.get_running_loop().run_in_executor(self._threads, self.check_local, spec.path)
            return None
        started = time.perf_counter()
        cancel: threading.Event | None = None
        try:
            # One flight per registration (the model cache runs one load per model; this covers
            # loads that overlap anyway), and one thread hop for all of it.
            flight_key = (spec.model_id, spec.registered_ms, spec.path, spec.key)
            flight = self._flights.get(flight_key)
            owner = flight is None  # the pull thread's pin on the entry is this load's
            if flight is None:
                if self._closing:
                    raise ModelLoadError("the runtime is stopping: no more pulls")
                cancel = threading.Event()
                self._cancels.add(cancel)
                flight = asyncio.get_running_loop().run_in_executor(
                    self._threads, self._locate_and_pull, location, spec, cancel)
                self._flights[flight_key] = flight

                def forget(_f: asyncio.Future[Pulled], k: tuple[str, int, str, str] = flight_key,
                           c: threading.Event = cancel) -> None:
                    self._flights.pop(k, None)
                    self._cancels.discard(c)

                flight.add_done_callback(forget)
            try:
                pulled = await asyncio.shield(flight)
            except asyncio.CancelledError:
                if owner:  # the load gave up (its deadline): stop the pull, and release its pin if it ends
                    assert cancel is not None
                    cancel.set()
                    flight.add_done_callback(self._release_abandoned)
                raise
            if not owner and pulled.digest:  # another load's download: pin it for this load, count none
                if self.disk.lookup(pulled.digest) is None:
                    raise ModelLoadError(f"pulled model {spec.model_id!r} left the disk cache before its load")
                pulled = dataclasses.replace(pulled, from_disk=True, downloaded_bytes=0)
        except MeshError as exc:
            if self.metrics is not None:  # a known type only: parameters are client input
                kind = getattr(exc, "storage_type", "") or location.type_hint
                self.metrics.storage_failed(kind if kind in TYPES else "unknown")
            raise ModelLoadError(exc.message) from None
        pulled = dataclasses.replace(pulled, seconds=time.perf_counter() - started)
        if self.metrics is not None:
            self.metrics.storage_pulled(pulled)
        return pulled

    def _release_abandoned(self, flight: asyncio.Future[Pulled]) -> None:
        if not flight.cancelled() and flight.exception() is None:
            self.done(flight.result())

    def done(self, pulled: Pulled | None) -> None:
        """The load that asked for ``pulled`` has finished reading it."""
        if pulled is not None and pulled.digest:
            self.disk.unpin(pulled.digest)

    # --- in a pull thread -------------------------------------------------------------------
    def _resolve(self, location: Location) -> Resolved:
        if self.keys is None:
            if location.named:
                raise ModelLoadError(f"storage key {location.key_name!r} is not configured on this runtime "
                                     "(no storage.config_dir)")
            return resolve(location, _NoKeys())
        return resolve(location, self.keys)

    def _claim_path(self, resolved: Resolved, location: Location) -> str:
        name = resolved.fields.get("name")
        if not isinstance(name, str) or not _CLAIM.match(name):
            raise ModelLoadError(f"storage key {resolved.key!r}: type pvc needs the claim's name "
                                 "(a Kubernetes name)")
        mount = Path(self.settings.pvc_mounts_dir) / name
        if not mount.is_dir():
            raise ModelLoadError(f"persistent volume claim {name!r} is not mounted on this runtime "
                                 f"({mount}: deploy/README.md, Model storage)")
        path = mount / location.path
        real = os.path.realpath(path)
        inside = as_directory(os.path.realpath(mount))
        if not under_prefix(real, inside):
            raise ModelLoadError(f"model path {shown(location.path)} leads outside claim {name!r} through a "
                                 "symbolic link")
        if not os.path.exists(real):
            raise ModelLoadError(f"object not found: {location.path[:300]!r} in claim {name!r}")
        # Nor may anything inside it: a link in the model's folder to another claim or model.
        _check_links(path, lambda target: not under_prefix(target, inside),
                     f"model path {shown(location.path)} in claim {name!r} holds a link out of the claim")
        return str(path)

    def _locate_and_pull(self, location: Location, spec: ModelSpec, cancel: threading.Event) -> Pulled:
        resolved = self._resolve(location)
        try:
            if resolved.type == "pvc":
                path = self._claim_path(resolved, location)
                return Pulled(path=path, source=f"claim {resolved.fields['name']!r}: {location.path}",
                              from_disk=True, type="pvc")
            provider = provider_for(resolved, retries=self.settings.retries,
                                    connect_timeout_s=self.settings.connect_timeout_s)
            return self._pull(provider, location, _digest(provider, location, spec), cancel)
        except MeshError as exc:
            exc.storage_type = resolved.type  # type: ignore[attr-defined]  # the failure metric's label
            raise
        except Cancelled:
            raise ModelLoadError("download abandoned: its load's deadline passed (runtime.load_timeout_s), or the "
                                 "runtime is stopping") from None

    def _pull(self, provider: Provider, location: Location, digest: str, cancel: threading.Event) -> Pulled:
        source = f"{provider.where()}: {location.path}"
        cached = self.disk.lookup(digest)
        if cached is not None:
            try:
                manifest = json.loads((cached / MANIFEST).read_text())
                return Pulled(path=str(cached / manifest["model_path"]), source=source, from_disk=True,
                              digest=digest, type=provider.type)
            except (OSError, ValueError, KeyError):
                self.disk.unpin(digest)
                self.disk.remove(digest)
        objects = provider.objects(location.path, self.settings.max_files, cancel)
        known = sum(max(o.size, 0) for o in objects)
        self.disk.reserve(known, f"model {location.path[:200]!r}")
        reserved = known
        partial = self.disk.partial(digest)
        checks: list[tuple[str, Check]] = []  # (the file under the model's folder, its comparison)
        held = [reserved]  # grows while a download of a size the store did not give (HTTP) goes on
        try:
            written = self._download_all(provider, objects, partial, held, checks, cancel)
            reserved = held[0]
            model_rel = _relative_root(location.path)
            if len(objects) == 1 and (kind := archive_kind(objects[0].relative)):
                archive = partial / objects[0].relative
                for relative, check in checks:  # an archive is unpacked only once it is known good
                    check(partial / relative)
                checks = []
                model_rel = _strip_archive_suffix(objects[0].relative, kind)
                target = partial / model_rel
                target.mkdir()
                # Bounded by what the cache could make room for (the archive itself goes after).
                unpacked = unpack(archive, target, max_bytes=self.disk.room() + reserved,
                                  max_files=self.settings.max_files)
                archive.unlink()
                self.disk.reserve(unpacked, f"model {location.path[:200]!r} unpacked")
                self.disk.release(reserved)
                reserved, written = unpacked, unpacked
            final = self.disk.commit(partial, digest, {"source": source, "model_path": model_rel,
                                                       "files": len(objects)}, written, verified=not checks)
            if not checks:
                self._verifications.pop(digest, None)  # a mismatch remembered for an earlier pull of it
            if checks:  # compared beside the load; the load waits for it before it counts (verified)
                pending = self._verify_pool.submit(self._verify, digest, final, checks)
                if len(self._verifications) >= MAX_REMEMBERED:  # mismatches of pulls nobody asked again for
                    for done in [d for d, f in self._verifications.items() if f.done()]:
                        self._verifications.pop(done, None)
                self._verifications[digest] = pending
                pending.add_done_callback(functools.partial(self._verification_done, digest))
        except BaseException:
            self.disk.abandon(partial)
            raise
        finally:
            self.disk.release(max(reserved, held[0]))
        return Pulled(path=str(final / model_rel), source=source, downloaded_bytes=sum(max(o.size, 0) for o in objects)
                      or written, digest=digest, type=provider.type)

    def _verify(self, digest: str, folder: Path, checks: list[tuple[str, Check]]) -> None:
        try:
            for relative, check in checks:
                check(folder / relative)
        except BaseException:
            self.disk.discard(digest)  # never loaded again
            raise
        self.disk.mark_verified(digest)

    def _verification_done(self, digest: str, pending: Future[None]) -> None:
        """A match needs no remembering (the entry says so); a mismatch stays for its waiters."""
        if not pending.cancelled() and pending.exception() is None and self._verifications.get(digest) is pending:
            self._verifications.pop(digest, None)

    async def verified(self, pulled: Pulled | None) -> None:
        """Wait until the pulled model's checksums are compared; ModelLoadError if they differ."""
        if pulled is None or not pulled.digest:
            return
        pending = self._verifications.get(pulled.digest)
        if pending is None:
            return
        await asyncio.wrap_future(pending)

    def _download_all(self, provider: Provider, objects: list[StoredObject], partial: Path, held: list[int],
                      checks: list[tuple[str, Check]], cancel: threading.Event) -> int:
        """Download every object into ``partial``; ``held[0]`` is what the disk cache has reserved
        for this pull, grown here as bytes the store gave no size for arrive (so that concurrent
        pulls of unknown sizes share the one bound). When such pulls together outgrow the bound,
        each holding part of it, the younger ones fail (the disk cache is full) and the oldest waits
        for their room instead of failing too: before, all of them could fail at once."""
        counted = [0]
        lock = threading.Lock()
        with self._unsized_lock:
            self._unsized_seq += 1
            seq = self._unsized_seq
            self._unsized.append(seq)

        def progress(n: int) -> None:
            with lock:
                counted[0] += n
                if counted[0] > held[0]:
                    step = min(8 * 1024 * 1024, max(1, self.disk.max_bytes // 16))  # in steps, not per chunk
                    grow = max(counted[0] - held[0], step)
                    self._grow(grow, held[0], seq, cancel)
                    held[0] += grow

        def one(obj: StoredObject) -> None:
            dest = _inside(partial, obj.relative)
            dest.parent.mkdir(parents=True, exist_ok=True)
            check = provider.download(obj, dest, range_bytes=self.settings.range_bytes,
                                      cancelled=cancel, progress=progress)
            if check is not None:
                with lock:
                    checks.append((obj.relative, check))

        try:
            if len(objects) == 1:
                one(objects[0])
            else:
                for future in [self._pool.submit(one, obj) for obj in objects]:
                    future.result()
        finally:
            with self._unsized_lock:
                self._unsized.remove(seq)
        return counted[0]

    def _grow(self, size: int, held: int, seq: int, cancel: threading.Event) -> None:
        """Reserve ``size`` more bytes for the download ``seq`` (holding ``held``); see
        ``_download_all``. The oldest download waits, polling, while other pulls hold reservations
        (they end: done or failed), within UNSIZED_WAIT_S; anything else fails at once."""
        what = "a download of a size its store did not give"
        deadline = time.monotonic() + UNSIZED_WAIT_S
        while True:
            try:
                self.disk.reserve(size, what)
                return
            except ModelLoadError:
                with self._unsized_lock:
                    oldest = bool(self._unsized) and self._unsized[0] == seq
                others = self.disk.reserved_bytes() > held
                if not (oldest and others) or cancel.is_set() or time.monotonic() >= deadline:
                    raise
            time.sleep(0.01)


class _NoKeys(StorageKeys):
    def __init__(self) -> None:
        super().__init__("/nonexistent")

    def get(self, name: str) -> dict[str, Any] | None:
        return None


def _check_links(path: Path, refused: Callable[[str], bool], message: str) -> None:
    """ModelLoadError(``message``) when ``path`` (a file, or a folder walked without following
    links) is or holds a symbolic link whose real path is ``refused``. The walk stops past the
    loaders' own bound (``MAX_WALK_ENTRIES``): they refuse a larger folder with their reason."""
    stack, seen = [path], 0
    while stack:
        current = stack.pop()
        seen += 1
        if seen > MAX_WALK_ENTRIES + 1:
            return
        try:
            if current.is_symlink():
                if refused(os.path.realpath(current)):
                    raise ModelLoadError(message)
                continue
            if current.is_dir():
                stack.extend(current.iterdir())
        except OSError:
            continue  # unreadable: the loader says why


def _digest(provider: Provider, location: Location, spec: ModelSpec) -> str:
    identity = json.dumps([provider.identity(), location.path, spec.model_id, spec.registered_ms])
    return hashlib.sha256(identity.encode()).hexdigest()


def _relative_root(path: str) -> str:
    return posixpath.basename(path.rstrip("/")) or "_model"


def _strip_archive_suffix(name: str, kind: str) -> str:
    low = name.lower()
    for suffix in (".tar.gz", ".tgz", ".zip", ".tar"):
        if low.endswith(suffix):
            return name[: -len(suffix)] or "_model"
    return name + f".{kind}-unpacked"


def _inside(folder: Path, relative: str) -> Path:
    """``folder/relative``, refusing object keys that would leave it (``a/../../x``)."""
    parts = relative.split("/")
    if relative.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\x00" in relative:
        raise ModelLoadError(f"object {relative[:200]!r} has a path that cannot be stored safely")
    return folder.joinpath(*parts)


__all__ = ["Pulled", "Puller", "default_cache_dir"]
