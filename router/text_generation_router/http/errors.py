"""Errors as TGI answers them: ``{"error": message, "error_type": kind}`` with TGI's HTTP statuses.

422 validation (a request the server will not run), 429 overloaded
(--max-concurrent-requests), 424 generation (the shards failed while
generating), 503 unavailable (loading, draining, shards gone), 413 a body
over the payload limit, 401 authentication, 500 anything unexpected.
"""

from __future__ import annotations

import grpc
from loguru import logger

from ..serving import ApiError
from ..validation import ValidationError

_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: (422, "validation"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "overloaded"),
    grpc.StatusCode.UNAVAILABLE: (503, "unavailable"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
    grpc.StatusCode.INTERNAL: (424, "generation"),
    grpc.StatusCode.FAILED_PRECONDITION: (424, "generation"),
}


def error_body(err: BaseException) -> tuple[int, dict]:
    """(HTTP status, TGI error body) of an exception raised on the request path."""
    if isinstance(err, ValidationError):
        return 422, {"error": str(err), "error_type": "validation"}
    if isinstance(err, ApiError):
        status, kind = _BY_CODE.get(err.code, (500, "internal"))
        return status, {"error": err.message, "error_type": kind}
    logger.opt(exception=err).error(f"HTTP request failed unexpectedly: {type(err).__name__}: {err}")
    return 500, {"error": f"internal error: {type(err).__name__}: {err}", "error_type": "internal"}
