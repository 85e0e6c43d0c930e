"""Speculative decoding with n-gram drafts: the output is plain greedy decoding's, token for token."""

from __future__ import annotations

import random

import pytest
from text_generation_server.engine import Generator
from text_generation_server.engine.speculation import MAX_NGRAM, NgramIndex
from text_generation_server.pb.generate.v1 import generate_pb2 as pb

# Logprobs of a token chosen in a speculative step (module path, several query tokens) against a
# one-token step: the same arithmetic in another order.
LOGPROB_TOL = 1e-4


def run(gen: Generator, reqs: list[pb.Request]) -> dict[int, list[pb.Generation]]:
    out: dict[int, list[pb.Generation]] = {}
    generations, cached, _ = gen.prefill(pb.Batch(id=1, requests=reqs))
    while True:
        for g in generations:
            out.setdefault(g.request_id, []).append(g)
        if cached is None:
            return out
        generations, cached, _ = gen.decode([cached])


def request(rid: int, ids: list[int], n: int = 24, **kw) -> pb.Request:
    stopping = pb.StoppingParameters(max_new_tokens=n, **kw.pop("stopping", {}))
    return pb.Request(id=rid, input_ids=ids, stopping=stopping, top_n_tokens=kw.pop("top_n_tokens", 2), **kw)


# Prompts that repeat themselves, so guesses are found (and, often, right).
def repeating(seed: int) -> list[int]:
    rng = random.Random(seed)
    phrase = [rng.randrange(3, 250) for _ in range(rng.randrange(3, 9))]
    return (phrase * 4)[: rng.randrange(10, 30)]


def ngram_draft(tokens: list[int], n: int, max_ngram: int = MAX_NGRAM) -> list[int]:
    """The definition the index keeps up to date: a search of the whole text, latest match first."""
    if n <= 0 or len(tokens) < 2:
        return []
    for size in range(min(max_ngram, len(tokens) - 1), 0, -1):
        suffix = tokens[-size:]
        # The latest occurrence that ends before the suffix itself and has a token after it.
        for i in range(len(tokens) - size - 1, -1, -1):
            if tokens[i : i + size] == suffix:
                return tokens[i + size : i + size + n]
    return []


def assert_identical(a: list[pb.Generation], b: list[pb.Generation]) -> None:
    assert [g.token.id for g in a] == [g.token.id for g in b]
    assert [g.finish_reason for g in a] == [g.finish_reason for g in b]
    assert [g.generated_tokens for g in a] == list(range(1, len(a) + 1))
    for x, y in zip(a, b, strict=True):
        assert x.token.logprob == pytest.approx(y.token.logprob, abs=LOGPROB_TOL)
        assert x.token.rank == y.token.rank
        assert [t.id for t in x.token.top_tokens] == [t.id for t in y.token.top_tokens]


def test_the_incremental_index_guesses_what_a_search_of_the_whole_text_guesses():
    rng = random.Random(0)
    for _ in range(300):
        tokens = [rng.randrange(5) for _ in range(rng.randrange(1, 50))]
        index = NgramIndex()
        cut = rng.randrange(len(tokens) + 1)
        index.extend(tokens[:cut])
        index.extend(tokens[cut:])
        for n in (1, 4):
            assert index.draft(n) == ngram_draft(tokens, n), tokens
    assert ngram_draft([1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3], 3) == [7, 1, 2]  # the latest occurrence
    assert ngram_draft([1, 2, 3], 3) == []


@pytest.mark.parametrize("speculate", [1, 4])
def test_greedy_requests_give_plain_greedys_tokens_and_logprobs_with_guesses_kept(model, dist, speculate):
    reqs = [request(rid, repeating(rid), n=20 + rid) for rid in range(1, 9)]
    plain = run(Generator(model, dist, block_size=4, num_blocks=400), reqs)
    gen = Generator(model, dist, block_size=4, num_blocks=400, speculate=speculate)
    fast = run(gen, reqs)
    for rid in plain:
        assert_identical(fast[rid], plain[rid])
    assert gen.accepted > 0 and gen.speculated >= gen.accepted
    assert gen.allocator.num_free == gen.allocator.num_usable


def test_stops_min_new_tokens_and_the_length_limit_fall_where_plain_greedy_puts_them(model, dist):
    plain_gen = Generator(model, dist, block_size=4, num_blocks=400)
    prompt = repeating(3)
    free = run(plain_gen, [request(1, prompt, n=30)])[1]
    stop_at = free[7].token.id  # a token greedy produces: a stop token there ends the request early
    reqs = [
        request(1, prompt, n=30, stopping={"stop_token_ids": [stop_at]}),
        request(2, prompt, n=30, stopping={"stop_token_ids": [stop_at], "min_new_tokens": 12}),
        request(3, prompt, n=5),
        request(4, prompt, n=1),
    ]
    plain = run(Generator(model, dist, block_size=4, num_blocks=400), reqs)
    fast = run(Generator(model, dist, block_size=4, num_blocks=400, speculate=6), reqs)
    for rid in plain:
        assert_identical(fast[rid], plain[rid])
    assert len(fast[3]) == 5 and len(fast[4]) == 1


def test_sampled_requests_are_not_speculated_and_keep_their_seeded_tokens(model, dist):
    sampling = pb.SamplingParameters(do_sample=True, temperature=0.8, top_k=20, seed=7)
    reqs = [request(1, repeating(5), sampling=sampling), request(2, repeating(6)),
            request(3, repeating(7), sampling=pb.SamplingParameters(repetition_penalty=1.3))]
    plain = run(Generator(model, dist, block_size=4, num_blocks=400), reqs)
    fast = run(Generator(model, dist, block_size=4, num_blocks=400, speculate=4), reqs)
    for rid in plain:
        assert_identical(fast[rid], plain[rid])


def test_steps_of_a_few_tokens_per_sequence_run_natively_as_the_modules_compute_them(model, dist):
    """Speculative checks and short prompts (at most 16 new tokens per sequence) go through the native
    layers, each token a decode row of its own; they must give the module path's answers."""
    from text_generation_server.execution import ModulePlan
    from text_generation_server.execution.native import MAX_NATIVE_QUERY

    native = Generator(model, dist, block_size=4, num_blocks=400, speculate=6)
    if isinstance(native.plan, ModulePlan):
        pytest.skip("the native CPU kernels are not built on this host")
    modules = Generator(model, dist, block_size=4, num_blocks=400, speculate=6)
    modules.plan = ModulePlan(model)
    reqs = [request(rid, repeating(20 + rid)[: 4 + 2 * rid], n=18) for rid in range(1, 7)]
    assert max(len(r.input_ids) for r in reqs) <= MAX_NATIVE_QUERY  # the prefill is native too
    a, b = run(native, reqs), run(modules, reqs)
    for rid in a:
        assert_identical(a[rid], b[rid])
    assert native.accepted > 0
