"""Request validation: TGIS parameters in, ValidatedRequests (or one clear error) out.

Semantics follow TGIS: ``max_new_tokens`` 0 means the server default;
sampling parameters count only with method SAMPLE (they are ignored, not
rejected, for GREEDY); with SAMPLE an unset temperature is 1.0 and an
explicit 0.0 means greedy, and a positive one must be at least
:data:`MIN_TEMPERATURE` (as must a repetition penalty); ``top_p``/``typical_p``/``repetition_penalty`` 0
mean disabled; a sampling request without a seed gets a random 32-bit one,
reported back; an input that does not leave room for max_new_tokens gets
max_new_tokens lowered so input + output fits max_total_tokens, and then
stops with TOKEN_LIMIT. Every error names the field and what is allowed.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

from text_generation_server.pb.fmaas import generation_pb2 as fmaas

from .config import Limits
from .request import ResponseConfig, SamplingConfig, ValidatedRequest
from .tokenization import Tokenizer

# TGIS limits a stop sequence's length in UTF-8 bytes.
MAX_STOP_SEQUENCE_BYTES = 240
# Below these, logits divided by the temperature or penalty overflow float32 (inf - inf = NaN
# probabilities); TGIS refuses sampling temperatures below 0.05 too.
MIN_TEMPERATURE = 0.05
MIN_PENALTY = 0.05


class ValidationError(ValueError):
    """A request the server will not run; the message is returned as INVALID_ARGUMENT."""


@dataclass(frozen=True)
class _Params:
    """Parameters that are the same for every prompt of one call."""

    sampling: SamplingConfig
    random_seed: bool
    max_new_tokens: int
    min_new_tokens: int
    stop_sequences: tuple[str, ...]
    include_stop_sequence: bool
    time_limit_ms: int
    truncate_input_tokens: int
    response: ResponseConfig


def _finite(value: float) -> bool:
    return not math.isnan(value) and not math.isinf(value)


def refuse_adapter(adapter_id: str) -> None:
    """Raise ValidationError for any adapter or prompt prefix: this server serves one plain model."""
    if adapter_id:
        raise ValidationError(
            f"adapter_id/prefix_id {adapter_id[:100]!r}: this server has no adapters or prompt prefixes; leave it unset"
        )


class Validator:
    """Checks requests against the router's limits and tokenizes them."""

    def __init__(
        self,
        limits: Limits,
        tokenizer: Tokenizer,
        rng: random.Random | None = None,
        model_vocab_size: int | None = None,
    ) -> None:
        """``model_vocab_size``: the rows of the model's embedding (the shards' Info); a token id
        the tokenizer produces at or beyond it is refused here, in its own request, instead of
        failing the whole prefill batch it would join."""
        self._limits = limits
        self._tokenizer = tokenizer
        self._rng = rng or random.SystemRandom()
        self._vocab = model_vocab_size or None

    async def validate(
        self,
        texts: list[str],
        params: fmaas.Parameters,
        *,
        adapter_id: str = "",
        add_special_tokens: bool = True,
    ) -> list[ValidatedRequest]:
        """Validate one call's prompts; raise ValidationError on the first problem.

        ``add_special_tokens`` False for a text that already holds them (a rendered chat template).
        """
        refuse_adapter(adapter_id)
        checked = self._check_params(params)
        validated = []
        for index, text in enumerate(texts):
            where = f"requests[{index}]" if len(texts) > 1 else "request"
            validated.append(await self._validate_text(text, checked, where, add_special_tokens))
        return validated

    def _check_params(self, params: fmaas.Parameters) -> _Params:
        limits = self._limits
        response = params.response
        if response.top_n_tokens > limits.max_top_n_tokens:
            raise ValidationError(
                f"top_n_tokens must be <= {limits.max_top_n_tokens} (got {response.top_n_tokens})"
            )
        if (response.token_logprobs or response.token_ranks or response.top_n_tokens) and not (
            response.generated_tokens or response.input_tokens
        ):
            raise ValidationError(
                "token_logprobs, token_ranks and top_n_tokens need generated_tokens and/or input_tokens "
                "set in response options"
            )

        decoding = params.decoding
        repetition_penalty = decoding.repetition_penalty
        if not _finite(repetition_penalty) or repetition_penalty < 0 or 0 < repetition_penalty < MIN_PENALTY:
            raise ValidationError(
                f"repetition_penalty must be >= {MIN_PENALTY} and finite, or 0 for none (got {repetition_penalty})"
            )
        if decoding.HasField("length_penalty"):
            raise ValidationError("length_penalty is not supported by this server; leave it unset")
        guided = decoding.WhichOneof("guided")
        if guided is not None and not (guided == "format" and decoding.format == fmaas.DecodingParameters.TEXT):
            raise ValidationError(f"decoding.{guided} (guided decoding) is not supported by this server; leave it unset")

        stopping = params.stopping
        if stopping.max_new_tokens > limits.max_new_tokens:
            raise ValidationError(
                f"max_new_tokens must be <= {limits.max_new_tokens} (got {stopping.max_new_tokens})"
            )
        max_new_tokens = stopping.max_new_tokens or min(limits.default_max_new_tokens, limits.max_new_tokens)
        if stopping.min_new_tokens > max_new_tokens:
            raise ValidationError(
                f"min_new_tokens ({stopping.min_new_tokens}) must be <= max_new_tokens ({max_new_tokens})"
            )
        stops = tuple(stopping.stop_sequences)
        if len(stops) > limits.max_stop_sequences or any(
            not s or len(s.encode()) > MAX_STOP_SEQUENCE_BYTES for s in stops
        ):
            raise ValidationError(
                f"stop_sequences: at most {limits.max_stop_sequences} non-empty sequences of at most "
                f"{MAX_STOP_SEQUENCE_BYTES} UTF-8 bytes each (got {len(stops)}"
                f"{', one empty' if any(not s for s in stops) else ''})"
            )
        include_stop = (
            stopping.include_stop_sequence
            if stopping.HasField("include_stop_sequence")
            else limits.default_include_stop_sequence
        )

        sampling, random_seed = self._check_sampling(params, repetition_penalty or 1.0)
        return _Params(
            sampling=sampling,
            random_seed=random_seed,
            max_new_tokens=max_new_tokens,
            min_new_tokens=stopping.min_new_tokens,
            stop_sequences=stops,
            include_stop_sequence=include_stop,
            time_limit_ms=stopping.time_limit_millis,
            truncate_input_tokens=params.truncate_input_tokens,
            response=ResponseConfig(
                input_text=response.input_text,
                generated_tokens=response.generated_tokens,
                input_tokens=response.input_tokens,
                token_logprobs=response.token_logprobs,
                token_ranks=response.token_ranks,
                top_n_tokens=response.top_n_tokens,
            ),
        )

    @staticmethod
    def _check_sampling(params: fmaas.Parameters, repetition_penalty: float) -> tuple[SamplingConfig, bool]:
        """(sampling config, whether a random seed must be drawn per prompt)."""
        if params.method not in (fmaas.GREEDY, fmaas.SAMPLE):
            raise ValidationError(f"method must be GREEDY (0) or SAMPLE (1) (got {params.method})")
        greedy = SamplingConfig(do_sample=False, repetition_penalty=repetition_penalty)
        if params.method != fmaas.SAMPLE:
            return greedy, False
        s = params.sampling
        temperature = s.temperature if s.HasField("temperature") else 1.0
        if not _finite(temperature) or temperature < 0 or 0 < temperature < MIN_TEMPERATURE:
            raise ValidationError(
                f"temperature must be >= {MIN_TEMPERATURE} and finite, or 0 meaning greedy (got {temperature})"
            )
        if not _finite(s.top_p) or not 0 <= s.top_p <= 1:
            raise ValidationError(f"top_p must be > 0.0 and <= 1.0, or 0 for disabled (got {s.top_p})")
        if not _finite(s.typical_p) or not 0 <= s.typical_p <= 1:
            raise ValidationError(f"typical_p must be > 0.0 and <= 1.0, or 0 for disabled (got {s.typical_p})")
        if s.top_k < 0:
            raise ValidationError(f"top_k must be >= 0, 0 meaning disabled (got {s.top_k})")
        if temperature == 0.0:
            return greedy, False
        config = SamplingConfig(
            do_sample=True,
            temperature=temperature,
            top_k=s.top_k,
            top_p=s.top_p or 1.0,
            typical_p=s.typical_p or 1.0,
            seed=s.seed if s.HasField("seed") else 0,
            repetition_penalty=repetition_penalty,
        )
        return config, not s.HasField("seed")

    async def _validate_text(self, text: str, p: _Params, where: str, add_special_tokens: bool = True) -> ValidatedRequest:
        limits = self._limits
        if not text:
            raise ValidationError(f"{where}.text must not be empty")
        ids = (await self._tokenizer.encode_async(text, add_special_tokens=add_special_tokens)).ids
        if 0 < p.truncate_input_tokens < len(ids):
            ids = ids[-p.truncate_input_tokens :]
        if self._vocab is not None and ids and max(ids) >= self._vocab:
            bad = next(i for i in ids if i >= self._vocab)
            raise ValidationError(
                f"{where}: the tokenizer gave token id {bad} ({self._tokenizer.id_to_token(bad)!r}), outside the "
                f"model's vocabulary of {self._vocab} ids; the tokenizer does not match the model's embedding"
            )
        n = len(ids)
        if n > limits.max_input_tokens:
            raise ValidationError(
                f"{where}: input has {n} tokens but max_input_tokens is {limits.max_input_tokens}; "
                f"shorten the input or set truncate_input_tokens (HTTP: truncate; keeps the last N tokens)"
            )
        if n + p.min_new_tokens > limits.max_total_tokens:
            raise ValidationError(
                f"{where}: input tokens ({n}) plus min_new_tokens ({p.min_new_tokens}) must be <= "
                f"max_total_tokens ({limits.max_total_tokens})"
            )
        # The KV budget is held in whole blocks: a request whose input + min_new_tokens
        # rounds up past it could never be scheduled, so it is refused here, not queued forever.
        block = max(1, limits.block_size)
        budget = limits.max_batch_total_tokens // block * block
        if n + max(p.min_new_tokens, 1) > budget:
            raise ValidationError(
                f"{where}: input tokens ({n}) plus min_new_tokens ({max(p.min_new_tokens, 1)}) can never fit the "
                f"batch token budget ({limits.max_batch_total_tokens} tokens in blocks of {block}, "
                f"--max-batch-total-tokens or the shards' KV cache); shorten the input"
            )
        max_new, token_limit = p.max_new_tokens, False
        room = min(limits.max_total_tokens, budget) - n
        if max_new > room:
            max_new, token_limit = room, True
        sampling = p.sampling
        if p.random_seed:
            sampling = replace(sampling, seed=self._rng.randint(1, 2**32 - 1))
        return ValidatedRequest(
            text=text,
            input_ids=tuple(ids),
            sampling=sampling,
            max_new_tokens=max_new,
            min_new_tokens=p.min_new_tokens,
            max_is_token_limit=token_limit,
            stop_sequences=p.stop_sequences,
            include_stop_sequence=p.include_stop_sequence,
            time_limit_ms=p.time_limit_ms,
            response=p.response,
        )
