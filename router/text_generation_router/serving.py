"""The request path every public API shares: availability, payload limit, admission, validation.

The TGIS gRPC service and the HTTP API (TGI's routes and the OpenAI-compatible
ones) each turn their own request shapes into texts plus ``fmaas.Parameters``
and go through these steps in the same order, so a limit, an error or a
metric means the same thing whichever API a client uses. Errors carry gRPC's
canonical status codes (the gRPC service sends them as they are; the HTTP
API maps them to HTTP statuses); ``api`` labels the metrics (grpc, http,
openai).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
from loguru import logger
from text_generation_server.pb.fmaas import generation_pb2 as fmaas

from .config import Limits
from .metrics import RouterMetrics
from .request import ValidatedRequest
from .scheduler import Scheduler
from .tokenization import Tokenizer
from .validation import ValidationError, Validator


class ApiError(Exception):
    """Ends a call with ``code`` (gRPC's canonical codes, mapped to HTTP statuses there) and ``message``."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class ServingState:
    """What the handlers need; limits, validator and scheduler exist once the shards are warm."""

    tokenizer: Tokenizer
    metrics: RouterMetrics
    limits: Limits | None = None
    validator: Validator | None = None
    scheduler: Scheduler | None = None
    draining: bool = False
    in_flight: int = 0
    # What the shards report (Info), for HTTP /info: filled in once they answer.
    model_id: str = ""
    model_dtype: str = ""
    model_device_type: str = ""
    max_client_batch_size: int = 4
    version: str = ""
    started_at: int = 0

    @property
    def system_fingerprint(self) -> str:
        """What OpenAI's responses carry as system_fingerprint: version and dtype."""
        return f"{self.version}-{self.model_dtype or 'unknown'}"

    @property
    def model_owner(self) -> str:
        """The organisation of a hub model id (ORG/NAME), else this server's name."""
        return self.model_id.split("/", 1)[0] if "/" in self.model_id else "text-generation-server"

    def check_available(self) -> None:
        if self.draining:
            raise ApiError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry on another replica")
        if self.scheduler is not None and self.scheduler.failed:
            raise ApiError(grpc.StatusCode.UNAVAILABLE, f"the model shards are unavailable: {self.scheduler.failed}")
        if self.scheduler is None or self.validator is None or self.limits is None:
            raise ApiError(
                grpc.StatusCode.UNAVAILABLE,
                "the model is still loading or warming up; retry when health reports SERVING",
            )

    def check_payload(self, texts: list[str]) -> None:
        """Refuse a call whose texts exceed --payload-limit bytes, before any is tokenized."""
        limit = self.limits.payload_limit
        total = 0
        for text in texts:
            # A text has at least as many UTF-8 bytes as characters: a huge one is refused uncopied.
            total += len(text) if len(text) > limit else len(text.encode("utf-8", "surrogatepass"))
            if total > limit:
                raise ValidationError(
                    f"the texts of this call carry more than {limit} bytes (at least {total}); "
                    f"--payload-limit allows {limit} bytes per call: send less text or raise the limit"
                )

    @contextlib.contextmanager
    def admit(self, prompts: int, *, api: str, who: str = "", log=logger) -> Iterator[None]:
        """Count prompts against --max-concurrent-requests for the life of the call."""
        self.check_available()
        limit = self.limits.max_concurrent_requests
        if self.in_flight + prompts > limit:
            self.metrics.request_failure.labels(err="conc_limit", api=api).inc(prompts)
            log.warning(
                f"Model is overloaded: {self.in_flight} prompts in flight, limit {limit}; "
                f"refused a call of {prompts}{who}"
            )
            raise ApiError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"Model is overloaded: {self.in_flight} prompts in flight and this call adds {prompts}; "
                f"the limit is {limit} (--max-concurrent-requests)",
            )
        self.in_flight += prompts
        self.metrics.request_input_count.inc(prompts)
        try:
            yield
        finally:
            self.in_flight -= prompts

    async def validate(
        self, texts: list[str], params: fmaas.Parameters, *, adapter_id: str = "", add_special_tokens: bool = True
    ) -> list[ValidatedRequest]:
        """The validator's answer for one call, timed into tgi_request_validation_duration."""
        start = time.monotonic()
        validated = await self.validator.validate(
            texts, params, adapter_id=adapter_id, add_special_tokens=add_special_tokens
        )
        self.metrics.request_validation_duration.observe(time.monotonic() - start)
        return validated
