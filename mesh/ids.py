"""Rules for model and vModel IDs, shared by every component that accepts one."""

from __future__ import annotations

from mesh.errors import InvalidArgument

MAX_MODEL_ID_BYTES = 1024


def check_model_id(model_id: str, what: str = "model") -> str:
    """The ID itself, or InvalidArgument: empty, over 1 KiB of UTF-8, or containing NUL."""
    if not model_id:
        raise InvalidArgument(f"no {what} given: set the mm-model-id header or model_name")
    size = len(model_id.encode("utf-8", "surrogatepass"))
    if size > MAX_MODEL_ID_BYTES:
        raise InvalidArgument(f"{what} ID is {size} bytes long; the limit is {MAX_MODEL_ID_BYTES}")
    if "\x00" in model_id:
        raise InvalidArgument(f"{what} ID contains a NUL character")
    return model_id
