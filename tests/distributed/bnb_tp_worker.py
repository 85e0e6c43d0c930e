"""Body of one rank in the bitsandbytes tensor-parallel tests (started by torch.multiprocessing).

Each rank joins a real gloo group, quantizes its own slice of a column- and a
row-parallel layer and of a whole model under every bitsandbytes mode, and
saves the full (gathered or reduced) outputs to ``{out_dir}/rank{rank}.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

CPU = torch.device("cpu")
MODES = ("bitsandbytes", "bitsandbytes-nf4", "bitsandbytes-fp4")
PROMPT = torch.randint(0, 384, (11,), generator=torch.Generator().manual_seed(1)).tolist()


def layer_outputs(dist, layer_file: Path, mode: str) -> dict[str, torch.Tensor]:
    from text_generation_server.layers.linear import ColumnParallelLinear, RowParallelLinear
    from text_generation_server.layers.quant.registry import get_quant_method
    from text_generation_server.weights import Weights, shard_range

    quant = get_quant_method(mode, None)
    weights = Weights([layer_file], device=CPU, dtype=torch.float32, dist=dist)
    out: dict[str, torch.Tensor] = {}
    for kind, cls in (("col", ColumnParallelLinear), ("row", RowParallelLinear)):
        out_features, in_features = weights.get_shape(f"{kind}.weight")
        layer = cls(
            in_features,
            out_features,
            bias=True,
            quant_method=quant(kind),
            dist=dist,
            dtype=torch.float32,
            device=CPU,
        )
        for name, param in list(layer.named_parameters(recurse=False)):
            param.weight_loader(param, weights, f"{kind}.{name}")
        layer.quant_method.process_weights_after_loading(layer)
        x = weights.get_tensor(f"{kind}.input")
        with torch.inference_mode():
            if kind == "col":
                out[kind] = dist.all_gather(layer(x), dim=-1)
            else:
                start, stop = shard_range(in_features, dist.world_size, dist.rank)
                out[kind] = layer(x[:, start:stop])
        out[f"{kind}.kernel"] = layer.quant_method.kernel_name(layer)
    return out


def model_logits(dist, model_dir: Path, mode: str | None) -> torch.Tensor:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from paged_runner import PagedRunner
    from text_generation_server.models import load_model

    model = load_model(model_dir, dtype=torch.float32, device=CPU, dist=dist, quantize=mode)
    return PagedRunner(model, block_size=4, seed=dist.world_size).step([("a", PROMPT)])[0]


def run_rank(
    rank: int, world_size: int, port: int, layer_file: str, model_dir: str, out_dir: str
) -> None:
    """Entry point for ``torch.multiprocessing.spawn``."""
    from text_generation_server.distributed import init_distributed

    torch.set_num_threads(1)
    dist = init_distributed(rank, world_size, "127.0.0.1", port, timeout_s=60.0)
    try:
        results = {
            mode: {
                "layers": layer_outputs(dist, Path(layer_file), mode),
                "model": model_logits(dist, Path(model_dir), mode),
            }
            for mode in MODES
        }
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.shutdown()
