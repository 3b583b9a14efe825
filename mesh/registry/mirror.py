"""A prefix of the registry kept current in memory by a watch (the router's view of the cluster).

:class:`PrefixMirror` lists the prefix, then watches from the listed revision + 1, so no change falls
between the two. It keeps ``items`` and calls the owner's callbacks (plain sync callables, run on the
event loop; an exception in one is logged and the mirror goes on).

Decisions:

* **Initial state through on_put.** ``start()`` calls ``on_put`` for every listed item, in key order,
  before it returns. After a :class:`~mesh.registry.base.WatchReset` (history compacted) the mirror
  diffs the snapshot against ``items`` and calls ``on_delete``/``on_put`` for what changed, then
  ``on_reset`` if given. So an owner that implements only ``on_put`` and ``on_delete`` is always right;
  ``on_reset`` is a notification. A ``start()`` after ``stop()`` diffs the new listing the same way.
* **Paged listing.** The initial list is read in pages (``page_size`` keys each) to bound the size of
  one response. Pages are read at different revisions, so the watch starts after the *first* page's
  revision and replays what changed during the listing; replayed events are recognised by
  ``mod_revision`` (a PUT older than the item held, or a DELETE older than it, is skipped).
* **Events-only mode** (``keep_items=False``) lists nothing and stores nothing: it watches from the
  current revision and forwards events. It is for prefixes too large to hold (the router's
  invalidation watch on ``models/``, 100k+ keys). A reset cannot be diffed without items, so there
  ``on_reset`` is required and receives the snapshot: the owner must drop everything it derived.
* Items updated by the watch carry ``lease=0`` (watch events do not report leases) and keep the
  ``create_revision`` they had (the revision of the first PUT seen, for a key new to the mirror).
* ``revision`` is the store revision up to which the mirror is known to be current.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

import structlog

from mesh.errors import BadRecord, InvalidArgument
from mesh.registry.base import EventType, KeyValue, KVStore, WatchEvent, WatchReset
from mesh.tasks import cancel_and_wait, spawn

log = structlog.get_logger(__name__)

_T = TypeVar("_T")

OnPut = Callable[[KeyValue], None]
OnDelete = Callable[[str], None]
OnReset = Callable[[list[KeyValue]], None]


class PrefixMirror:
    def __init__(
        self,
        store: KVStore,
        prefix: str,
        on_put: OnPut | None = None,
        on_delete: OnDelete | None = None,
        on_reset: OnReset | None = None,
        *,
        keep_items: bool = True,
        page_size: int = 5_000,
        restart_backoff_s: tuple[float, float] = (0.5, 10.0),
    ) -> None:
        if not keep_items and on_reset is None:
            raise InvalidArgument(
                "an events-only mirror needs on_reset: without items it cannot diff a reset"
            )
        self.store = store
        self.prefix = prefix
        self.keep_items = keep_items
        self.items: dict[str, KeyValue] = {}
        self.revision = 0
        self._on_put = on_put
        self._on_delete = on_delete
        self._on_reset = on_reset
        self._page_size = page_size
        self._backoff_initial, self._backoff_max = restart_backoff_s
        self._ready = False
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._log = log.bind(prefix=prefix)

    @property
    def ready(self) -> bool:
        """True once the initial list is in and while the watch task runs."""
        return self._ready

    async def start(self) -> None:
        """List (unless events-only), call the callbacks, and start watching; raises
        RegistryUnavailable if the registry cannot be read."""
        if self._task is not None:
            return
        if self.keep_items:
            listed, self.revision = await self._list()
            self._replace(listed)
        else:
            self.revision = await self.store.current_revision(self.prefix)  # not a listing: a million keys
        self._ready = True
        self._notify()
        self._task = spawn(self._run(), name=f"mirror {self.prefix}")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        self._ready = False

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Return once ``predicate()`` is true; it is re-checked after every change the mirror applies."""
        while not predicate():
            await self._changed.wait()

    async def wait_for_revision(self, revision: int) -> None:
        await self.wait_until(lambda: self.revision >= revision)

    # -- internals ------------------------------------------------------------------------------

    async def _list(self) -> tuple[list[KeyValue], int]:
        """Every item under the prefix, and the revision of the first page (see the module doc)."""
        items: list[KeyValue] = []
        first_revision = 0
        start_after = ""
        while True:
            page, revision = await self.store.get_prefix(
                self.prefix, limit=self._page_size, start_after=start_after
            )
            first_revision = first_revision or revision
            items.extend(page)
            if len(page) < self._page_size:
                return items, first_revision
            start_after = page[-1].key

    async def _run(self) -> None:
        backoff = self._backoff_initial
        while True:
            try:
                async for item in self.store.watch_prefix(self.prefix, start_revision=self.revision + 1):
                    if isinstance(item, WatchReset):
                        self._reset(item)
                    else:
                        self._apply(item)
                    self._notify()
                    backoff = self._backoff_initial
                self._log.info("mirror watch ended: the store was closed")
                self._ready = False
                return
            except Exception:
                # The store's watch resumes by itself; reaching here is a bug or an unexpected error.
                self._log.exception("mirror watch failed; restarting it", retry_in_s=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._backoff_max)

    def _apply(self, event: WatchEvent) -> None:
        self.revision = max(self.revision, event.mod_revision)
        if not self.keep_items:
            if event.type is EventType.PUT:
                self._call(self._on_put, KeyValue(event.key, event.value, event.mod_revision))
            else:
                self._call(self._on_delete, event.key)
            return
        current = self.items.get(event.key)
        if event.type is EventType.PUT:
            if current is not None and current.mod_revision >= event.mod_revision:
                return  # replayed from before the listing read this key
            created = current.create_revision if current is not None else event.mod_revision
            kv = KeyValue(event.key, event.value, event.mod_revision, created)
            self.items[event.key] = kv
            self._call(self._on_put, kv)
        else:
            if current is None or current.mod_revision > event.mod_revision:
                return  # already gone, or re-created after this delete
            del self.items[event.key]
            self._call(self._on_delete, event.key)

    def _reset(self, reset: WatchReset) -> None:
        self._log.info("mirror reset after compaction", revision=reset.revision, keys=len(reset.snapshot))
        if self.keep_items:
            self._replace(reset.snapshot)
        self._call(self._on_reset, reset.snapshot)
        self.revision = reset.revision

    def _replace(self, snapshot: list[KeyValue]) -> None:
        """Make ``items`` equal to ``snapshot``, calling back for each difference (in key order)."""
        fresh = {kv.key: kv for kv in snapshot}
        for key in [k for k in self.items if k not in fresh]:
            del self.items[key]
            self._call(self._on_delete, key)
        for key in sorted(fresh):
            kv, old = fresh[key], self.items.get(key)
            if old is None or old.mod_revision != kv.mod_revision:
                self.items[key] = kv
                self._call(self._on_put, kv)

    def _call(self, callback: Callable[[_T], None] | None, arg: _T) -> None:
        if callback is None:
            return
        try:
            callback(arg)
        except BadRecord as exc:  # a malformed value in the registry: skipped, counted where decoded
            key = arg.key if isinstance(arg, KeyValue) else ""
            self._log.warning("malformed registry record skipped", key=key[:300], reason=exc.message)
        except Exception:
            self._log.exception(
                "mirror callback failed", callback=getattr(callback, "__qualname__", callback)
            )

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
