"""Write a GPTQ checkpoint of a small model, and the same model with those weights dequantized.

Round-to-nearest per group (no calibration) is enough to pin the serving
path: the dequantized twin is what a correct server must compute, and
transformers runs it as an independent reference.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from text_generation_server.quantize.packing import group_index, num_groups, pack_gptq

LINEAR_SUFFIXES = (
    "q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
    "gate_proj.weight", "up_proj.weight", "down_proj.weight",
    "w1.weight", "w2.weight", "w3.weight",  # Mixtral's experts, each quantized on its own (GPTQModel)
    "qkv_proj.weight", "gate_up_proj.weight",  # Phi-3's fused projections, quantized fused
    "query_key_value.weight", "attention.dense.weight", "dense_h_to_4h.weight", "dense_4h_to_h.weight",  # Falcon
)


def rtn_quantize(
    w: torch.Tensor, g_idx: torch.Tensor, groups: int, bits: int, sym: bool, min_zero: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer codes ``[out, in]``, scales (fp16) and zeros ``[G, out]`` for ``w``."""
    maxq = (1 << bits) - 1
    out = w.shape[0]
    scales = torch.empty(groups, out)
    zeros = torch.empty(groups, out, dtype=torch.int32)
    codes = torch.empty_like(w, dtype=torch.int32)
    for j in range(groups):
        cols = (g_idx == j).nonzero().flatten()
        block = w[:, cols]
        lo = block.min(dim=1).values.clamp(max=0)
        hi = block.max(dim=1).values.clamp(min=0)
        if sym:
            hi = torch.maximum(hi, -lo)
            lo = -hi
        scale = ((hi - lo) / maxq).clamp(min=1e-5).half()
        zero = (maxq + 1) // 2 if sym else torch.round(-lo / scale.float())
        zero = torch.as_tensor(zero).expand(out).clamp(min_zero, maxq).to(torch.int32)
        q = torch.round(block / scale.float()[:, None]) + zero[:, None]
        codes[:, cols] = q.clamp(0, maxq).to(torch.int32)
        scales[j], zeros[j] = scale.float(), zero
    return codes, scales.half(), zeros


def write_gptq_checkpoint(
    src: Path,
    out: Path,
    *,
    bits: int = 4,
    group_size: int = 32,
    desc_act: bool = False,
    sym: bool = True,
    fmt: str = "gptq",
    legacy_config: bool = False,
    seed: int = 0,
) -> tuple[Path, Path]:
    """GPTQ checkpoint at ``out`` and its dequantized fp32 twin at ``out``-dense."""
    src, out = Path(src), Path(out)
    dense_dir = out.with_name(out.name + "-dense")
    for d in (out, dense_dir):
        d.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.suffix != ".safetensors":
                shutil.copy(f, d / f.name)
    tensors = load_file(str(src / "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    quantized, dense = {}, {}
    for name, w in tensors.items():
        if not name.endswith(LINEAR_SUFFIXES):
            quantized[name] = dense[name] = w
            continue
        w = w.float()
        k = w.shape[1]
        perm = torch.randperm(k, generator=gen) if desc_act else None
        g_idx = group_index(k, group_size, perm)
        groups = num_groups(k, group_size)
        min_zero = 1 if fmt == "gptq" else 0
        codes, scales, zeros = rtn_quantize(w, g_idx, groups, bits, sym, min_zero)
        prefix = name.removesuffix(".weight")
        for key, t in pack_gptq(codes, scales, zeros, g_idx, bits, fmt).items():
            quantized[f"{prefix}.{key}"] = t
        gi = g_idx.long()
        dense[name] = (scales.float()[gi].t() * (codes.float() - zeros.float()[gi].t())).contiguous()
    save_file(quantized, str(out / "model.safetensors"))
    save_file(dense, str(dense_dir / "model.safetensors"))
    quant_config = {
        "bits": bits,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": sym,
        "static_groups": False,
        "true_sequential": True,
        "damp_percent": 0.01,
        "quant_method": "gptq",
        "checkpoint_format": fmt,
    }
    if legacy_config:
        legacy = {k: v for k, v in quant_config.items() if k != "quant_method"}
        (out / "quantize_config.json").write_text(json.dumps(legacy))
    else:
        config = json.loads((src / "config.json").read_text())
        config["quantization_config"] = quant_config
        (out / "config.json").write_text(json.dumps(config))
    return out, dense_dir
