"""Property-based checks of the request validator over arbitrary TGIS parameters and texts.

Whatever a client sends, the validator either refuses with ValidationError
(INVALID_ARGUMENT on the wire), never another exception, or returns requests
that the scheduler and the shards can run as they are: within every limit,
with finite sampling numbers in range.
"""

from __future__ import annotations

import asyncio
import math
import random

import pytest
from fake_shard import make_tokenizer_dir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from text_generation_router.config import Limits
from text_generation_router.tokenization import Tokenizer
from text_generation_router.validation import MAX_STOP_SEQUENCE_BYTES, ValidationError, Validator
from text_generation_server.pb.fmaas import generation_pb2 as pb

LIMITS = Limits(
    max_input_tokens=30,
    max_total_tokens=40,
    max_new_tokens=100,
    default_max_new_tokens=20,
    max_stop_sequences=4,
    max_top_n_tokens=5,
    max_concurrent_requests=128,
    max_batch_prefill_tokens=80,
    max_batch_total_tokens=64,
    max_waiting_tokens=20,
    waiting_served_ratio=0.3,
    max_batch_size=None,
    block_size=16,
    default_include_stop_sequence=True,
)

UINT32 = st.integers(0, 2**32 - 1)
# Mostly small values where the limits are, sometimes anything the wire allows.
COUNT = st.one_of(st.integers(0, 120), UINT32)
FLOAT32 = st.one_of(
    st.floats(width=32, allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1.0, 0.5, 1e-30, -1.0, 1.0000001]),
)


def maybe(strategy: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(st.none(), strategy)


@st.composite
def parameters(draw: st.DrawFn) -> pb.Parameters:
    sampling = pb.SamplingParameters(
        top_k=draw(st.one_of(st.integers(0, 100), UINT32)),
        top_p=draw(FLOAT32),
        typical_p=draw(FLOAT32),
    )
    temperature = draw(maybe(FLOAT32))
    if temperature is not None:
        sampling.temperature = temperature
    seed = draw(maybe(st.integers(0, 2**64 - 1)))
    if seed is not None:
        sampling.seed = seed
    stopping = pb.StoppingCriteria(
        max_new_tokens=draw(COUNT),
        min_new_tokens=draw(COUNT),
        stop_sequences=draw(st.lists(st.text(max_size=90), max_size=7)),
        time_limit_millis=draw(UINT32),
    )
    include = draw(maybe(st.booleans()))
    if include is not None:
        stopping.include_stop_sequence = include
    return pb.Parameters(
        method=draw(st.sampled_from([pb.GREEDY, pb.SAMPLE, 2, 7, -1, 2**31 - 1])),
        sampling=sampling,
        stopping=stopping,
        response=pb.ResponseOptions(
            input_text=draw(st.booleans()),
            generated_tokens=draw(st.booleans()),
            input_tokens=draw(st.booleans()),
            token_logprobs=draw(st.booleans()),
            token_ranks=draw(st.booleans()),
            top_n_tokens=draw(st.one_of(st.integers(0, 8), UINT32)),
        ),
        decoding=pb.DecodingParameters(repetition_penalty=draw(FLOAT32)),
        truncate_input_tokens=draw(st.one_of(st.integers(0, 40), UINT32)),
    )


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    tok = Tokenizer.load(make_tokenizer_dir(tmp_path_factory.mktemp("tokenizer")))
    yield tok
    tok.close()


@pytest.fixture(scope="module")
def validator(tokenizer):
    return Validator(LIMITS, tokenizer, rng=random.Random(3))


def finite(x: float) -> bool:
    return math.isfinite(x)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(params=parameters(), texts=st.lists(st.text(max_size=200), min_size=1, max_size=3))
def test_a_request_is_refused_cleanly_or_accepted_within_every_limit(validator, params, texts):
    try:
        requests = asyncio.run(validator.validate(texts, params))
    except ValidationError as err:
        assert str(err), "a refusal must say why"
        return
    assert len(requests) == len(texts)
    for text, req in zip(texts, requests, strict=True):
        assert text and req.text == text
        assert 0 < req.input_length <= LIMITS.max_input_tokens
        if params.truncate_input_tokens:
            assert req.input_length <= params.truncate_input_tokens
        assert 1 <= req.max_new_tokens <= LIMITS.max_new_tokens
        assert req.min_new_tokens <= req.max_new_tokens
        assert req.input_length + req.max_new_tokens <= min(LIMITS.max_total_tokens, LIMITS.max_batch_total_tokens)
        assert len(req.stop_sequences) <= LIMITS.max_stop_sequences
        assert all(0 < len(s.encode()) <= MAX_STOP_SEQUENCE_BYTES for s in req.stop_sequences)
        assert req.response.top_n_tokens <= LIMITS.max_top_n_tokens
        s = req.sampling
        assert finite(s.repetition_penalty) and s.repetition_penalty > 0
        if s.do_sample:
            assert params.method == pb.SAMPLE
            assert finite(s.temperature) and s.temperature > 0
            assert finite(s.top_p) and 0 < s.top_p <= 1
            assert finite(s.typical_p) and 0 < s.typical_p <= 1
            assert 0 <= s.top_k < 2**32
            assert 0 <= s.seed < 2**64
            assert req.seed_reported == s.seed
        else:
            assert req.seed_reported == 0


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(min_size=1, max_size=400), truncate=st.integers(1, 40))
def test_truncation_keeps_the_last_tokens_of_the_full_encoding(validator, tokenizer, text, truncate):
    params = pb.Parameters(truncate_input_tokens=truncate, stopping=pb.StoppingCriteria(max_new_tokens=1))
    full = asyncio.run(tokenizer.encode_async(text)).ids
    try:
        [req] = asyncio.run(validator.validate([text], params))
    except ValidationError:
        assert min(len(full), truncate) > LIMITS.max_input_tokens or not full
        return
    assert list(req.input_ids) == list(full[-truncate:])
