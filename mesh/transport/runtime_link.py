"""The router's gRPC link to runtimes for forwarded requests: one try on one instance.

The data plane (``mesh.router.dataplane``) decides where a request goes and whether to try again;
this module only carries it there and says how it went, in the mesh's own terms:

- the runtime's answer: the response bytes, or ``RemoteError`` with its code and message;
- ``RetryElsewhere(gone=False)``: the runtime answered that the copy is not here (evicted
  meanwhile; marked by ``NOT_HERE_KEY`` in the trailers or the multiplexed frame);
- ``RetryElsewhere(gone=True)``: no answer from the runtime at all (connection refused or reset,
  its stream broke);
- a missed deadline (no answer before the client's deadline, where the runtime's own
  DEADLINE_EXCEEDED carries ``ORIGIN_KEY``) is a ``RemoteError`` too, and ``on_missed_deadline``
  is told the instance, so that it is probed (``mesh.router.reachability``).

Inference bodies that fit a frame travel on the multiplexed streams (``mesh.transport.multiplex``),
others as unary calls on one cached multicallable per endpoint and method.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

from mesh.errors import Code, RemoteError, RetryElsewhere
from mesh.registry.records import ModelSpec
from mesh.transport.metadata import LOAD_MODE, MODEL_ID
from mesh.transport.multiplex import MAX_FRAME_BODY, MultiplexPool, StreamError, StreamGone
from mesh.transport.server import ChannelPool
from mesh.transport.status import MESH_CODES, NOT_HERE_KEY, ORIGIN_KEY, lost_peer

INFER = "/inference.GRPCInferenceService/ModelInfer"
_DENY = ((LOAD_MODE, "deny"),)


def _remote(code: grpc.StatusCode, message: str) -> RemoteError:
    return RemoteError(MESH_CODES.get(code, Code.UNKNOWN), message)


class RuntimeLink:
    def __init__(self, channels: ChannelPool, *, streams_per_runtime: int = 2) -> None:
        self.channels = channels
        self._calls: dict[str, grpc.aio.UnaryUnaryMultiCallable] = {}
        self.multiplex = (MultiplexPool(streams_per_runtime, channels.max_message_bytes)
                          if streams_per_runtime > 0 else None)
        # Told of an instance that gave no answer before a request's deadline.
        self.on_missed_deadline: Callable[[str], None] | None = None

    def _call(self, endpoint: str, method: str) -> grpc.aio.UnaryUnaryMultiCallable:
        key = endpoint + method
        call = self._calls.get(key)
        if call is None:
            call = self.channels.get(endpoint).unary_unary(method)
            self._calls[key] = call
        return call

    def forget(self, endpoint: str) -> None:
        """Drop what is cached for ``endpoint`` (its streams: requests on them are retried)."""
        for key in [k for k in self._calls if k.startswith(endpoint + "/")]:
            del self._calls[key]
        if self.multiplex is not None:
            self.multiplex.discard(endpoint)

    def close(self) -> None:
        if self.multiplex is not None:
            self.multiplex.close()

    async def call(self, instance_id: str, endpoint: str, allow_load: bool, method: str, model_id: str,
                   body: bytes, metadata: tuple[tuple[str, str | bytes], ...], timeout: float | None,
                   spec: ModelSpec | None) -> bytes:
        """Send ``body`` to ``model_id`` on one instance; ``allow_load`` False: the copy is believed
        loaded there, so a miss answers "not here" instead of loading."""
        try:
            if self.multiplex is not None and method == INFER and len(body) <= MAX_FRAME_BODY:
                # A request that may load carries the registration, saving the runtime a read.
                spec_json = spec.to_json() if spec is not None and allow_load else b""
                return await self.multiplex.call(endpoint, self.channels.get(endpoint), model_id, allow_load,
                                                 metadata, body, timeout, spec_json)
            # gRPC metadata values are printable ASCII; any other ID travels in the -bin form.
            selection = ((MODEL_ID, model_id) if model_id.isascii() and model_id.isprintable()
                         else (MODEL_ID + "-bin", model_id.encode("utf-8", "surrogatepass")))
            outgoing = (selection, *metadata)
            if not allow_load:
                outgoing += _DENY
            response: bytes = await self._call(endpoint, method)(body, metadata=outgoing, timeout=timeout)
            return response
        except StreamError as err:
            remote = _remote(err.code, err.message)
            if err.not_here:
                raise RetryElsewhere(remote, gone=False) from None
            raise remote from None
        except StreamGone as err:
            raise RetryElsewhere(RemoteError(Code.UNAVAILABLE, f"runtime {instance_id}: {err}"),
                                 gone=True) from None
        except TimeoutError:
            # No answer at all before the client's deadline (a runtime's own DEADLINE_EXCEEDED
            # arrives as a StreamError): is the runtime still there?
            if self.on_missed_deadline is not None:
                self.on_missed_deadline(instance_id)
            raise RemoteError(Code.DEADLINE_EXCEEDED, f"model {model_id!r}: deadline exceeded") from None
        except grpc.aio.AioRpcError as err:
            trailers = err.trailing_metadata() or ()
            remote = _remote(err.code(), err.details() or "")
            if any(key == NOT_HERE_KEY for key, _ in trailers):
                raise RetryElsewhere(remote, gone=False) from None
            if lost_peer(err):
                raise RetryElsewhere(remote, gone=True) from None
            if (err.code() is grpc.StatusCode.DEADLINE_EXCEEDED and self.on_missed_deadline is not None
                    and not any(key == ORIGIN_KEY for key, _ in trailers)):
                self.on_missed_deadline(instance_id)  # the unary path's missed deadline
            raise remote from None
