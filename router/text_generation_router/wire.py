"""Requests that do not decode (invalid UTF-8 in a string field, corrupt wire format) end INVALID_ARGUMENT.

grpc answers a request its deserializer rejects with UNKNOWN and the
exception's repr; a client cannot tell that from a server fault. This
interceptor wraps every unary-request method's deserializer so an
undecodable message reaches the method as a marker, and the method aborts
with INVALID_ARGUMENT naming the message type, before any handler code runs.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError


class _Undecodable:
    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


def _safe_deserializer(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def wrapped(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError as err:
            return _Undecodable(
                f"the request is not a valid protobuf message ({err}); string fields must be UTF-8"
            )

    return wrapped


def _unary_unary(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, _Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return await behavior(request, context)

    return wrapped


def _unary_stream(behavior: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            async for item in behavior(request, context):
                yield item

        return stream

    async def writer(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, _Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return await behavior(request, context)

    return writer


class UndecodableRequestInterceptor(grpc.aio.ServerInterceptor):
    """Turns requests that fail to deserialize into INVALID_ARGUMENT for unary-request methods."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None or handler.request_streaming:
            return handler
        deserializer = _safe_deserializer(handler.request_deserializer)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _unary_unary(handler.unary_unary),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _unary_stream(handler.unary_stream),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler
