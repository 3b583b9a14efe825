"""Copies whose predictions run outside the runtime's process (issue 13).

A model worker (``mesh.runtime.workers``) or an external model server (``mesh.runtime.servers``)
executes the model's code; the runtime keeps the copy's place in the cache (its size, eviction,
single flight, the load journal) and hands each request's bytes on unchanged: the worker or
server decodes, predicts and encodes. :class:`ForwardingModel` is what the cache holds for such a
copy: its ``forward`` is awaited on the event loop, so a forwarded request costs no thread of the
runtime's, and its answer is the serialized ``ModelInferResponse`` as the other process wrote it.

:class:`CopyLost` is the one failure the service treats apart: the process holding the copy died
or forgot it (a worker crashed, an external server restarted). The copy is dropped from the cache
and, where the request may load, the model is loaded again and the request answered from there;
otherwise the router retries elsewhere ("not here").
"""

from __future__ import annotations

import abc
from collections.abc import Mapping

import numpy as np

from mesh.errors import MeshError, NotHere
from mesh.runtime.loaders.base import LoadedModel


class CopyLost(NotHere):
    """The process that held the copy died or no longer has the model: load it again."""


class ForwardingModel(LoadedModel):
    """A copy held by another process; the runtime forwards inference bytes to it."""

    # Whether the runtime's dynamic batching (mesh.runtime.batching) may merge requests for it into
    # one forwarded request: a model worker's copy, yes (it runs our loaders); an external
    # server's, no (it has its own batching, and its model names and limits are its own).
    mergeable = False

    @property
    def lost(self) -> bool:
        """The process holding the copy died (or went down) since the load: the copy is gone."""
        return False

    @abc.abstractmethod
    async def forward(self, body: bytes) -> bytes:
        """The serialized ``ModelInferResponse`` for the serialized ``ModelInferRequest`` ``body``.
        MeshError subclasses for the other side's answers (InvalidArgument for a bad request,
        CopyLost when the copy is gone, DeadlineExceeded past the prediction timeout)."""

    def _predict(self, inputs: Mapping[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        raise MeshError("a forwarded copy answers forward() only: its code runs in another process")


__all__ = ["CopyLost", "ForwardingModel"]
