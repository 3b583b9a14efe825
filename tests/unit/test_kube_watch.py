"""The controller's list-then-watch thread (mesh.controller.kube.PredictorWatcher) on a scripted API:
what a refused or missing resource type delivers."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

from kubernetes.client.exceptions import ApiException

from mesh.controller.events import WatchEvent
from mesh.controller.kube import Gone, PredictorWatcher


class ScriptedApi:
    """Lists answer from ``lists`` in turn (an exception is raised); every watch ends at once with 410."""

    plural = "clusterservingruntimes"
    host = "http://scripted"

    def __init__(self, lists: list[Any]) -> None:
        self.lists = lists
        self.calls = 0

    def list(self) -> tuple[list[dict[str, Any]], str]:
        answer = self.lists[min(self.calls, len(self.lists) - 1)]
        self.calls += 1
        if isinstance(answer, Exception):
            raise answer
        return answer, str(self.calls)

    def watch(self, w: Any, version: str, timeout_s: int) -> Iterator[dict[str, Any]]:
        time.sleep(0.01)
        raise Gone("expired")
        yield {}  # a generator, as the real one


def run(api: ScriptedApi, until_calls: int) -> list[WatchEvent]:
    events: list[WatchEvent] = []
    done = threading.Event()

    def deliver(event: WatchEvent) -> None:
        events.append(event)

    watcher = PredictorWatcher(api, deliver, backoff_max_s=0.01)  # type: ignore[arg-type]
    watcher.start()
    deadline = time.monotonic() + 5
    while api.calls < until_calls and time.monotonic() < deadline:
        done.wait(0.01)
    watcher.stop()
    return events


def test_a_refusal_after_a_list_keeps_what_was_known() -> None:
    """403 on a relist (RBAC being changed) is retried; it never reports every object gone (a
    managed runtime's StatefulSet would be deleted)."""
    obj = {"metadata": {"name": "mesh-runtime"}}
    events = run(ScriptedApi([[obj], ApiException(status=403, reason="Forbidden"), [obj]]), until_calls=4)
    syncs = [e.objects for e in events if e.type == "SYNC"]
    assert syncs and all(objects == [obj] for objects in syncs), syncs


def test_a_resource_never_readable_lists_as_empty() -> None:
    """No CRD (404) or no permission from the start (403): in sync with nothing, checked again later."""
    for status in (403, 404):
        events = run(ScriptedApi([ApiException(status=status, reason="x")]), until_calls=2)
        assert [e.objects for e in events if e.type == "SYNC"] == [[]], status
