"""TGIS parameter semantics and limits, checked on the Validator directly."""

from __future__ import annotations

import asyncio
import random

import pytest
from fake_shard import make_tokenizer_dir
from text_generation_router.config import Limits
from text_generation_router.tokenization import Tokenizer
from text_generation_router.validation import ValidationError, Validator
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
    max_batch_total_tokens=1000,
    max_waiting_tokens=20,
    waiting_served_ratio=0.3,
    max_batch_size=None,
    block_size=16,
    default_include_stop_sequence=True,
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    tok = Tokenizer.load(make_tokenizer_dir(tmp_path_factory.mktemp("tokenizer")))
    yield tok
    tok.close()


def validate(tokenizer, params: pb.Parameters, texts=("Hello",), limits: Limits = LIMITS, **kw):
    validator = Validator(limits, tokenizer, rng=random.Random(7))
    return asyncio.run(validator.validate(list(texts), params, **kw))


def test_greedy_ignores_sampling_parameters_even_invalid_ones_as_tgis_does(tokenizer):
    params = pb.Parameters(method=pb.GREEDY, sampling=pb.SamplingParameters(temperature=-3, top_p=7, seed=5))
    [req] = validate(tokenizer, params)
    assert not req.sampling.do_sample and req.seed_reported == 0


def test_sample_defaults_follow_the_published_proto(tokenizer):
    [req] = validate(tokenizer, pb.Parameters(method=pb.SAMPLE))
    s = req.sampling
    assert s.do_sample and s.temperature == 1.0 and s.top_k == 0 and s.top_p == 1.0 and s.typical_p == 1.0
    assert s.repetition_penalty == 1.0
    assert 1 <= s.seed < 2**32 and req.seed_reported == s.seed
    explicit = pb.Parameters(
        method=pb.SAMPLE,
        sampling=pb.SamplingParameters(temperature=0.5, top_k=3, top_p=0.8, typical_p=0.9, seed=0),
        decoding=pb.DecodingParameters(repetition_penalty=1.2),
    )
    [req] = validate(tokenizer, explicit)
    s = req.sampling
    assert (s.top_k, round(s.top_p, 5), round(s.typical_p, 5), round(s.repetition_penalty, 5)) == (3, 0.8, 0.9, 1.2)
    assert s.seed == 0  # an explicit seed is used as given, even 0


def test_each_prompt_of_a_call_gets_its_own_random_seed(tokenizer):
    reqs = validate(tokenizer, pb.Parameters(method=pb.SAMPLE), texts=["a", "b", "c"])
    assert len({r.sampling.seed for r in reqs}) == 3


def test_sample_with_explicit_zero_temperature_is_greedy(tokenizer):
    [req] = validate(tokenizer, pb.Parameters(method=pb.SAMPLE, sampling=pb.SamplingParameters(temperature=0.0, seed=9)))
    assert not req.sampling.do_sample and req.seed_reported == 0


def test_max_new_tokens_default_and_token_limit(tokenizer):
    [req] = validate(tokenizer, pb.Parameters())
    assert req.max_new_tokens == 20 and not req.max_is_token_limit
    [req] = validate(tokenizer, pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=100)))
    assert req.max_new_tokens == 40 - req.input_length and req.max_is_token_limit


def test_truncation_keeps_the_last_tokens_and_still_checks_the_limit(tokenizer):
    text = "word " * 50
    ids = tokenizer.encode(text).ids
    [req] = validate(tokenizer, pb.Parameters(truncate_input_tokens=10), texts=[text])
    assert list(req.input_ids) == ids[-10:]
    with pytest.raises(ValidationError, match="max_input_tokens is 30"):
        validate(tokenizer, pb.Parameters(truncate_input_tokens=35), texts=[text])


def test_stop_sequence_options(tokenizer):
    [req] = validate(tokenizer, pb.Parameters(stopping=pb.StoppingCriteria(stop_sequences=["\n\n"])))
    assert req.stop_sequences == ("\n\n",) and req.include_stop_sequence
    [req] = validate(tokenizer, pb.Parameters(stopping=pb.StoppingCriteria(stop_sequences=["x"], include_stop_sequence=False)))
    assert not req.include_stop_sequence
    with pytest.raises(ValidationError, match="240 UTF-8 bytes"):
        validate(tokenizer, pb.Parameters(stopping=pb.StoppingCriteria(stop_sequences=["東" * 81])))


