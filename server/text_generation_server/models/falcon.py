"""Falcon from the Llama family's parts.

Both of Falcon's layouts, as transformers computes them:

- falcon-7b (``multi_query``): one KV head; one LayerNorm per layer, read by both blocks;
- falcon-40b/180b (``new_decoder_architecture``): grouped KV heads; two LayerNorms per layer,
  ``ln_attn`` before attention and ``ln_mlp`` before the MLP;

and in both, parallel attention: each layer's attention and MLP read the same residual
stream and their outputs are summed into it (the spec's ``parallel``: on several shards one
all-reduce per layer). The MLP is not gated: ``dense_4h_to_h(gelu(dense_h_to_4h(x)))`` with
GELU's erf form. Norms are LayerNorms with a bias; rotary is the default rope.

The checkpoint's fused ``query_key_value`` holds the heads interleaved (40b: per KV group its
query heads, then its key and value; 7b: every query head, then the key and the value; the
older per-head ``[q, k, v]`` layout too): it is read as q/k/v parts through
:meth:`~text_generation_server.weights.Weights.regroup`, so the heads shard like Llama's,
GPTQ tensors included. Every other tensor is read under the Llama module's name. ALiBi
(falcon-rw) is refused.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from text_generation_server.layers.attention import AttentionMetadata
from text_generation_server.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from text_generation_server.layers.norm import LayerNorm
from text_generation_server.layers.rotary import rope_refusal
from text_generation_server.models.llama import (
    LINEAR_TENSORS,
    LlamaAttention,
    LlamaBuild,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    whole_words,
)
from text_generation_server.models.spec import DecoderLayerSpec, MLPSpec
from text_generation_server.weights import CheckpointError, shard_range


def _two_norms(config: Any) -> bool:
    """falcon-40b's ln_attn / ln_mlp (new_decoder_architecture, two norms unless it says one)."""
    return bool(config.new_decoder_architecture) and (config.num_ln_in_parallel_attn or 2) == 2


def _parallel(config: Any) -> bool:
    return bool(config.new_decoder_architecture or config.parallel_attn)


class FalconMLP(torch.nn.Module):
    """``down(gelu(up(x)))``: ``dense_h_to_4h`` as the up projection, not gated."""

    activation = "gelu"

    def __init__(self, b: LlamaBuild, prefix: str) -> None:
        super().__init__()
        size, hidden = b.config.ffn_hidden_size, b.config.hidden_size
        align = b.quant.input_alignment()
        # One part, split like down_proj's input, in units the quantization allows.
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden, [size], align=align, bias=b.mlp_bias, quant_method=b.quant(f"{prefix}.up_proj"),
            **b.tensor_args(),
        )
        self.down_proj = RowParallelLinear(
            size, hidden, input_range=shard_range(size, b.dist.world_size, b.dist.rank, align), bias=b.mlp_bias,
            quant_method=b.quant(f"{prefix}.down_proj"), **b.tensor_args(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_up_proj(x)))


class FalconDecoderLayer(LlamaDecoderLayer):
    """``input_layernorm`` (``ln_attn``) before attention; the MLP reads ``post_attention_layernorm``
    (``ln_mlp``) of the same stream where the layer has two norms, else attention's input."""

    norm_cls = LayerNorm

    def __init__(self, b: LlamaBuild, prefix: str) -> None:
        torch.nn.Module.__init__(self)
        config = b.config
        hidden, eps = config.hidden_size, config.layer_norm_epsilon
        self.parallel = _parallel(config)
        self.self_attn = LlamaAttention(b, f"{prefix}.self_attn")
        self.mlp = FalconMLP(b, f"{prefix}.mlp")
        self.input_layernorm = LayerNorm(hidden, eps, dtype=b.dtype, device=b.device)
        shared = self.parallel and not _two_norms(config)
        self.post_attention_layernorm = None if shared else LayerNorm(hidden, eps, dtype=b.dtype, device=b.device)

    def spec(self) -> DecoderLayerSpec:
        base = super().spec()
        return DecoderLayerSpec(
            attention=base.attention,
            mlp=MLPSpec(gate_up=self.mlp.gate_up_proj, down=self.mlp.down_proj, activation="gelu"),
            attention_norm=self.input_layernorm,
            mlp_norm=self.post_attention_layernorm,
            parallel=self.parallel,
        )

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        attn: AttentionMetadata,
    ) -> torch.Tensor:
        if not self.parallel:
            return super().forward(hidden, residual, cos, sin, kv_cache, attn)
        x = self.input_layernorm(hidden, residual)
        m = x if self.post_attention_layernorm is None else self.post_attention_layernorm(residual)
        return self.self_attn(x, cos, sin, kv_cache, attn) + self.mlp(m)


