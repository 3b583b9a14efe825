"""Which namespaces the controller serves, in cluster scope: modelmesh-serving's ``modelmesh-enabled``
label. No I/O (the watch feeds it).

Three scopes, as modelmesh-serving has them (docs/kserve-notes.md section 7):

- **One namespace** (``controller.namespace`` set): that namespace only; nothing here is used.
- **Cluster, every namespace** (``controller.namespace`` empty, ``controller.namespace_label``
  empty): every object of every namespace.
- **Cluster, labelled namespaces** (``controller.namespace_label = "modelmesh-enabled"``, what
  modelmesh-serving does in cluster scope): a namespace is served when that label is exactly
  ``"true"`` and it is not terminating; the controller's own namespace (``home``) is served too
  unless it carries the label with another value. Objects in other namespaces are treated as
  absent: their vModels are removed once, and they come back when the label does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from mesh.controller.events import WatchEvent


class NamespaceFilter:
    """The served namespaces, from a watch of Namespace objects."""

    def __init__(self, label: str, home: str = "") -> None:
        self.label = label
        self.home = home
        self._labels: dict[str, str | None] = {}  # namespace -> the label's value (None: no label)
        self._terminating: set[str] = set()
        self.synced = asyncio.Event()  # set by the watch's first list

    def enabled(self, namespace: str) -> bool:
        if not self.label:
            return True
        value = self._labels.get(namespace)
        if namespace in self._terminating:
            return False
        if value is None:
            return namespace == self.home
        return value == "true"

    def apply(self, event: WatchEvent) -> set[str]:
        """A watch event of Namespaces; the namespaces whose served state changed."""
        before = {ns: self.enabled(ns) for ns in {*self._labels, self.home}}
        if event.type == "SYNC":
            self._labels.clear()
            self._terminating.clear()
            for obj in event.objects:
                self._observe(obj)
        elif event.object is not None:
            name = _name(event.object)
            if event.type == "DELETED":
                self._labels.pop(name, None)
                self._terminating.discard(name)
            else:
                self._observe(event.object)
        after = {*self._labels, self.home, *before}
        return {ns for ns in after if before.get(ns, ns == self.home or not self.label) != self.enabled(ns)}

    def _observe(self, obj: Mapping[str, Any]) -> None:
        name = _name(obj)
        labels = (obj.get("metadata") or {}).get("labels") or {}
        value = labels.get(self.label) if isinstance(labels, Mapping) else None
        self._labels[name] = str(value) if value is not None else None
        if (obj.get("status") or {}).get("phase") == "Terminating":
            self._terminating.add(name)
        else:
            self._terminating.discard(name)


def _name(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("name") or "")


__all__ = ["NamespaceFilter"]