@pytest.mark.parametrize(
    "params, message",
    [
        (pb.Parameters(decoding=pb.DecodingParameters(length_penalty=pb.DecodingParameters.LengthPenalty(decay_factor=1.5))), "length_penalty"),
        (pb.Parameters(decoding=pb.DecodingParameters(json_schema="{}")), "decoding.json_schema"),
        (pb.Parameters(decoding=pb.DecodingParameters(format=pb.DecodingParameters.JSON)), "decoding.format"),
        (pb.Parameters(method=7), "method must be GREEDY"),
        (pb.Parameters(method=pb.SAMPLE, sampling=pb.SamplingParameters(temperature=float("inf"))), "temperature"),
        (pb.Parameters(decoding=pb.DecodingParameters(repetition_penalty=float("nan"))), "repetition_penalty"),
        # Positive but tiny: the logits would overflow to NaN probabilities in the sampler.
        (pb.Parameters(method=pb.SAMPLE, sampling=pb.SamplingParameters(temperature=1e-40)),
         r"temperature must be >= 0.05 and finite, or 0 meaning greedy \(got "),
        (pb.Parameters(method=pb.SAMPLE, sampling=pb.SamplingParameters(temperature=0.049)),
         "temperature must be >= 0.05"),
        (pb.Parameters(decoding=pb.DecodingParameters(repetition_penalty=1e-40)),
         "repetition_penalty must be >= 0.05 and finite, or 0 for none"),
    ],
)
def test_unsupported_or_invalid_options_are_refused_by_name(tokenizer, params, message):
    with pytest.raises(ValidationError, match=message):
        validate(tokenizer, params)


def test_the_lowest_allowed_temperature_and_penalty_are_served(tokenizer):
    params = pb.Parameters(method=pb.SAMPLE, sampling=pb.SamplingParameters(temperature=0.05),
                           decoding=pb.DecodingParameters(repetition_penalty=0.05))
    [req] = validate(tokenizer, params)
    sampling = req.sampling
    assert (sampling.temperature, sampling.repetition_penalty) == pytest.approx((0.05, 0.05))


def test_plain_text_format_is_accepted(tokenizer):
    [req] = validate(tokenizer, pb.Parameters(decoding=pb.DecodingParameters(format=pb.DecodingParameters.TEXT)))
    assert req.input_length > 0


def test_adapters_are_refused(tokenizer):
    with pytest.raises(ValidationError, match="adapter_id/prefix_id 'my-adapter'"):
        validate(tokenizer, pb.Parameters(), adapter_id="my-adapter")


def test_a_request_that_could_never_fit_the_kv_budget_is_rejected_and_max_new_is_cut_to_whole_blocks(tokenizer):
    """Budget 40 tokens in blocks of 16 holds 32: more than 32 tokens can never be scheduled."""
    from dataclasses import replace

    tight = replace(LIMITS, max_batch_total_tokens=40)
    text = "Hello world"
    n = len(tokenizer.encode(text).ids)
    with pytest.raises(ValidationError, match="can never fit the batch token budget"):
        validate(tokenizer, pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=40, min_new_tokens=33 - n)), texts=[text], limits=tight)
    [req] = validate(tokenizer, pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=40)), texts=[text], limits=tight)
    assert req.max_new_tokens == 32 - n and req.max_is_token_limit


def test_a_token_id_outside_the_models_vocabulary_is_refused_in_its_own_request(tokenizer):
    """A tokenizer larger than the embedding: the request is refused here, naming the id, instead of
    joining a prefill batch the shards would refuse whole."""
    ids = asyncio.run(tokenizer.encode_async("Hello world")).ids
    small = max(ids)  # the largest id of the text is one past this vocabulary
    validator = Validator(LIMITS, tokenizer, rng=random.Random(7), model_vocab_size=small)
    with pytest.raises(ValidationError, match=rf"token id {small} .*outside the model's vocabulary of {small} ids"):
        asyncio.run(validator.validate(["Hello world"], pb.Parameters()))
    fits = Validator(LIMITS, tokenizer, rng=random.Random(7), model_vocab_size=small + 1)
    [req] = asyncio.run(fits.validate(["Hello world"], pb.Parameters()))
    assert list(req.input_ids) == ids


def test_a_long_text_being_tokenized_does_not_hold_up_a_short_prompt(tokenizer):
    """Long texts (up to --payload-limit) are encoded on their own thread with their own tokenizer
    copy; a short prompt behind one is encoded at once, and both give the plain encoding."""
    import threading

    from text_generation_router.tokenization import LONG_TEXT_CHARS

    long_text = "word " * (LONG_TEXT_CHARS // 5 + 1)
    busy, release = threading.Event(), threading.Event()
    tokenizer._long_executor.submit(lambda: (busy.set(), release.wait(30)))  # the long lane is occupied
    assert busy.wait(10)

    async def scenario():
        long = asyncio.ensure_future(tokenizer.encode_async(long_text, with_offsets=True))
        short = await asyncio.wait_for(tokenizer.encode_async("Hello world"), 10)
        assert not long.done()
        release.set()
        return short, await asyncio.wait_for(long, 30)

    try:
        short, long = asyncio.run(scenario())
    finally:
        release.set()
    assert short.ids == tokenizer.encode("Hello world").ids
    assert long.ids == tokenizer.encode(long_text).ids and len(long.offsets) == len(long.ids)
