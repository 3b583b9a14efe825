"""Reading the model selection headers: ``mm-model-id`` / ``mm-vmodel-id`` and their ``-bin`` forms.

gRPC hands ``-bin`` header values over already base64-decoded, as bytes; they must be UTF-8.
"""

from __future__ import annotations

from collections.abc import Iterable

from mesh.errors import InvalidArgument

MODEL_ID = "mm-model-id"
VMODEL_ID = "mm-vmodel-id"
# Set by the router on forwarded requests: "deny" means the copy was believed loaded here, so a
# miss must answer "not here" instead of loading.
LOAD_MODE = "mesh-load"
# On SPI loadModel calls from a router: where the copy enters the runtime's eviction order (ms since
# the epoch), so that loads made ahead of traffic do not push out models in use.
LAST_USED = "mesh-last-used-ms"
# On SPI loadModel calls from a router, and on ensureLoaded calls to a router (`mesh model load
# --retry`): "1" asks to try the load again now, forgetting a remembered load failure of the model.
RETRY_FAILED = "mesh-retry-failed"
# On registerModel calls to a router (`mesh model register` sends it) and its SPI predictModelSize
# call to a runtime: "1" asks to check that the model's file or storage key exists there, without
# loading it.
CHECK_SOURCE = "mesh-check-source"

def flagged(metadata: Iterable[tuple[str, str | bytes]] | None, key: str) -> bool:
    """Whether a request carries ``key: 1`` (``RETRY_FAILED``, ``CHECK_SOURCE``)."""
    return (key, "1") in tuple(metadata or ())


_HEADERS = {MODEL_ID: (False, False), MODEL_ID + "-bin": (False, True),
            VMODEL_ID: (True, False), VMODEL_ID + "-bin": (True, True)}


def model_selection(metadata: Iterable[tuple[str, str | bytes]] | None) -> tuple[str | None, bool, bool]:
    """(id, is_vmodel, load_allowed) from request metadata; id None when no header names one."""
    model_id: str | None = None
    is_vmodel = False
    load_allowed = True
    for key, value in metadata or ():
        spec = _HEADERS.get(key)
        if spec is not None:
            vmodel, binary = spec
            if isinstance(value, bytes):
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError:
                    raise InvalidArgument(f"header {key}: value is not valid UTF-8") from None
            elif binary:
                raise InvalidArgument(f"header {key}: expected binary metadata")
            if model_id is None or (vmodel and not is_vmodel):
                model_id, is_vmodel = value, vmodel
        elif key == LOAD_MODE:
            load_allowed = value != "deny"
    return model_id, is_vmodel, load_allowed