class FalconForCausalLM(LlamaForCausalLM):
    """Falcon (7b's multi-query layout, 40b/180b's grouped one), rotary, parallel attention."""

    decoder_layer_cls = FalconDecoderLayer
    packed_modules_mapping: ClassVar[dict[str, tuple[str, Any]]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "up_proj": ("gate_up_proj", 0),
    }

    @classmethod
    def config_refusal(cls, config: Any) -> str | None:
        if getattr(config, "alibi", False):
            return "ALiBi position biases (alibi: true, the falcon-rw models) are not built; rotary Falcons are served"
        if config.new_decoder_architecture and not config.parallel_attn:
            return "new_decoder_architecture without parallel_attn is not a layout transformers runs"
        act = getattr(config, "activation", "gelu")
        if act != "gelu":
            return f"activation '{act}' is not built for {cls.__name__} (gelu only)"
        return rope_refusal(config)

    @classmethod
    def _num_kv_heads(cls, config: Any) -> int:
        if config.new_decoder_architecture:
            return config.num_kv_heads
        return 1 if config.multi_query else config.num_attention_heads

    @classmethod
    def norm_eps(cls, config: Any) -> float:
        return config.layer_norm_epsilon

    @classmethod
    def intermediate_size(cls, config: Any) -> int:
        return config.ffn_hidden_size

    @classmethod
    def _activation(cls, config: Any) -> str:
        return "gelu"

    @classmethod
    def _biases(cls, config: Any) -> dict[str, bool]:
        bias = bool(config.bias)
        return {"qkv_bias": bias, "o_bias": bias, "mlp_bias": bias}

    def _qkv_heads(self) -> dict[str, list[int]]:
        """Which head rows of ``query_key_value`` are q, k and v, in the checkpoint's order."""
        c = self.config
        heads, kv = c.num_attention_heads, self._num_kv_heads(c)
        if c.new_decoder_architecture:  # per KV group: its query heads, its key, its value
            group = heads // kv
            rows = [g * (group + 2) for g in range(kv)]
            return {
                "q": [r + i for r in rows for i in range(group)],
                "k": [r + group for r in rows],
                "v": [r + group + 1 for r in rows],
            }
        if c.multi_query:  # every query head, then the key, then the value
            return {"q": list(range(heads)), "k": [heads], "v": [heads + 1]}
        return {"q": [3 * h for h in range(heads)], "k": [3 * h + 1 for h in range(heads)],
                "v": [3 * h + 2 for h in range(heads)]}  # fmt: skip

    def checkpoint_views(self, weights: Any) -> None:
        c = self.config
        renames = {"transformer.word_embeddings.weight": "model.embed_tokens.weight"}
        for suffix in ("weight", "bias"):
            renames[f"transformer.ln_f.{suffix}"] = f"model.norm.{suffix}"
        missing = []
        d = self.head_dim
        per = getattr(self.quant, "features_per_word", None)
        segments = {part: _runs(rows, d) for part, rows in self._qkv_heads().items()}
        for i in range(c.num_hidden_layers):
            src, dst = f"transformer.h.{i}", f"model.layers.{i}"
            norms = {"ln_attn": "input_layernorm", "ln_mlp": "post_attention_layernorm"} if _two_norms(c) else {
                "input_layernorm": "input_layernorm", "post_attention_layernorm": "post_attention_layernorm"}
            for old, new in norms.items():
                for suffix in ("weight", "bias"):
                    renames[f"{src}.{old}.{suffix}"] = f"{dst}.{new}.{suffix}"
            linears = {"self_attention.dense": "self_attn.o_proj", "mlp.dense_h_to_4h": "mlp.up_proj",
                       "mlp.dense_4h_to_h": "mlp.down_proj"}  # fmt: skip
            for old, new in linears.items():
                if not (weights.has(f"{src}.{old}.weight") or weights.has(f"{src}.{old}.qweight")):
                    missing.append(f"{src}.{old}.weight")
                for suffix, _ in LINEAR_TENSORS:
                    renames[f"{src}.{old}.{suffix}"] = f"{dst}.{new}.{suffix}"
            fused = f"{src}.self_attention.query_key_value"
            if not (weights.has(f"{fused}.weight") or weights.has(f"{fused}.qweight")):
                missing.append(f"{fused}.weight")
            for suffix, dim in LINEAR_TENSORS:
                name = f"{fused}.{suffix}"
                if not weights.has(name):
                    continue
                parts = [f"{dst}.self_attn.{p}_proj.{suffix}" for p in ("q", "k", "v")]
                if dim is None:  # every part has all of it
                    weights.split(name, 0, [(n, None) for n in parts])
                    continue
                unit = 1 if suffix != "qzeros" else d // whole_words(name, d, per, "a head")
                weights.regroup(name, dim, [
                    (n, [(a // unit, b // unit) for a, b in segments[p]])
                    for n, p in zip(parts, ("q", "k", "v"), strict=True)
                ])  # fmt: skip
        if missing:
            raise CheckpointError(
                f"checkpoint is missing {len(missing)} Falcon tensor(s): {', '.join(missing[:5])}"
                + (" ..." if len(missing) > 5 else "")
            )
        for old, new in renames.items():
            if weights.has(old):
                weights.split(old, 0, [(new, None)])


def _runs(rows: list[int], size: int) -> list[tuple[int, int]]:
    """Head rows as feature ranges of ``size`` per head, adjacent heads joined."""
    runs: list[tuple[int, int]] = []
    for r in rows:
        if runs and runs[-1][1] == r * size:
            runs[-1] = (runs[-1][0], (r + 1) * size)
        else:
            runs.append((r * size, (r + 1) * size))
    return runs

