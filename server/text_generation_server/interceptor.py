"""Exceptions leave the shard as gRPC status codes, mapped once, here.

The router acts on the code: RESOURCE_EXHAUSTED (KV cache full) means retry
later, NOT_FOUND / INVALID_ARGUMENT mean it sent something the shard does
not hold or cannot run, INTERNAL means the shard failed (its log has the
traceback).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import torch
from loguru import logger

from text_generation_server.engine.generator import BatchNotFoundError
from text_generation_server.engine.kv_cache import CacheFullError


def status_for(error: BaseException) -> grpc.StatusCode:
    """The status code an exception from the engine maps to."""
    if isinstance(error, CacheFullError | torch.OutOfMemoryError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(error, BatchNotFoundError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(error, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL


class ExceptionInterceptor(grpc.aio.ServerInterceptor):
    """Turns any exception a unary handler raises into a status code and a message."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary
        method = handler_call_details.method.rsplit("/", 1)[-1]

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await inner(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as error:  # the one place engine errors become status codes
                code = status_for(error)
                message = str(error) or type(error).__name__
                if code == grpc.StatusCode.INTERNAL:
                    logger.opt(exception=error).error(
                        f"{method} failed: {type(error).__name__}: {message}"
                    )
                    message = f"{type(error).__name__}: {message}"
                else:
                    logger.warning(f"{method} refused ({code.name}): {message}")
                await context.abort(code, message)

        return grpc.unary_unary_rpc_method_handler(
            guarded,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
