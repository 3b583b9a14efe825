"""A router's view, observed from outside: its route stream (``mmesh.ModelMeshRoutes/watchRoutes``).

A router serves the loaded copies of models as a stream of route changes (``mesh.router.routes``,
what ``mesh.client.SmartClient`` follows). :class:`RouteProbe` follows one router's stream the way
the smart client does (one request, then an acknowledgement right after each update: the router
sends at most ``WINDOW`` = 4 unacknowledged) and notes, for every model, the first time the stream
showed it *with* copies and the first time it showed it *without* (``time.monotonic()``, comparable
with other processes' on Linux). A snapshot (``reset``) counts too, as the difference from what
was held, so a stream the router resynced loses nothing.

What this times is the router's view plus the route hub's tick (``router.routes_interval_s``,
50 ms by default: the hub compares its table with the view at most that often) plus one message:
what a smart client sees, and an upper bound on when the router's own routing saw the change.
"""

from __future__ import annotations

import asyncio
import time

import grpc

from mesh.gen.mmesh import routes_pb2 as rp

WATCH = "/mmesh.ModelMeshRoutes/watchRoutes"


class RouteProbe:
    def __init__(self, name: str, endpoint: str) -> None:
        self.name = name
        self.endpoint = endpoint
        self.table: dict[str, bool] = {}  # model -> has copies (models without copies are dropped)
        self.appeared: dict[str, float] = {}  # model -> first time shown with copies
        self.went: dict[str, float] = {}  # model -> first time shown without copies, after having had some
        self.updates = 0
        self._before: dict[str, bool] = {}  # the table before a snapshot that is still arriving
        self.resets = 0
        self.synced = asyncio.Event()
        self.error: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._channel: grpc.aio.Channel | None = None

    def start(self) -> None:
        self._channel = grpc.aio.insecure_channel(self.endpoint, options=[
            ("grpc.max_receive_message_length", 64 * 2**20)])
        self._task = asyncio.get_running_loop().create_task(self._follow(), name=f"route-probe-{self.name}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        if self._channel is not None:
            await self._channel.close()

    def loaded(self) -> set[str]:
        return {m for m, has in self.table.items() if has}

    async def _follow(self) -> None:
        assert self._channel is not None
        watch = self._channel.stream_stream(WATCH, request_serializer=rp.WatchRoutesRequest.SerializeToString,
                                            response_deserializer=rp.RoutesUpdate.FromString)
        call = watch()
        try:
            await call.write(rp.WatchRoutesRequest())
            while True:
                update = await call.read()
                now = time.monotonic()
                if update is grpc.aio.EOF:
                    self.error = "the router ended the stream"
                    return
                await call.write(rp.WatchRoutesRequest(ack=update.sequence))  # ack first: the router waits
                self._apply(update, now)
        except grpc.aio.AioRpcError as err:
            self.error = f"{err.code().name}: {err.details()}"
        finally:
            call.cancel()

    def _apply(self, update: rp.RoutesUpdate, now: float) -> None:
        self.updates += 1
        if update.reset:  # a snapshot, maybe over several messages: it ends with the synced one
            self.resets += 1
            self._before, self.table = self.table, {}
        for entry in update.models:
            if entry.copies:
                if not self.table.get(entry.modelId):
                    self.appeared.setdefault(entry.modelId, now)
                self.table[entry.modelId] = True
            elif self.table.pop(entry.modelId, False) or entry.modelId in self.appeared:
                self._went(entry.modelId, now)
        if update.synced:
            for model in self._before:  # held before the snapshot, absent from it: gone
                if model not in self.table:
                    self._went(model, now)
            self._before = {}
            self.synced.set()

    def _went(self, model: str, now: float) -> None:
        self.went.setdefault(model, now)
