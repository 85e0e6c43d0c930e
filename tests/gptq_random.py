"""Random GPTQ layers with their dense weights, shared by the GPTQ kernel tests.

The dense weight is computed from the random codes, zero points and scales
(``w = scale[g] * (q - zero[g])``), not by unpacking the packed tensors the
kernels read.
"""

from __future__ import annotations

import torch
from text_generation_server.layers.quant.gptq_kernels import GPTQWeights
from text_generation_server.quantize.packing import group_index, num_groups, pack_gptq


def random_gptq(
    k: int,
    n: int,
    *,
    bits: int = 4,
    group_size: int = 64,
    sym: bool = True,
    fmt: str = "gptq",
    desc_act: bool = False,
    seed: int = 0,
) -> tuple[GPTQWeights, torch.Tensor]:
    """Packed GPTQ tensors for a random ``[n, k]`` layer and its dense weight."""
    g = torch.Generator().manual_seed(seed)
    groups = num_groups(k, group_size)
    top = (1 << bits) - 1
    codes = torch.randint(0, top + 1, (n, k), generator=g, dtype=torch.int32)
    if sym:
        zeros = torch.full((groups, n), (top + 1) // 2, dtype=torch.int32)
    else:
        # v1 stores zero - 1, so it cannot hold a zero point of 0.
        low = 1 if fmt == "gptq" else 0
        zeros = torch.randint(low, top + 1, (groups, n), generator=g, dtype=torch.int32)
    scales = (torch.rand(groups, n, generator=g) * 0.02 + 0.005).half()
    perm = torch.randperm(k, generator=g) if desc_act else None
    g_idx = group_index(k, group_size, perm)
    packed = pack_gptq(codes, scales, zeros, g_idx, bits, fmt)
    gi = g_idx.long()
    dense = scales.float()[gi].t() * (codes.float() - zeros.float()[gi].t())
    weights = GPTQWeights(
        qweight=packed["qweight"],
        qzeros=packed["qzeros"],
        scales=packed["scales"],
        g_idx=packed["g_idx"],
        bits=bits,
        checkpoint_format=fmt,
    )
    return weights, dense


def activations(m: int, k: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed))


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want).norm() / want.norm())


def default_cpu_int4_kernel() -> str:
    """The 4-bit kernel a CPU shard picks by itself here: the native one where it runs."""
    from text_generation_server.kernels import cpu_ops_status

    return "cpu-int4-avx2" if cpu_ops_status().available else "cpu-int4pack-bf16"


def cpu_int4_kernels() -> list[str]:
    """Every 4-bit CPU kernel that runs here."""
    return ["cpu-int4pack-bf16"] + (["cpu-int4-avx2"] if default_cpu_int4_kernel() == "cpu-int4-avx2" else [])
