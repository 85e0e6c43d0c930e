"""Two gloo ranks running the engine in lockstep answer identically, and like transformers."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))

import engine_worker  # noqa: E402

# Two spawned ranks load torch and the model: over ten seconds in all.
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, tiny_llama_tied) -> list[dict]:
    out = tmp_path_factory.mktemp("engine-tp2")
    ctx = mp.start_processes(
        engine_worker.run_rank,
        args=(2, free_port(), str(tiny_llama_tied), str(out)),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("ranks did not finish: a collective is out of lockstep")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_every_rank_samples_the_same_tokens_and_sizes_the_same_cache(ranks):
    a, b = ranks
    assert a["tokens"] == b["tokens"]
    assert a["reasons"] == b["reasons"]
    assert a["warmup"] == b["warmup"]
    assert a["logprobs"].keys() == b["logprobs"].keys()
    for rid in a["logprobs"]:
        assert a["logprobs"][rid] == pytest.approx(b["logprobs"][rid], abs=1e-5)


def test_a_refused_prefill_fails_on_every_rank_and_generation_continues(ranks):
    assert all(r["cache_full"] and "KV cache full" in r["cache_full"] for r in ranks)
    assert ranks[0]["tokens"][1] and len(ranks[0]["tokens"][1]) == engine_worker.MAX_NEW[1]


def test_greedy_requests_on_two_ranks_equal_transformers(ranks, tiny_llama_tied):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_tied, dtype=torch.float32).eval()
    for rid in (1, 2):
        ids = engine_worker.PROMPTS[rid]
        n = engine_worker.MAX_NEW[rid]
        ref = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n, min_new_tokens=n)
        assert ranks[0]["tokens"][rid] == ref[0, len(ids) :].tolist(), rid
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0], -1)
        if rid == 1:
            expected = [float(logp[i - 1, ids[i]]) for i in range(1, len(ids))]
            assert ranks[0]["prefill"] == pytest.approx(expected, abs=1e-4)


def test_all_blocks_are_free_once_every_request_finished_or_was_dropped(ranks):
    for r in ranks:
        free, usable = r["free_after"]
        assert free == usable
        assert set(r["reasons"]) == {1, 2, 3}  # 4 was dropped by FilterBatch


def test_a_cached_prefix_a_chunked_prefill_and_speculation_give_a_cold_greedy_answer_on_every_rank(ranks):
    for r in ranks:
        prefix = r["prefix"]
        assert prefix["warm"][0][2] == 20 and prefix["cold"][0][2] == 0  # 5 of the 21 shared tokens' blocks
        for name in ("warm", "chunked", "speculative"):
            assert [t for t, _, _ in prefix[name]] == [t for t, _, _ in prefix["cold"]], name
            assert [lp for _, lp, _ in prefix[name]] == pytest.approx([lp for _, lp, _ in prefix["cold"]], abs=1e-4)
    assert ranks[0]["prefix"]["warm"] == ranks[1]["prefix"]["warm"]
