"""Body of one rank in the three-rank parallel-layer tests (started by torch.multiprocessing).

Each rank joins a real gloo group of 3, builds every parallel layer for its
rank from dense weights in a safetensors file (reading only its slice), runs
it on the same input and saves its raw outputs to ``{out_dir}/rank{rank}.pt``;
the test process rebuilds the dense results independently and compares.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

CPU = torch.device("cpu")
HEAD_DIM = 2
HIDDEN = 8
# (query heads, KV heads): one KV head per rank, and two KV heads replicated over three ranks.
HEAD_LAYOUTS = {"9q3kv": (9, 3), "6q2kv": (6, 2)}
INTERMEDIATE = 11  # 4 + 4 + 3 on three ranks


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention over ``[T, heads, dim]`` with KV heads shared by consecutive query heads."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True
    )
    return out.transpose(0, 1).reshape(q.shape[0], -1)


def _linear_kwargs(dist) -> dict:
    from text_generation_server.layers.quant.unquantized import UnquantizedLinearMethod

    return {"quant_method": UnquantizedLinearMethod(), "dist": dist, "dtype": torch.float32, "device": CPU}


def _load(layer: torch.nn.Module, weights, names: dict[str, list[tuple[str, object]]]) -> None:
    for param_name, sources in names.items():
        param = getattr(layer, param_name)
        for tensor_name, shard_id in sources:
            param.weight_loader(param, weights, tensor_name, shard_id)


def _layers(dist, weights) -> dict[str, object]:
    from text_generation_server.layers.embedding import ParallelLMHead, VocabParallelEmbedding
    from text_generation_server.layers.linear import (
        ColumnParallelLinear,
        MergedColumnParallelLinear,
        QKVParallelLinear,
        RowParallelLinear,
    )
    from text_generation_server.layers.partition import partition_heads
    from text_generation_server.weights import shard_range

    x = weights.get_tensor("x")
    out: dict[str, object] = {}

    col = ColumnParallelLinear(HIDDEN, 10, bias=True, **_linear_kwargs(dist))
    _load(col, weights, {"weight": [("col.weight", None)], "bias": [("col.bias", None)]})
    local = col(x)
    out["column_local"] = local
    out["column_gathered"] = dist.all_gather(local, dim=-1)

    gate_up = MergedColumnParallelLinear(HIDDEN, [INTERMEDIATE, INTERMEDIATE], bias=False, **_linear_kwargs(dist))
    _load(gate_up, weights, {"weight": [("gate.weight", 0), ("up.weight", 1)]})
    down = RowParallelLinear(
        INTERMEDIATE,
        HIDDEN,
        bias=True,
        input_range=shard_range(INTERMEDIATE, dist.world_size, dist.rank),
        **_linear_kwargs(dist),
    )
    _load(down, weights, {"weight": [("down.weight", None)], "bias": [("down.bias", None)]})
    gate, up = gate_up(x).split(gate_up.output_sizes, dim=-1)
    out["gate_gathered"] = dist.all_gather(gate.contiguous(), dim=-1)
    out["up_gathered"] = dist.all_gather(up.contiguous(), dim=-1)
    out["mlp"] = down(F.silu(gate) * up)

    for key, (heads, kv_heads) in HEAD_LAYOUTS.items():
        part = partition_heads(heads, kv_heads, dist.world_size)[dist.rank]
        qkv = QKVParallelLinear(HIDDEN, HEAD_DIM, heads, kv_heads, part, bias=True, **_linear_kwargs(dist))
        _load(
            qkv,
            weights,
            {
                "weight": [(f"{key}.q.weight", "q"), (f"{key}.k.weight", "k"), (f"{key}.v.weight", "v")],
                "bias": [(f"{key}.q.bias", "q"), (f"{key}.k.bias", "k"), (f"{key}.v.bias", "v")],
            },
        )
        o_proj = RowParallelLinear(
            heads * HEAD_DIM,
            HIDDEN,
            bias=False,
            input_range=(part.q_start * HEAD_DIM, part.q_stop * HEAD_DIM),
            **_linear_kwargs(dist),
        )
        _load(o_proj, weights, {"weight": [(f"{key}.o.weight", None)]})
        q_size, kv_size = part.num_heads * HEAD_DIM, part.num_kv_heads * HEAD_DIM
        q, k, v = qkv(x).split([q_size, kv_size, kv_size], dim=-1)
        out[f"{key}.partition"] = (part.q_start, part.q_stop, part.kv_start, part.kv_stop)
        out[f"{key}.q"], out[f"{key}.k"], out[f"{key}.v"] = q, k, v
        tokens = x.shape[0]
        heads_out = attention(
            q.reshape(tokens, -1, HEAD_DIM), k.reshape(tokens, -1, HEAD_DIM), v.reshape(tokens, -1, HEAD_DIM)
        )
        out[f"{key}.attention"] = o_proj(heads_out)

    vocab, hidden = weights.get_shape("embed.weight")
    emb = VocabParallelEmbedding(vocab, hidden, dist=dist, dtype=torch.float32, device=CPU)
    emb.weight.weight_loader(emb.weight, weights, "embed.weight")
    out["embedding"] = emb(weights.get_tensor("ids"))
    out["embedding_rows"] = emb.weight.shape[0]
    head = ParallelLMHead(vocab, hidden, dist=dist, dtype=torch.float32, device=CPU)
    head.weight.weight_loader(head.weight, weights, "head.weight")
    out["lm_head_untied"] = head(x)
    out["lm_head_rows"] = head.weight.shape[0]
    tied = ParallelLMHead(vocab, hidden, dist=dist, dtype=torch.float32, device=CPU, tied_to=emb)
    out["lm_head_tied"] = tied(x)
    return out


def run_rank(rank: int, world_size: int, port: int, tensor_file: str, out_dir: str) -> None:
    """Entry point for ``torch.multiprocessing.spawn``."""
    from text_generation_server.distributed import init_distributed
    from text_generation_server.weights import Weights

    torch.set_num_threads(1)
    dist = init_distributed(rank, world_size, "127.0.0.1", port, timeout_s=60.0)
    try:
        weights = Weights([Path(tensor_file)], device=CPU, dtype=torch.float32, dist=dist)
        torch.save(_layers(dist, weights), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.shutdown()
