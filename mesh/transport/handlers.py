"""Registering servicers so that no request body can fail outside our code.

grpc's generated ``add_*Servicer_to_server`` decodes the request before the servicer runs; a
corrupt body then fails inside grpc and the caller gets UNKNOWN with no useful message. Here each
method is registered through a generic handler that receives the bytes and decodes them itself, so
a corrupt body is an INVALID_ARGUMENT naming the message type, like any other bad input.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass


def _serialize(message: Message) -> bytes:
    data: bytes = message.SerializeToString()
    return data


def _decoding(method: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Message]],
              request_cls: type[Message]) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[Message]]:
    parse = request_cls.FromString
    name = request_cls.DESCRIPTOR.full_name

    async def handler(body: bytes, context: grpc.aio.ServicerContext) -> Message:
        try:
            request = parse(body)
        except (DecodeError, RuntimeError, ValueError):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"malformed request: not a valid {name} message")
        return await method(request, context)

    return handler


def generic_handler(service: ServiceDescriptor, servicer: object,
                    raw: dict[str, grpc.RpcMethodHandler] | None = None) -> grpc.GenericRpcHandler:
    """A handler for every method of ``service`` implemented by ``servicer`` (methods named as in
    the .proto); ``raw`` supplies ready-made handlers for some methods (bytes pass-through)."""
    handlers: dict[str, grpc.RpcMethodHandler] = dict(raw or {})
    for method in service.methods:
        if method.name in handlers:
            continue
        request_cls = GetMessageClass(method.input_type)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            _decoding(getattr(servicer, method.name), request_cls), response_serializer=_serialize)
    return grpc.method_handlers_generic_handler(service.full_name, handlers)
