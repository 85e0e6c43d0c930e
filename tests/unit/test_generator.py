"""The engine on a real tiny Llama: prefill/decode/filter against transformers' generate."""

from __future__ import annotations

import math

import pytest
import torch
from text_generation_server.engine import BatchNotFoundError, CacheFullError, Generator
from text_generation_server.engine.kv_cache import CPU_MAX_CACHE_TOKENS
from text_generation_server.models import load_model
from text_generation_server.pb.generate.v1 import generate_pb2 as pb

PROMPTS = {
    1: [5, 9, 33, 100, 7],
    2: [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17],
    3: [44],
}


@pytest.fixture(scope="module")
def hf(tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


@pytest.fixture
def gen(model, dist):
    # Block size 4 puts block boundaries inside the prompts and the generated text.
    return Generator(model, dist, block_size=4, model_id="tiny")


def hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    """transformers' greedy continuation (stops after EOS like ours)."""
    out = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n)
    return out[0, len(ids) :].tolist()


def request(rid: int, ids: list[int], n: int = 8, **kw) -> pb.Request:
    sampling = kw.pop("sampling", pb.SamplingParameters())
    stopping = pb.StoppingParameters(max_new_tokens=n, **kw.pop("stopping", {}))
    return pb.Request(id=rid, input_ids=ids, sampling=sampling, stopping=stopping, **kw)


def run_to_end(gen: Generator, cached, out: dict[int, list[int]], reasons: dict[int, int]):
    while cached is not None:
        generations, cached, _ = gen.decode([cached])
        collect(generations, out, reasons)


def collect(generations, out, reasons) -> None:
    for g in generations:
        out.setdefault(g.request_id, []).append(g.token.id)
        assert g.generated_tokens == len(out[g.request_id])
        if g.finish_reason:
            reasons[g.request_id] = g.finish_reason


def test_batched_greedy_prompts_of_different_lengths_equal_transformers(gen, hf):
    generations, cached, timings = gen.prefill(
        pb.Batch(id=1, requests=[request(rid, ids, n=10) for rid, ids in PROMPTS.items()])
    )
    assert timings.total_ns >= timings.forward_ns > 0
    assert cached.size == 3 and cached.request_ids == [1, 2, 3]
    assert cached.current_tokens == sum(len(p) for p in PROMPTS.values())
    assert cached.max_tokens == sum(len(p) + 10 for p in PROMPTS.values())
    out, reasons = {}, {}
    collect(generations, out, reasons)
    run_to_end(gen, cached, out, reasons)
    for rid, ids in PROMPTS.items():
        assert out[rid] == hf_greedy(hf, ids, 10), rid


def test_tied_embeddings_model_batched_greedy_equals_transformers(tiny_llama_tied, dist):
    from transformers import AutoModelForCausalLM

    model = load_model(tiny_llama_tied, dtype=torch.float32, device=torch.device("cpu"), dist=dist)
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama_tied, dtype=torch.float32).eval()
    gen = Generator(model, dist, block_size=16)
    generations, cached, _ = gen.prefill(
        pb.Batch(id=1, requests=[request(rid, ids, n=6) for rid, ids in PROMPTS.items()])
    )
    out, reasons = {}, {}
    collect(generations, out, reasons)
    run_to_end(gen, cached, out, reasons)
    for rid, ids in PROMPTS.items():
        assert out[rid] == hf_greedy(ref, ids, 6), rid


def test_request_joining_a_running_batch_still_equals_transformers(gen, hf):
    out, reasons = {}, {}
    generations, running, _ = gen.prefill(pb.Batch(id=1, requests=[request(1, PROMPTS[1], n=12)]))
    collect(generations, out, reasons)
    for _ in range(3):
        generations, running, _ = gen.decode([running])
        collect(generations, out, reasons)
    generations, new, _ = gen.prefill(
        pb.Batch(id=2, requests=[request(2, PROMPTS[2], n=6), request(3, PROMPTS[3], n=9)])
    )
    collect(generations, out, reasons)
    generations, merged, _ = gen.decode([running, new])
    collect(generations, out, reasons)
    assert merged.id == 1 and list(merged.request_ids) == [1, 2, 3]
    assert set(gen.batches) == {1}
    run_to_end(gen, merged, out, reasons)
    assert out[1] == hf_greedy(hf, PROMPTS[1], 12)
    assert out[2] == hf_greedy(hf, PROMPTS[2], 6)
    assert out[3] == hf_greedy(hf, PROMPTS[3], 9)


