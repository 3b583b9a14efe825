"""What the watch hands the controller (one object's change, or a whole list after a (re)list), and
the Kubernetes Events it records (core/v1 ``Event`` bodies; kube.EventApi creates them)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

COMPONENT = "mesh-controller"


@dataclass(frozen=True)
class WatchEvent:
    type: str  # SYNC (a full list), ADDED, MODIFIED, DELETED
    object: dict[str, Any] | None = None
    objects: list[dict[str, Any]] = field(default_factory=list)


def warning_event(involved: Mapping[str, Any], namespace: str, reason: str, message: str,
                  now: datetime) -> dict[str, Any]:
    """A Warning Event about ``involved`` (``apiVersion``, ``kind``, ``name``, and ``namespace`` and
    ``uid`` when it has them), recorded in ``namespace``; the message bounded as the API server's."""
    stamp = now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{str(involved.get('name', ''))[:200]}.", "namespace": namespace},
            "involvedObject": dict(involved), "type": "Warning", "reason": reason, "message": message[:1024],
            "source": {"component": COMPONENT}, "reportingComponent": COMPONENT,
            "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1}


def involved_object(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The ``involvedObject`` of an Event about ``obj`` (a Predictor, an InferenceService...)."""
    meta = obj.get("metadata") or {}
    out = {"apiVersion": str(obj.get("apiVersion") or ""), "kind": str(obj.get("kind") or ""),
           "name": str(meta.get("name") or "")}
    for name in ("namespace", "uid"):
        if meta.get(name):
            out[name] = str(meta[name])
    return out
