"""Perplexity of a checkpoint on held-out text.

A GPTQ checkpoint is evaluated by dequantizing its weights into a float32
transformers model, so the number depends only on what the checkpoint holds,
not on any serving kernel.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from loguru import logger
from tqdm import tqdm

from text_generation_server.quantize.checkpoint import (
    CheckpointReadError,
    SafetensorsCheckpoint,
    decoder_parts,
    meta_model,
    read_config_json,
)
from text_generation_server.quantize.packing import CHECKPOINT_FORMATS, dequantize_gptq


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int
    windows: int
    seqlen: int
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def gptq_settings(path: Path) -> dict | None:
    """The checkpoint's GPTQ settings (config.json, else quantize_config.json), or None if unquantized."""
    config = read_config_json(path).get("quantization_config")
    if not config:
        fallback = Path(path) / "quantize_config.json"
        if fallback.is_file():
            import json

            config = json.loads(fallback.read_text())
    if not config:
        return None
    method = config.get("quant_method", "gptq")
    if method != "gptq":
        raise CheckpointReadError(f"{path} is quantized with {method!r}; only GPTQ checkpoints can be dequantized here")
    return config


def load_float_model(path: Path, trust_remote_code: bool = False) -> torch.nn.Module:
    """A float32 transformers model of the checkpoint; GPTQ linears are dequantized."""
    from transformers import AutoConfig

    path = Path(path)
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    settings = gptq_settings(path)
    model = meta_model(config, trust_remote_code)
    checkpoint = SafetensorsCheckpoint(path)
    bits = fmt = None
    if settings is not None:
        bits = int(settings["bits"])
        fmt = settings.get("checkpoint_format", "gptq")
        if fmt not in CHECKPOINT_FORMATS:
            raise CheckpointReadError(f"{path}: checkpoint_format {fmt!r} is not one of {', '.join(CHECKPOINT_FORMATS)}")
    state: dict[str, torch.Tensor] = {}
    dequantized = 0
    for name, target in model.state_dict().items():
        stem = name.removesuffix(".weight")
        if bits is not None and name.endswith(".weight") and f"{stem}.qweight" in checkpoint:
            weight = dequantize_gptq(
                checkpoint.get(f"{stem}.qweight"), checkpoint.get(f"{stem}.qzeros"),
                checkpoint.get(f"{stem}.scales"), checkpoint.get(f"{stem}.g_idx"), bits, fmt,
            )
            dequantized += 1
        elif name in checkpoint:
            weight = checkpoint.get(name)
        elif name == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
            weight = checkpoint.get(decoder_parts(model).embed_prefix + "weight")
        else:
            raise CheckpointReadError(f"tensor {name!r} is missing from the checkpoint in {path}")
        if weight.shape != target.shape:
            raise CheckpointReadError(f"tensor {name} has shape {tuple(weight.shape)}, the model expects {tuple(target.shape)}")
        state[name] = weight.to(torch.float32)
    model.load_state_dict(state, strict=True, assign=True)
    if settings is not None:
        logger.info(f"Dequantized {dequantized} GPTQ linears ({bits}-bit, format {fmt}) to float32")
    return model


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int | None = None) -> PerplexityResult:
    """Perplexity over ``windows [n, seqlen]``: every token but each window's first is scored."""
    n, seqlen = windows.shape
    if batch_size is None:
        batch_size = max(1, 2048 // seqlen)
    total_nll = 0.0
    scored = 0
    t0 = time.perf_counter()
    for batch in tqdm(windows.split(batch_size), desc="Perplexity", unit="batch", dynamic_ncols=True):
        logits = model(input_ids=batch, use_cache=False).logits
        nll = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += float(nll)
        scored += batch[:, 1:].numel()
    mean = total_nll / scored
    return PerplexityResult(math.exp(mean), mean, scored, n, seqlen, time.perf_counter() - t0)