def test_filter_batch_frees_blocks_and_all_blocks_return_when_every_request_finishes(gen):
    start = gen.allocator.num_free
    generations, cached, _ = gen.prefill(
        pb.Batch(id=7, requests=[request(rid, ids, n=20) for rid, ids in PROMPTS.items()])
    )
    held = gen.allocator.num_free
    assert held < start
    kept = gen.filter_batch(7, [1, 3])
    assert list(kept.request_ids) == [1, 3] and kept.size == 2
    assert gen.allocator.num_free == held + 3  # request 2: 11 prompt tokens in 3 blocks of 4
    out, reasons = {}, {}
    collect([g for g in generations if g.request_id != 2], out, reasons)
    run_to_end(gen, kept, out, reasons)
    assert reasons == {1: pb.FINISH_REASON_LENGTH, 3: pb.FINISH_REASON_LENGTH}
    assert gen.batches == {}
    assert gen.allocator.num_free == start


def test_filter_to_nothing_drops_the_batch(gen):
    start = gen.allocator.num_free
    gen.prefill(pb.Batch(id=3, requests=[request(1, PROMPTS[1])]))
    assert gen.filter_batch(3, []).size == 0
    assert gen.batches == {} and gen.allocator.num_free == start


def test_max_new_tokens_finishes_with_length(gen):
    out, reasons = {}, {}
    generations, cached, _ = gen.prefill(pb.Batch(id=1, requests=[request(1, PROMPTS[2], n=3)]))
    collect(generations, out, reasons)
    run_to_end(gen, cached, out, reasons)
    assert len(out[1]) == 3 and reasons[1] == pb.FINISH_REASON_LENGTH


def test_single_token_request_finishes_in_prefill_and_is_not_cached(gen):
    start = gen.allocator.num_free
    generations, cached, _ = gen.prefill(pb.Batch(id=1, requests=[request(1, PROMPTS[2], n=1)]))
    assert cached is None and gen.batches == {}
    assert generations[0].finish_reason == pb.FINISH_REASON_LENGTH
    assert gen.allocator.num_free == start


def greedy_tokens(gen, n=6) -> list[int]:
    out, reasons = {}, {}
    generations, cached, _ = gen.prefill(pb.Batch(id=99, requests=[request(1, PROMPTS[2], n=n)]))
    collect(generations, out, reasons)
    run_to_end(gen, cached, out, reasons)
    return out[1]


def test_eos_stop_tokens_and_min_new_tokens_finish_with_the_right_reason(model, dist):
    plain = greedy_tokens(Generator(model, dist, block_size=4, eos_token_ids=[]))
    assert len(set(plain[:3])) == 3, "the tiny model should vary its first tokens"

    # EOS (several ids possible): the second greedy token ends the request.
    gen = Generator(model, dist, block_size=4, eos_token_ids=[383, plain[1]])
    out, reasons = {}, {}
    generations, cached, _ = gen.prefill(pb.Batch(id=1, requests=[request(1, PROMPTS[2], n=6)]))
    collect(generations, out, reasons)
    run_to_end(gen, cached, out, reasons)
    assert out[1] == plain[:2] and reasons[1] == pb.FINISH_REASON_EOS_TOKEN

    # ignore_eos_token: EOS is generated and generation goes on.
    out, reasons = {}, {}
    r = request(1, PROMPTS[2], n=6, stopping={"ignore_eos_token": True})
    generations, cached, _ = gen.prefill(pb.Batch(id=2, requests=[r]))
    collect(generations, out, reasons)
    run_to_end(gen, cached, out, reasons)
    assert out[1] == plain and reasons[1] == pb.FINISH_REASON_LENGTH

    # Stop token ids.
    out, reasons = {}, {}
    r = request(
        1, PROMPTS[2], n=6, stopping={"stop_token_ids": [plain[2]], "ignore_eos_token": True}
    )
    generations, cached, _ = gen.prefill(pb.Batch(id=3, requests=[r]))
    collect(generations, out, reasons)
    run_to_end(gen, cached, out, reasons)
    assert out[1] == plain[:3] and reasons[1] == pb.FINISH_REASON_STOP_TOKEN

    # min_new_tokens: EOS as the first greedy token is masked for the first two tokens.
    gen = Generator(model, dist, block_size=4, eos_token_ids=[plain[0]])
    r = request(1, PROMPTS[2], n=6, stopping={"min_new_tokens": 2})
    generations, cached, _ = gen.prefill(pb.Batch(id=4, requests=[r]))
    assert generations[0].token.id != plain[0] and not generations[0].finish_reason


