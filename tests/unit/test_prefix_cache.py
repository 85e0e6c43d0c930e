"""Prefix caching and chunked prefill in the engine, on a real tiny Llama.

A prompt whose prefix was served before reuses that prefix's KV blocks and must give what a cold
prefill gives (logprobs within float32 rounding: the reused keys were computed by another forward);
a prompt prefilled in chunks must give what a whole prefill gives.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from text_generation_server.engine import BlockAllocator, CacheFullError, Generator
from text_generation_server.engine.kv_cache import prefix_keys
from text_generation_server.pb.generate.v1 import generate_pb2 as pb

# Logprob differences between a cached-prefix and a cold prefill: float32 rounding of the same
# arithmetic in another order (measured ~1e-6 on the tiny model).
LOGPROB_TOL = 1e-4

SYSTEM = [(7 * i + 3) % 200 + 1 for i in range(37)]  # a shared "system prompt" of 37 tokens


def make(model, dist, *, prefix_caching: bool = True, num_blocks: int | None = None) -> Generator:
    # Block size 4 puts block boundaries inside the prompts.
    return Generator(model, dist, block_size=4, prefix_caching=prefix_caching, num_blocks=num_blocks)


def request(rid: int, ids: list[int], n: int = 6, **kw) -> pb.Request:
    return pb.Request(
        id=rid,
        input_ids=ids,
        stopping=pb.StoppingParameters(max_new_tokens=n, ignore_eos_token=True),
        top_n_tokens=kw.pop("top_n_tokens", 3),
        **kw,
    )


def generate(gen: Generator, batch_id: int, reqs: list[pb.Request], chunk: int = 0):
    """Run a batch to the end: per request its generations (tokens, logprobs, first-token extras)."""
    out: dict[int, list[pb.Generation]] = {}
    generations, cached, _ = gen.prefill(pb.Batch(id=batch_id, requests=reqs), chunk)
    while True:
        for g in generations:
            out.setdefault(g.request_id, []).append(g)
        if cached is None:
            return out
        generations, cached, _ = gen.decode([cached], chunk)


def assert_same(a: list[pb.Generation], b: list[pb.Generation]) -> None:
    assert [g.token.id for g in a] == [g.token.id for g in b]
    for x, y in zip(a, b, strict=True):
        assert x.token.logprob == pytest.approx(y.token.logprob, abs=LOGPROB_TOL)
        assert [t.id for t in x.token.top_tokens] == [t.id for t in y.token.top_tokens]


# ---- the allocator ------------------------------------------------------------------


def test_prefix_keys_name_the_whole_prefix_not_just_the_block():
    a = prefix_keys([1, 2, 3, 4, 5, 6, 7, 8, 9], 4)
    b = prefix_keys([9, 2, 3, 4, 5, 6, 7, 8], 4)
    assert len(a) == 2 and len(b) == 2  # full blocks only
    assert a[0] != b[0] and a[1] != b[1]  # same second block, different first: different keys
    assert prefix_keys([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], 4, a[:1]) == prefix_keys(
        [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], 4
    )


def test_allocator_shares_registered_blocks_and_keeps_them_until_evicted():
    alloc = BlockAllocator(6)  # 5 usable
    keys = prefix_keys(list(range(12)), 4)
    first = alloc.allocate(3)
    for b, k in zip(first, keys, strict=True):
        alloc.register(b, k)
    shared = alloc.match(keys[:2] + [b"other"])
    assert shared == first[:2]
    alloc.free(first)
    # Blocks 1 and 2 are still held by the second holder; block 3 is cached and counts as free.
    assert alloc.num_free == 3 and alloc.num_cached == 1
    alloc.free(shared)
    assert alloc.num_free == 5 and alloc.num_cached == 3
    assert alloc.match(keys) == first
    alloc.free(first)
    with pytest.raises(ValueError, match="not allocated"):
        alloc.free(first)
    # Two empty blocks go first, then cached ones, least recently used first: the tail of a
    # sequence before its head.
    got = alloc.allocate(3)
    assert first[2] in got and first[0] not in got and alloc.evictions == 1
    assert alloc.match(keys) == first[:2]  # the head is still cached; the walk stops at the gap
    alloc.free(first[:2])
    with pytest.raises(CacheFullError):
        alloc.allocate(3)
    assert alloc.allocate(2) and alloc.num_free == 0 and alloc.num_cached == 0
    assert alloc.match(keys) == []


@pytest.mark.parametrize("seed", range(5))
def test_allocator_holds_each_block_once_under_any_sequence_of_operations(seed):
    rng = random.Random(seed)
    alloc = BlockAllocator(10)
    held: list[list[int]] = []
    keyspace = [prefix_keys([k] * 4, 4)[0] for k in range(6)]
    for _ in range(300):
        op = rng.random()
        if op < 0.35 and alloc.num_free:
            held.append(alloc.allocate(rng.randint(1, min(3, alloc.num_free))))
        elif op < 0.55 and held:
            blocks = held[rng.randrange(len(held))]
            alloc.register(blocks[0], rng.choice(keyspace))
        elif op < 0.75:
            got = alloc.match([rng.choice(keyspace)])
            if got:
                held.append(got)
        elif held:
            alloc.free(held.pop(rng.randrange(len(held))))
        refs: dict[int, int] = {}
        for blocks in held:
            for b in blocks:
                refs[b] = refs.get(b, 0) + 1
        assert 0 not in refs
        assert alloc.num_free == alloc.num_usable - len(refs)
        # A block held by two holders is always a shared (registered) one.
        assert all(n == 1 or b in alloc._key_of for b, n in refs.items())


# ---- prefix caching in the engine -----------------------------------------------------


def test_a_served_prefix_is_reused_and_gives_a_cold_prefills_tokens_and_logprobs(model, dist):
    warm, cold = make(model, dist), make(model, dist, prefix_caching=False)
    first = generate(warm, 1, [request(1, SYSTEM + [11, 12, 13])])
    assert first[1][0].cached_tokens == 0
    suffixes = {2: [50, 51, 52, 53, 54, 55, 56], 3: [90], 4: [11, 12, 13, 14, 15]}
    reqs = [request(rid, SYSTEM + s, n=8) for rid, s in suffixes.items()]
    got = generate(warm, 2, reqs)
    expected = generate(cold, 2, reqs)
    for rid in suffixes:
        # 37 shared tokens hold 9 full blocks; request 4 also shares the first request's 10th block.
        reused = 40 if rid == 4 else 36
        assert got[rid][0].cached_tokens == reused, rid
        assert expected[rid][0].cached_tokens == 0
        assert_same(got[rid], expected[rid])
    # The prompt's last token is always computed: a prompt that is entirely cached reuses all but
    # its last block.
    again = generate(warm, 3, [request(5, SYSTEM[:36])])
    assert again[5][0].cached_tokens == 32
    assert_same(again[5], generate(cold, 3, [request(5, SYSTEM[:36])])[5])
    assert warm.batches == {} and warm.kv_usage().blocks_used == 0
    assert warm.kv_usage().blocks_cached > 0 and warm.info().prefix_caching


def test_generated_text_is_cached_too_so_a_follow_up_turn_reuses_it(model, dist):
    gen = make(model, dist)
    turn = generate(gen, 1, [request(1, SYSTEM[:10], n=12)])
    answer = [g.token.id for g in turn[1]]
    follow = SYSTEM[:10] + answer + [77, 78]
    nxt = generate(gen, 2, [request(2, follow)])
    # Keys/values exist for the prompt and all generated tokens but the last: 21 tokens, 5 blocks.
    assert nxt[2][0].cached_tokens == 20
    assert_same(nxt[2], generate(make(model, dist, prefix_caching=False), 2, [request(2, follow)])[2])


def test_requests_asking_for_prompt_logprobs_compute_their_whole_prompt(model, dist):
    gen = make(model, dist)
    generate(gen, 1, [request(1, SYSTEM)])
    got = generate(gen, 2, [request(2, SYSTEM + [5], prefill_logprobs=True)])[2][0]
    assert got.cached_tokens == 0 and len(got.prefill_tokens) == len(SYSTEM) + 1


def test_requests_sharing_a_running_requests_blocks_leave_them_intact(model, dist):
    gen = make(model, dist)
    cold = make(model, dist, prefix_caching=False)
    generations, running, _ = gen.prefill(pb.Batch(id=1, requests=[request(1, SYSTEM, n=10)]))
    generations, running, _ = gen.decode([running])
    # Request 2 shares request 1's 9 full prompt blocks while request 1 is still generating.
    generations, new, _ = gen.prefill(pb.Batch(id=2, requests=[request(2, SYSTEM[:36] + [3, 4], n=10)]))
    assert generations[0].cached_tokens == 36
    out: dict[int, list[pb.Generation]] = {2: list(generations)}
    generations, cached, _ = gen.decode([running, new])
    while True:
        for g in generations:
            out.setdefault(g.request_id, []).append(g)
        if cached is None:
            break
        generations, cached, _ = gen.decode([cached])
    assert_same(out[2], generate(cold, 1, [request(2, SYSTEM[:36] + [3, 4], n=10)])[2])
    assert [g.token.id for g in out[1]] == [g.token.id for g in generate(cold, 2, [request(1, SYSTEM, n=10)])[1]][2:]
    assert gen.kv_usage().blocks_used == 0


def test_a_small_cache_evicts_old_prefixes_and_keeps_serving(model, dist):
    gen = make(model, dist, num_blocks=17)  # 16 usable blocks of 4 tokens
    cold = make(model, dist, prefix_caching=False)
    rng = random.Random(0)
    prompts = [[rng.randrange(1, 250) for _ in range(30)] for _ in range(6)]
    for i, ids in enumerate(prompts):
        got = generate(gen, i + 1, [request(i + 1, ids, n=4)])[i + 1]
        assert got[0].cached_tokens == 0
        assert_same(got, generate(cold, i + 1, [request(i + 1, ids, n=4)])[i + 1])
        assert gen.kv_usage().blocks_used == 0
    assert gen.allocator.evictions > 0
    # The newest prompt is still cached; the oldest was evicted.
    assert generate(gen, 10, [request(10, prompts[-1], n=2)])[10][0].cached_tokens == 28
    assert generate(gen, 11, [request(11, prompts[0], n=2)])[11][0].cached_tokens == 0


def test_prefix_caching_off_reuses_nothing(model, dist):
    gen = make(model, dist, prefix_caching=False)
    generate(gen, 1, [request(1, SYSTEM)])
    assert generate(gen, 2, [request(2, SYSTEM + [1])])[2][0].cached_tokens == 0
    assert gen.kv_usage().blocks_cached == 0 and not gen.info().prefix_caching


# ---- chunked prefill ------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_chunked_prefill_gives_a_whole_prefills_tokens_logprobs_and_prompt_logprobs(model, dist, chunk):
    prompts = {1: SYSTEM[:23], 2: SYSTEM[5:16], 3: [44]}
    reqs = [request(rid, ids, n=7, prefill_logprobs=rid != 3) for rid, ids in prompts.items()]
    whole = generate(make(model, dist, prefix_caching=False), 1, reqs)
    gen = make(model, dist, prefix_caching=False)
    generations, cached, _ = gen.prefill(pb.Batch(id=1, requests=reqs), chunk)
    # The first step holds at most `chunk` prompt tokens: only prompts that fit got a token.
    fits = [rid for rid, ids in prompts.items() if sum(len(prompts[r]) for r in prompts if r <= rid) <= chunk]
    assert [g.request_id for g in generations] == fits
    assert cached.current_tokens == min(chunk, sum(len(p) for p in prompts.values()))
    out: dict[int, list[pb.Generation]] = {}
    while True:
        for g in generations:
            out.setdefault(g.request_id, []).append(g)
        if cached is None:
            break
        generations, cached, _ = gen.decode([cached], chunk)
    for rid in prompts:
        assert_same(out[rid], whole[rid])
        a, b = out[rid][0].prefill_tokens, whole[rid][0].prefill_tokens
        assert [t.id for t in a] == [t.id for t in b]
        assert [t.rank for t in a] == [t.rank for t in b]
        for x, y in zip(a[1:], b[1:], strict=True):
            assert x.logprob == pytest.approx(y.logprob, abs=LOGPROB_TOL)
        assert all(g.prefill_tokens == [] for g in out[rid][1:])


def test_a_long_prompt_arrives_in_chunks_while_running_requests_keep_decoding(model, dist):
    gen = make(model, dist)
    cold = make(model, dist, prefix_caching=False)
    generations, running, _ = gen.prefill(pb.Batch(id=1, requests=[request(1, [5, 9, 33], n=20)]))
    tokens = {1: [g.token.id for g in generations]}
    long = [(3 * i + 1) % 240 + 1 for i in range(45)]
    generations, new, _ = gen.prefill(pb.Batch(id=2, requests=[request(2, long, n=3)]), 8)
    assert generations == []  # 45 tokens in chunks of 8: no token for it yet
    steps_before_first = 0
    cached = gen.decode([running, new], 8)
    while cached[1] is not None:
        generations, nxt, _ = cached
        ids = {g.request_id for g in generations}
        assert 1 in ids or not tokens.get(1) or len(tokens[1]) == 20  # request 1 advances every step
        if 2 not in tokens:
            steps_before_first += 1
        for g in generations:
            tokens.setdefault(g.request_id, []).append(g.token.id)
        cached = gen.decode([nxt], 8)
    for g in cached[0]:
        tokens.setdefault(g.request_id, []).append(g.token.id)
    assert steps_before_first == math.ceil(45 / 8) - 1  # the Prefill took the first chunk
    assert tokens[2] == [g.token.id for g in generate(cold, 1, [request(2, long, n=3)])[2]]
    assert tokens[1] == [g.token.id for g in generate(cold, 2, [request(1, [5, 9, 33], n=20)])[1]]
    assert gen.kv_usage().blocks_used == 0


def test_a_chunk_that_needs_more_blocks_than_are_free_fails_the_step_and_changes_nothing(model, dist):
    gen = make(model, dist, prefix_caching=False, num_blocks=9)  # 8 usable blocks, 32 tokens
    with pytest.raises(CacheFullError):
        gen.prefill(pb.Batch(id=1, requests=[request(1, list(range(1, 40)))]), 8)
    assert gen.batches == {} and gen.allocator.num_free == 8


# ---- KV cache dtype -------------------------------------------------------------------------


def test_a_bfloat16_kv_cache_holds_twice_the_tokens_and_answers_close_to_float32(model, dist):
    from text_generation_server.engine.kv_cache import blocks_for_memory
    from text_generation_server.execution import ModulePlan

    sizes = {dtype: blocks_for_memory(num_layers=4, num_kv_heads=2, head_dim=64, dtype=dtype, device=torch.device("cpu"),
                                      max_batch_total_tokens=0, available_bytes=2**24, block_size=16)
             for dtype in (torch.float32, torch.bfloat16)}  # fmt: skip
    assert sizes[torch.bfloat16] - 1 >= 2 * (sizes[torch.float32] - 1) - 1
    fp32 = make(model, dist, prefix_caching=False)
    bf16 = Generator(model, dist, block_size=4, kv_dtype=torch.bfloat16)
    assert bf16.cache.layers[0][0].dtype == torch.bfloat16 and 2 * bf16.cache.nbytes == fp32.cache.nbytes
    reqs = [request(1, SYSTEM[:23], n=10), request(2, SYSTEM[3:9], n=10)]
    a, b = generate(bf16, 1, reqs), generate(fp32, 1, reqs)
    for rid in a:
        # The first token's logits come from the prefill (float32 keys); later ones read bf16 keys.
        assert a[rid][0].token.logprob == pytest.approx(b[rid][0].token.logprob, abs=1e-5)
        for x, y in zip(a[rid], b[rid], strict=False):
            if x.token.id != y.token.id:
                break
            assert x.token.logprob == pytest.approx(y.token.logprob, abs=0.05)
    # The native kernels read the bfloat16 cache as the modules do.
    modules = Generator(model, dist, block_size=4, kv_dtype=torch.bfloat16)
    modules.plan = ModulePlan(model)
    for rid, gens in generate(modules, 1, reqs).items():
        assert_same(gens, a[rid])
