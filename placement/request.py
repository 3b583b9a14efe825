"""One request of a trace: the unit every generator produces and every simulator consumes."""

from __future__ import annotations

from typing import NamedTuple


class Request(NamedTuple):
    """A request for ``model_id`` at ``time_s`` (seconds from the start of the trace).

    ``size_bytes`` is the model's in-memory size and ``load_ms`` what loading it costs (a miss);
    ``infer_ms`` is the inference time when the trace knows it (0.0 when it does not).
    A NamedTuple rather than a dataclass: millions are created and read per replay.
    """

    time_s: float
    model_id: str
    size_bytes: int
    load_ms: float
    infer_ms: float = 0.0
