"""Body of one rank in the GPTQ tensor-parallel test (started by torch.multiprocessing).

Loads each GPTQ checkpoint with each kernel on its slice, runs one prefill
and saves logits, kernel names and weight bytes to ``{out_dir}/rank{rank}.pt``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

CPU = torch.device("cpu")
IDS = torch.randint(0, 384, (11,), generator=torch.Generator().manual_seed(5)).tolist()
KERNELS = ("gptq-reference", "cpu-int4pack-bf16", "cpu-int4-avx2")


def _served(dist, path: Path, kernel: str) -> dict[str, object]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from paged_runner import PagedRunner
    from text_generation_server.layers.quant.gptq import GPTQLinearMethod
    from text_generation_server.models import load_model

    os.environ["GPTQ_KERNEL"] = kernel
    if kernel == "cpu-int4-avx2":
        from text_generation_server.kernels import cpu_ops_status

        if not cpu_ops_status().available:
            return {"kernel": "unavailable"}
    model = load_model(path, dtype=torch.float32, device=CPU, dist=dist, quantize="gptq")
    methods = [
        m.quant_method
        for m in model.modules()
        if isinstance(getattr(m, "quant_method", None), GPTQLinearMethod)
    ]
    return {
        "logits": PagedRunner(model, seed=dist.rank).step([("a", IDS)])[0],
        "kernel": model.kernel,
        "tp_plan": model.tp_plan,
        "weight_bytes": sum(m.weight_bytes() for m in methods),
        "fp16_bytes": sum(m.fp16_bytes for m in methods),
        "o_proj_groups_split": model.model.layers[0].self_attn.o_proj.quant_method.group_offset,
    }


def run_rank(rank: int, world_size: int, port: int, checkpoints: list[str], out_dir: str) -> None:
    """Entry point for ``torch.multiprocessing.spawn``."""
    from text_generation_server.distributed import init_distributed

    torch.set_num_threads(1)
    dist = init_distributed(rank, world_size, "127.0.0.1", port, timeout_s=60.0)
    try:
        results = {
            (ckpt, kernel): _served(dist, Path(ckpt), kernel)
            for ckpt in checkpoints
            for kernel in KERNELS
        }
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.shutdown()