def sampled(model, dist, seed: int) -> list[int]:
    gen = Generator(model, dist, block_size=4)
    sampling = pb.SamplingParameters(
        do_sample=True, temperature=1.5, top_k=50, top_p=0.95, seed=seed, repetition_penalty=1.1
    )
    out, reasons = {}, {}
    reqs = [request(1, PROMPTS[1], n=12, sampling=sampling), request(2, PROMPTS[3], n=12)]
    generations, cached, _ = gen.prefill(pb.Batch(id=1, requests=reqs))
    assert generations[0].seed == seed
    collect(generations, out, reasons)
    run_to_end(gen, cached, out, reasons)
    return out[1]


def test_seeded_sampling_is_identical_across_runs_and_depends_on_the_seed(model, dist):
    first = sampled(model, dist, 1234)
    assert sampled(model, dist, 1234) == first
    assert sampled(model, dist, 999) != first


def test_prefill_logprobs_and_token_logprob_equal_transformers_forward(gen, hf):
    ids = PROMPTS[2]
    r = request(1, ids, n=2, prefill_logprobs=True, top_n_tokens=3)
    generations, _, _ = gen.prefill(pb.Batch(id=1, requests=[r, request(2, PROMPTS[1])]))
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1)
    tokens = generations[0].prefill_tokens
    assert [t.id for t in tokens] == ids
    assert math.isnan(tokens[0].logprob) and tokens[0].rank == 0
    for i in range(1, len(ids)):
        assert tokens[i].logprob == pytest.approx(float(ref[i - 1, ids[i]]), abs=1e-4)
        assert tokens[i].rank == int((ref[i - 1] > ref[i - 1, ids[i]]).sum()) + 1
    token = generations[0].token
    assert token.id == int(ref[-1].argmax()) and token.rank == 1
    assert token.logprob == pytest.approx(float(ref[-1].max()), abs=1e-4)
    assert [t.id for t in token.top_tokens] == torch.topk(ref[-1], 3).indices.tolist()
    assert not generations[1].prefill_tokens and not generations[1].token.top_tokens


def test_prefill_logprobs_are_the_same_when_computed_in_chunks(model, dist, gen):
    ids = PROMPTS[2]
    chunked = Generator(model, dist, block_size=4, logits_chunk_rows=3)
    a, _, _ = gen.prefill(pb.Batch(id=1, requests=[request(1, ids, prefill_logprobs=True)]))
    b, _, _ = chunked.prefill(pb.Batch(id=1, requests=[request(1, ids, prefill_logprobs=True)]))
    assert [t.logprob for t in a[0].prefill_tokens][1:] == pytest.approx(
        [t.logprob for t in b[0].prefill_tokens][1:], abs=1e-5
    )


def test_prefill_that_does_not_fit_raises_cache_full_and_changes_nothing(model, dist):
    gen = Generator(model, dist, block_size=4, num_blocks=5)  # 4 usable blocks = 16 tokens
    _, cached, _ = gen.prefill(pb.Batch(id=1, requests=[request(1, PROMPTS[1])]))
    free = gen.allocator.num_free
    with pytest.raises(CacheFullError, match="KV cache full.*prefill"):
        gen.prefill(pb.Batch(id=2, requests=[request(2, PROMPTS[2])]))
    assert gen.allocator.num_free == free and set(gen.batches) == {1}
    gen.decode([cached])  # the running batch is unharmed


