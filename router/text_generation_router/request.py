"""Plain data passed between validation, the scheduler and the servicer.

Stop reasons are the public ``fmaas.StopReason`` numbers so they flow into
responses unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
from text_generation_server.pb.fmaas import generation_pb2 as fmaas


@dataclass(frozen=True)
class SamplingConfig:
    """How the shard picks each token (already mapped from TGIS semantics)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    typical_p: float = 1.0
    seed: int = 0
    repetition_penalty: float = 1.0


@dataclass(frozen=True)
class ResponseConfig:
    """Which optional fields the client asked for."""

    input_text: bool = False
    generated_tokens: bool = False
    input_tokens: bool = False
    token_logprobs: bool = False
    token_ranks: bool = False
    top_n_tokens: int = 0


@dataclass(frozen=True)
class ValidatedRequest:
    """One prompt that passed validation, tokenized and truncated, with resolved limits."""

    text: str
    input_ids: tuple[int, ...]
    sampling: SamplingConfig
    max_new_tokens: int
    min_new_tokens: int = 0
    # max_new_tokens was lowered to fit max_total_tokens: hitting it is TOKEN_LIMIT, not MAX_TOKENS
    max_is_token_limit: bool = False
    stop_sequences: tuple[str, ...] = ()
    include_stop_sequence: bool = True
    time_limit_ms: int = 0
    response: ResponseConfig = field(default_factory=ResponseConfig)

    @property
    def input_length(self) -> int:
        return len(self.input_ids)

    @property
    def seed_reported(self) -> int:
        """The seed clients see: the sampling seed, 0 for greedy requests."""
        return self.sampling.seed if self.sampling.do_sample else 0


@dataclass(frozen=True)
class TokenOut:
    """One token as the shard reported it."""

    token_id: int
    logprob: float = 0.0
    rank: int = 0
    top_tokens: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class InputTokens:
    """The prompt tokens with their logprobs (sent once, after prefill, when asked)."""

    tokens: tuple[TokenOut, ...]


@dataclass(frozen=True)
class Step:
    """Progress of one request: a new token and/or its end.

    ``text`` is the new text since the previous Step. ``token`` is None when
    the request ended without a new token (cancelled, time limit in the queue).
    """

    token: TokenOut | None
    text: str
    generated_tokens: int
    stop_reason: int = fmaas.NOT_FINISHED
    stop_sequence: str = ""

    @property
    def finished(self) -> bool:
        return self.stop_reason != fmaas.NOT_FINISHED


@dataclass(frozen=True)
class Failure:
    """The request failed; the servicer ends the RPC with this status."""

    code: grpc.StatusCode
    message: str


Event = InputTokens | Step | Failure
