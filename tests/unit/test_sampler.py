"""The sampler against transformers' own logits processors and warpers."""

from __future__ import annotations

import math

import pytest
import torch
from text_generation_server.engine.sampler import (
    NEG_INF,
    SampleRow,
    SamplingParams,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    apply_typical_p,
    draw,
    sample,
    warp,
)
from text_generation_server.engine.stopping import StoppingCriteria, StoppingParams
from text_generation_server.pb.generate.v1 import generate_pb2
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

VOCAB = 97


def random_logits(rows: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, VOCAB, generator=g) * scale


def assert_same_scores(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal values, with -inf exactly where the reference filtered."""
    assert torch.equal(torch.isneginf(ours), torch.isneginf(ref))
    keep = ~torch.isneginf(ref)
    torch.testing.assert_close(ours[keep], ref[keep], rtol=0, atol=1e-6)


def test_greedy_batch_chooses_the_argmax_of_every_row():
    logits = random_logits(6)
    out = sample(logits, [SampleRow(SamplingParams()) for _ in range(6)])
    assert [t.id for t in out] == logits.argmax(-1).tolist()
    assert all(t.rank == 1 for t in out)
    # The plain-greedy shortcut reports what the general path (asked for top-n) does.
    general = sample(logits, [SampleRow(SamplingParams(), top_n=1) for _ in range(6)])
    assert [(t.id, t.rank) for t in out] == [(t.id, t.rank) for t in general]
    for fast, full in zip(out, general, strict=True):
        assert fast.logprob == pytest.approx(full.logprob, abs=1e-5)


@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.5])
def test_temperature_equals_transformers(temperature):
    logits = random_logits(4, seed=1)
    ours = apply_temperature(logits, torch.full((4,), temperature))
    ref = TemperatureLogitsWarper(temperature)(None, logits.clone())
    assert_same_scores(ours, ref)


@pytest.mark.parametrize("k", [1, 5, 40, VOCAB, VOCAB + 10])
def test_top_k_equals_transformers(k):
    logits = random_logits(4, seed=2)
    ours = apply_top_k(logits, torch.full((4,), k, dtype=torch.int64))
    ref = TopKLogitsWarper(top_k=k)(None, logits.clone())
    assert_same_scores(ours, ref)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9, 0.999])
def test_top_p_equals_transformers(p):
    logits = random_logits(4, seed=3)
    ours = apply_top_p(logits, torch.full((4,), p))
    ref = TopPLogitsWarper(top_p=p)(None, logits.clone())
    assert_same_scores(ours, ref)


@pytest.mark.parametrize("scale", [0.001, 0.5, 2.0, 6.0])
@pytest.mark.parametrize("p", [0.1, 0.7, 0.95])
def test_top_p_on_a_large_vocabulary_equals_transformers(p, scale):
    """Peaked rows take the partial top-k path, flat rows the full sort: both as transformers."""
    g = torch.Generator().manual_seed(int(p * 100) + int(scale * 10))
    logits = torch.randn(5, 6000, generator=g) * scale
    logits[1] *= 0.01  # nearly flat: the nucleus needs most of the vocabulary
    ours = apply_top_p(logits, torch.full((5,), p))
    ref = TopPLogitsWarper(top_p=p)(None, logits.clone())
    # Among tokens of exactly equal probability which ones stay is arbitrary
    # (sort order), and so is a token whose cumulative mass lies within float32
    # rounding of 1 - p (a cumsum over 6000 flat probabilities can land either
    # side, depending on how the CPU vectorises it); everything else must match.
    probs = logits.softmax(-1)
    kept_ours, kept_ref = ~torch.isneginf(ours), ~torch.isneginf(ref)
    for row in range(5):
        boundary = probs[row][kept_ref[row]].min()
        differ = kept_ours[row] != kept_ref[row]
        exact = logits[row].double().softmax(-1)
        order = exact.argsort()
        mass_through = torch.empty_like(exact)
        mass_through[order] = exact[order].cumsum(0)  # mass of each token and all below it
        at_cut = (mass_through - (1 - p)).abs() < 1e-4
        assert bool(((probs[row] == boundary) | at_cut)[differ].all())
    torch.testing.assert_close(ours[kept_ours], logits[kept_ours], rtol=0, atol=0)


@pytest.mark.parametrize("p", [0.05, 0.2, 0.5, 0.95])
def test_typical_p_equals_transformers(p):
    logits = random_logits(4, seed=4)
    ours = apply_typical_p(logits, torch.full((4,), p))
    ref = TypicalLogitsWarper(mass=p)(None, logits.clone())
    assert_same_scores(ours, ref)


def test_repetition_penalty_over_prompt_and_generated_ids_equals_transformers():
    logits = random_logits(3, seed=5)
    seen = [[1, 5, 5, 9, 60], [2], [7, 8, 9, 10, 11, 12, 96, 0]]
    penalties = [1.3, 0.8, 2.0]
    ours = apply_repetition_penalty(logits, seen, torch.tensor(penalties))
    for i in range(3):
        ref = RepetitionPenaltyLogitsProcessor(penalty=penalties[i])(
            torch.tensor([seen[i]]), logits[i : i + 1].clone()
        )
        assert_same_scores(ours[i : i + 1], ref)


def test_mixed_warper_settings_per_row_equal_transformers_pipeline_row_by_row():
    """One batch, different settings per row: each row as transformers warps it alone."""
    params = [
        SamplingParams(do_sample=True, temperature=0.7, top_k=10),
        SamplingParams(do_sample=True, top_p=0.8),
        SamplingParams(do_sample=True, temperature=1.3, top_k=20, top_p=0.9, typical_p=0.7),
        SamplingParams(do_sample=True),
        SamplingParams(do_sample=True, typical_p=0.4),
    ]
    logits = random_logits(len(params), seed=6)
    ours = warp(logits.clone(), params)
    for i, p in enumerate(params):
        chain = LogitsProcessorList()
        if p.temperature != 1.0:
            chain.append(TemperatureLogitsWarper(p.temperature))
        if p.top_k:
            chain.append(TopKLogitsWarper(top_k=p.top_k))
        if p.top_p < 1.0:
            chain.append(TopPLogitsWarper(top_p=p.top_p))
        if p.typical_p < 1.0:
            chain.append(TypicalLogitsWarper(mass=p.typical_p))
        ref = chain(torch.zeros(1, 1, dtype=torch.int64), logits[i : i + 1].clone())
        assert_same_scores(ours[i : i + 1], ref)


def test_draws_follow_transformers_warped_distribution_and_never_pick_filtered_tokens():
    logits = torch.randn(1, 12, generator=torch.Generator().manual_seed(7))
    chain = LogitsProcessorList(
        [TemperatureLogitsWarper(0.8), TopKLogitsWarper(top_k=6), TopPLogitsWarper(top_p=0.9)]
    )
    probs = chain(None, logits.clone()).softmax(-1)[0]
    generator = torch.Generator().manual_seed(1234)
    n = 40_000
    picked = draw(probs.expand(n, -1), [generator] * n)
    freq = torch.bincount(picked, minlength=12).double() / n
    assert not bool(freq[probs == 0].any())
    # 4-5 standard deviations of a frequency at n = 40k; the seed makes it deterministic.
    torch.testing.assert_close(freq, probs.double(), rtol=0, atol=0.012)


def test_sample_draws_from_the_warped_distribution_of_its_own_row():
    params = SamplingParams(do_sample=True, temperature=0.8, top_k=30, top_p=0.95, seed=1234)
    logits = random_logits(1, seed=7, scale=1.0)
    allowed = warp(logits.clone(), [params]) > NEG_INF
    generator = params.make_generator(torch.device("cpu"))
    for _ in range(50):
        assert allowed[0, sample(logits, [SampleRow(params, generator)])[0].id]


def draws(seed: int, n: int = 30) -> list[int]:
    params = SamplingParams(do_sample=True, seed=seed)
    generator = params.make_generator(torch.device("cpu"))
    logits = torch.zeros(1, VOCAB)  # uniform: every draw is informative
    return [sample(logits, [SampleRow(params, generator)])[0].id for _ in range(n)]


def test_seeded_sampling_repeats_for_the_same_seed_and_differs_for_another():
    assert draws(42) == draws(42)
    assert draws(42) != draws(43)


def test_sampling_rows_do_not_disturb_each_others_streams():
    """A request's tokens depend on its own seed only, not on its batch neighbours."""
    alone = draws(7, n=10)
    p7, p8 = SamplingParams(do_sample=True, seed=7), SamplingParams(do_sample=True, seed=8)
    g7, g8 = p7.make_generator(torch.device("cpu")), p8.make_generator(torch.device("cpu"))
    together = []
    for _ in range(10):
        out = sample(
            torch.zeros(3, VOCAB),
            [SampleRow(p8, g8), SampleRow(SamplingParams()), SampleRow(p7, g7)],
        )
        together.append(out[2].id)
    assert together == alone


def test_top_k_one_sampling_is_greedy():
    logits = random_logits(3, seed=8)
    rows = [SampleRow(SamplingParams(do_sample=True, top_k=1, seed=s), None) for s in range(3)]
    for r in rows:
        r.generator = r.params.make_generator(torch.device("cpu"))
    assert [t.id for t in sample(logits, rows)] == logits.argmax(-1).tolist()


def test_logprob_rank_and_top_tokens_describe_the_model_distribution():
    logits = random_logits(2, seed=9)
    params = SamplingParams(do_sample=True, temperature=0.5, seed=3)
    rows = [
        SampleRow(params, params.make_generator(torch.device("cpu")), top_n=4),
        SampleRow(SamplingParams(), top_n=0),
    ]
    out = sample(logits, rows)
    logprobs = torch.log_softmax(logits.double(), -1)
    for i, token in enumerate(out):
        assert token.logprob == pytest.approx(float(logprobs[i, token.id]), abs=1e-5)
        order = torch.argsort(logprobs[i], descending=True).tolist()
        assert token.rank == order.index(token.id) + 1
    best = torch.argsort(logprobs[0], descending=True)[:4].tolist()
    assert [t for t, _ in out[0].top_tokens] == best
    assert out[1].top_tokens == []


def test_min_new_tokens_masks_eos_and_stop_ids_until_reached():
    eos, stop = 3, 11
    logits = torch.zeros(1, VOCAB)
    logits[0, eos], logits[0, stop], logits[0, 50] = 10.0, 9.0, 8.0
    criteria = StoppingCriteria(
        StoppingParams(max_new_tokens=10, min_new_tokens=2, stop_token_ids=(stop,)), [eos]
    )

    def greedy(generated: int) -> int:
        row = SampleRow(SamplingParams(), banned_ids=criteria.banned_ids(generated))
        return sample(logits, [row])[0].id

    assert greedy(0) == 50
    assert greedy(1) == 50
    assert greedy(2) == eos


def test_penalty_changes_the_greedy_choice_like_transformers():
    logits = torch.zeros(1, VOCAB)
    logits[0, 4], logits[0, 5] = 2.0, 1.9
    row = SampleRow(SamplingParams(repetition_penalty=1.2), token_ids=[4, 4, 1])
    ref = RepetitionPenaltyLogitsProcessor(penalty=1.2)(torch.tensor([[4, 4, 1]]), logits.clone())
    assert sample(logits, [row])[0].id == int(ref.argmax()) == 5


def test_unset_proto_fields_mean_disabled_and_temperature_zero_means_greedy():
    p = SamplingParams.from_pb(
        generate_pb2.SamplingParameters(do_sample=True, temperature=0.0, seed=5)
    )
    assert p == SamplingParams(do_sample=False, seed=5)
    p = SamplingParams.from_pb(generate_pb2.SamplingParameters(do_sample=True, temperature=0.9))
    assert (p.do_sample, p.top_p, p.typical_p, p.repetition_penalty) == (True, 1.0, 1.0, 1.0)


@pytest.mark.parametrize(
    "field,value",
    [
        ("temperature", -1.0),
        ("top_p", 1.5),
        ("typical_p", -0.1),
        ("repetition_penalty", -2.0),
        ("temperature", math.nan),
    ],
)
def test_invalid_sampling_parameter_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})