def test_decode_that_does_not_fit_raises_cache_full_and_keeps_the_batches(model, dist):
    gen = Generator(model, dist, block_size=4, num_blocks=5)  # 4 usable blocks
    _, a, _ = gen.prefill(pb.Batch(id=1, requests=[request(1, [5, 6, 7, 8], n=10)]))
    _, b, _ = gen.prefill(pb.Batch(id=2, requests=[request(2, [9, 10, 11, 12], n=10)]))
    _, c, _ = gen.prefill(pb.Batch(id=3, requests=[request(3, [13, 14, 15, 16], n=10)]))
    with pytest.raises(CacheFullError, match="decode step"):
        gen.decode([a, b, c])
    assert set(gen.batches) == {1, 2, 3}
    gen.filter_batch(3, [])
    _, merged, _ = gen.decode([a, b])
    assert list(merged.request_ids) == [1, 2]


def test_unknown_batch_ids_raise_not_found_and_clear_cache_ignores_them(gen):
    with pytest.raises(BatchNotFoundError, match="batch 42 not found"):
        gen.decode([pb.CachedBatch(id=42)])
    with pytest.raises(BatchNotFoundError, match="batch 42 not found"):
        gen.filter_batch(42, [1])
    gen.clear_cache(42)


def test_bad_requests_raise_value_errors_naming_the_problem(gen):
    with pytest.raises(ValueError, match="no input_ids"):
        gen.prefill(pb.Batch(id=1, requests=[request(1, [])]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        gen.prefill(pb.Batch(id=1, requests=[request(1, [1, 10_000])]))
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen.prefill(pb.Batch(id=1, requests=[request(1, [1], n=0)]))
    with pytest.raises(ValueError, match="twice"):
        gen.prefill(pb.Batch(id=1, requests=[request(1, [1]), request(1, [2])]))
    gen.prefill(pb.Batch(id=1, requests=[request(1, [1])]))
    with pytest.raises(ValueError, match="already exists"):
        gen.prefill(pb.Batch(id=1, requests=[request(2, [1])]))
    with pytest.raises(ValueError, match="already in a cached batch"):
        gen.prefill(pb.Batch(id=2, requests=[request(1, [1])]))
    assert gen.allocator.num_free == gen.allocator.num_usable - 1


def test_clear_cache_frees_everything(gen):
    start = gen.allocator.num_free
    gen.prefill(pb.Batch(id=1, requests=[request(1, PROMPTS[1])]))
    gen.prefill(pb.Batch(id=2, requests=[request(2, PROMPTS[2])]))
    gen.clear_cache(1)
    assert set(gen.batches) == {2}
    gen.clear_cache()
    assert gen.batches == {} and gen.allocator.num_free == start


def test_warmup_sizes_the_cache_from_the_token_budget_and_leaves_it_empty(gen):
    warm = pb.Batch(id=0, requests=[request(0, list(range(1, 40)), n=50), request(1, [3, 4], n=50)])
    response = gen.warmup(
        pb.WarmupRequest(
            batch=warm, max_input_tokens=40, max_total_tokens=90, max_batch_total_tokens=400
        )
    )
    assert response.block_size == 4
    assert response.num_blocks == 100 and response.max_supported_total_tokens == 400
    assert gen.batches == {} and gen.allocator.num_free == 100


def test_warmup_without_a_budget_sizes_from_memory_within_the_cpu_cap(gen):
    response = gen.warmup(pb.WarmupRequest(batch=pb.Batch(id=0), max_total_tokens=64))
    assert 64 <= response.max_supported_total_tokens <= CPU_MAX_CACHE_TOKENS
    assert response.num_blocks * 4 == response.max_supported_total_tokens


def test_warmup_beyond_memory_fails_clearly_and_keeps_a_working_cache(gen):
    with pytest.raises(CacheFullError, match="max-batch-total-tokens"):
        gen.warmup(pb.WarmupRequest(batch=pb.Batch(id=0), max_batch_total_tokens=4_000_000_000))
    generations, _, _ = gen.prefill(pb.Batch(id=1, requests=[request(1, PROMPTS[1])]))
    assert len(generations) == 1


def test_info_and_health(gen, model):
    info = gen.info()
    assert (info.model_id, info.architecture, info.dtype, info.device_type) == (
        "tiny",
        "LlamaForCausalLM",
        "float32",
        "cpu",
    )
    assert info.world_size == 1 and info.block_size == 4 and info.vocab_size == model.vocab_size
    assert list(info.eos_token_ids) == [model.config.eos_token_id]
    assert info.max_position_embeddings == model.config.max_position_embeddings
    free = gen.allocator.num_free
    gen.health()
    assert gen.allocator.num_free == free
