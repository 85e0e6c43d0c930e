"""One rank of the engine lockstep test (started by torch.multiprocessing).

Every rank runs the same Warmup / Prefill / Decode / FilterBatch sequence a
router would send, on its own slice of the model, and saves what it
answered to ``{out_dir}/rank{rank}.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

CPU = torch.device("cpu")

PROMPTS = {1: [5, 9, 33, 100, 7], 2: [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17], 3: [44], 4: [3, 60]}
MAX_NEW = {1: 9, 2: 6, 3: 10, 4: 7}
SEED = 2024


def _requests(pb, ids: list[int]):
    out = []
    for rid in ids:
        sampling = pb.SamplingParameters()
        if rid in (3, 4):
            sampling = pb.SamplingParameters(
                do_sample=True, temperature=1.3, top_k=40, top_p=0.9, seed=SEED + rid
            )
        out.append(
            pb.Request(
                id=rid,
                input_ids=PROMPTS[rid],
                sampling=sampling,
                stopping=pb.StoppingParameters(max_new_tokens=MAX_NEW[rid], ignore_eos_token=True),
                top_n_tokens=2,
                prefill_logprobs=rid == 1,
            )
        )
    return out


def run_rank(rank: int, world_size: int, port: int, model_dir: str, out_dir: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from text_generation_server.distributed import init_distributed
    from text_generation_server.engine import CacheFullError, Generator
    from text_generation_server.models import load_model
    from text_generation_server.pb.generate.v1 import generate_pb2 as pb

    torch.set_num_threads(1)
    dist = init_distributed(rank, world_size, master_port=port, timeout_s=60)
    model = load_model(model_dir, dtype=torch.float32, device=CPU, dist=dist)
    gen = Generator(model, dist, block_size=4)
    result: dict = {"tokens": {}, "logprobs": {}, "reasons": {}, "cache_full": None}

    def collect(generations):
        for g in generations:
            result["tokens"].setdefault(g.request_id, []).append(g.token.id)
            result["logprobs"].setdefault(g.request_id, []).append(g.token.logprob)
            if g.prefill_tokens:
                result["prefill"] = [t.logprob for t in g.prefill_tokens[1:]]
            if g.finish_reason:
                result["reasons"][g.request_id] = g.finish_reason

    # Memory-based sizing reads each rank's own view of free memory; ranks must agree.
    warm = gen.warmup(
        pb.WarmupRequest(batch=pb.Batch(id=0, requests=_requests(pb, [2])), max_total_tokens=64)
    )
    result["warmup"] = (warm.num_blocks, warm.max_supported_total_tokens)

    generations, running, _ = gen.prefill(pb.Batch(id=1, requests=_requests(pb, [1, 3])))
    collect(generations)
    for _ in range(2):
        generations, running, _ = gen.decode([running])
        collect(generations)
    # A prefill that cannot fit fails the same way on every rank and leaves the rest intact.
    huge = pb.Request(
        id=99,
        input_ids=[1] * (gen.cache.capacity_tokens + 1),
        stopping=pb.StoppingParameters(max_new_tokens=1),
    )
    try:
        gen.prefill(pb.Batch(id=9, requests=[huge]))
    except CacheFullError as e:
        result["cache_full"] = str(e)
    generations, new, _ = gen.prefill(pb.Batch(id=2, requests=_requests(pb, [2, 4])))
    collect(generations)
    generations, running, _ = gen.decode([running, new])
    collect(generations)
    running = gen.filter_batch(1, [1, 2, 3])  # the router dropped request 4
    while running is not None and running.size:
        generations, running, _ = gen.decode([running])
        collect(generations)
    result["free_after"] = (gen.allocator.num_free, gen.allocator.num_usable)

    # Prefix caching, chunked prefill and speculation on this rank's heads: a prompt sharing a
    # served prefix, with and without the cache, whole, in chunks of 5 tokens, and speculated.
    def run(generator, rid, ids, chunk=0):
        out = []
        generations, cached, _ = generator.prefill(pb.Batch(id=rid, requests=[pb.Request(
            id=rid, input_ids=ids, stopping=pb.StoppingParameters(max_new_tokens=5, ignore_eos_token=True),
            top_n_tokens=3)]), chunk)
        while True:
            out += [(g.token.id, g.token.logprob, g.cached_tokens) for g in generations]
            if cached is None:
                return out
            generations, cached, _ = generator.decode([cached], chunk)

    shared = [(5 * i + 2) % 120 + 1 for i in range(21)]
    warm = Generator(model, dist, block_size=4, prefix_caching=True)
    run(warm, 20, shared + [3])
    result["prefix"] = {
        "warm": run(warm, 21, shared + [9, 10, 11]),
        "cold": run(Generator(model, dist, block_size=4), 21, shared + [9, 10, 11]),
        "chunked": run(Generator(model, dist, block_size=4), 21, shared + [9, 10, 11], chunk=5),
        "speculative": run(Generator(model, dist, block_size=4, speculate=3), 21, shared + [9, 10, 11]),
    }
    dist.barrier()
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    dist.shutdown()
