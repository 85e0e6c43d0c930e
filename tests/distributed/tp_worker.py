"""Body of one rank in the tensor-parallel tests (started by torch.multiprocessing).

Each rank joins a real gloo group, runs every check on its own slice of the
weights and saves what it computed to ``{out_dir}/rank{rank}.pt``; the test
process compares those results with dense and transformers references.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

CPU = torch.device("cpu")


HALF_DTYPES = (torch.bfloat16, torch.float16)


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 384, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# Token streams every model check runs; the test recomputes them with transformers.
PROMPT = _ids(13, 1)
DECODE = _ids(5, 2)
BATCH = {"b": _ids(4, 3), "c": _ids(9, 4)}
BATCH_NEXT = {"b": 11, "c": 200}


def _collectives(dist) -> dict[str, torch.Tensor]:
    rank = dist.rank
    summed = dist.all_reduce(torch.full((3,), float(rank + 1)))
    summed_bf16 = dist.all_reduce(torch.full((2,), float(rank + 1), dtype=torch.bfloat16))
    # Rank r contributes r + 1 columns: sizes differ on every rank.
    piece = torch.arange(2 * (rank + 1), dtype=torch.float32).reshape(2, rank + 1) + 100 * rank
    gathered = dist.all_gather(piece, dim=-1)
    sizes = [r + 1 for r in range(dist.world_size)]
    gathered_known = dist.all_gather(piece, dim=1, sizes=sizes)
    dist.barrier()
    return {
        "all_reduce": summed,
        "all_reduce_bf16": summed_bf16.float(),
        "all_gather": gathered,
        "all_gather_sizes": gathered_known,
    }


def _layers(dist, layer_file: Path) -> dict[str, torch.Tensor]:
    from text_generation_server.layers.embedding import ParallelLMHead, VocabParallelEmbedding
    from text_generation_server.layers.linear import RowParallelLinear
    from text_generation_server.layers.quant.unquantized import UnquantizedLinearMethod
    from text_generation_server.weights import Weights, shard_range

    weights = Weights([layer_file], device=CPU, dtype=torch.float32, dist=dist)
    x = weights.get_tensor("row.input")
    out_features, in_features = weights.get_shape("row.weight")
    row = RowParallelLinear(
        in_features,
        out_features,
        bias=True,
        quant_method=UnquantizedLinearMethod(),
        dist=dist,
        dtype=torch.float32,
        device=CPU,
    )
    for name in ("weight", "bias"):
        param = getattr(row, name)
        param.weight_loader(param, weights, f"row.{name}")
    start, stop = shard_range(x.shape[-1], dist.world_size, dist.rank)
    row_out = row(x[:, start:stop])

    vocab, hidden = weights.get_shape("vocab.table")
    emb = VocabParallelEmbedding(vocab, hidden, dist=dist, dtype=torch.float32, device=CPU)
    emb.weight.weight_loader(emb.weight, weights, "vocab.table")
    head = ParallelLMHead(vocab, hidden, dist=dist, dtype=torch.float32, device=CPU, tied_to=emb)
    ids = weights.get_tensor("vocab.ids")
    return {
        "row_parallel": row_out,
        "embedding": emb(ids),
        "lm_head": head(weights.get_tensor("vocab.hidden")),
    }


def _model(dist, model_dir: Path, dtype: torch.dtype = torch.float32) -> dict[str, object]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from paged_runner import PagedRunner
    from text_generation_server.models import load_model

    model = load_model(model_dir, dtype=dtype, device=CPU, dist=dist)
    runner = PagedRunner(model, block_size=4, seed=dist.world_size)
    prefill = runner.step([("a", PROMPT)])[0]
    decode = [runner.step([("a", [t])])[0][0] for t in DECODE]
    batch_prefill = runner.step(list(BATCH.items()))
    batch_decode = runner.step([(k, [v]) for k, v in BATCH_NEXT.items()])
    return {
        "tp_plan": model.tp_plan,
        "plan": model.plan.name,
        "num_kv_heads": model.num_kv_heads,
        "prefill": prefill,
        "decode": torch.stack(decode),
        "batch_prefill": batch_prefill,
        "batch_decode": [t[0] for t in batch_decode],
    }


def run_rank(
    rank: int, world_size: int, port: int, layer_file: str, models: list[str], out_dir: str
) -> None:
    """Entry point for ``torch.multiprocessing.spawn``."""
    from text_generation_server.distributed import init_distributed

    torch.set_num_threads(1)
    dist = init_distributed(rank, world_size, "127.0.0.1", port, timeout_s=60.0)
    try:
        results: dict[str, object] = {"collectives": _collectives(dist)}
        results["layers"] = _layers(dist, Path(layer_file))
        for model_dir in models:
            results[f"model:{model_dir}"] = _model(dist, Path(model_dir))
        # The first model again with 16-bit weights (the native layers' float32 activations).
        for dtype in HALF_DTYPES:
            results[f"model:{models[0]}:{dtype}"] = _model(dist, Path(models[0]), dtype)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.shutdown()
