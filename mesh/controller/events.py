"""What the watch hands the controller: one Predictor's change, or a whole list after a (re)list."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class WatchEvent:
    type: str  # SYNC (a full list), ADDED, MODIFIED, DELETED
    object: dict[str, Any] | None = None
    objects: list[dict[str, Any]] = field(default_factory=list)
