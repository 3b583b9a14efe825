"""The served namespaces in cluster scope: modelmesh-serving's modelmesh-enabled label
(mesh.controller.namespaces)."""

from __future__ import annotations

from typing import Any

from mesh.controller.events import WatchEvent
from mesh.controller.namespaces import NamespaceFilter

LABEL = "modelmesh-enabled"


def ns(name: str, value: str | None = None, *, terminating: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if value is not None:
        meta["labels"] = {LABEL: value}
    return {"metadata": meta, "status": {"phase": "Terminating" if terminating else "Active"}}


def test_labelled_namespaces_and_the_home_one_are_served() -> None:
    f = NamespaceFilter(LABEL, home="mesh-serving")
    changed = f.apply(WatchEvent("SYNC", objects=[ns("mesh-serving"), ns("team-a", "true"), ns("team-b"),
                                                  ns("team-c", "True"), ns("team-d", "true", terminating=True)]))
    assert changed == {"team-a"}
    assert f.enabled("mesh-serving") and f.enabled("team-a")
    assert not f.enabled("team-b") and not f.enabled("team-c")  # exactly "true"
    assert not f.enabled("team-d")  # terminating
    assert not f.enabled("never-seen")

    assert f.apply(WatchEvent("MODIFIED", object=ns("team-b", "true"))) == {"team-b"}
    assert f.enabled("team-b")
    assert f.apply(WatchEvent("MODIFIED", object=ns("mesh-serving", "false"))) == {"mesh-serving"}
    assert not f.enabled("mesh-serving")  # the label says otherwise, even for its own namespace
    assert f.apply(WatchEvent("DELETED", object=ns("team-a", "true"))) == {"team-a"}
    assert f.apply(WatchEvent("MODIFIED", object=ns("team-x"))) == set()


def test_without_a_label_every_namespace_is_served() -> None:
    f = NamespaceFilter("")
    assert f.apply(WatchEvent("SYNC", objects=[ns("a"), ns("b", "false")])) == set()
    assert f.enabled("a") and f.enabled("b") and f.enabled("anything")
