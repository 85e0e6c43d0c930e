"""Gemma 2 and Gemma 3 (text) from the Llama family's parts.

What differs from Llama, each as transformers computes it:

- every RMSNorm scales by ``1 + weight`` (the checkpoint stores the offset from one;
  :class:`GemmaRMSNorm` adds the one at load, so the arithmetic is Llama's);
- four norms per layer: before and after attention, before and after the MLP (the spec's
  ``attention``, ``attention_out``, ``mlp`` and ``mlp_out`` slots);
- the embeddings are scaled by ``sqrt(hidden_size)`` (in the model's dtype);
- the MLP is gated with GELU's tanh approximation (``gelu_pytorch_tanh``);
- attention scores are scaled by ``query_pre_attn_scalar ** -0.5`` and capped to
  ``attn_logit_softcapping * tanh(score / cap)``; layers alternate between a sliding
  window and full attention (``layer_types``);
- the logits are capped the same way with ``final_logit_softcapping``.

Gemma 3 adds an RMSNorm over each query and key head (``(1 + w)`` too) and two rotary tables:
sliding-window (local) layers rotate with ``rope_parameters["sliding_attention"]`` (base 10 000),
full-attention layers with ``rope_parameters["full_attention"]`` (base 1 000 000, linear
scaling on the larger models); its soft caps are off unless the config sets them.
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import torch

from text_generation_server.layers.attention import AttentionMetadata
from text_generation_server.layers.loading import replicated_weight_loader
from text_generation_server.layers.norm import RMSNorm
from text_generation_server.layers.rotary import RotaryEmbedding, rope_refusal
from text_generation_server.models.llama import (
    LlamaBuild,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    Qwen3Attention,
)
from text_generation_server.models.spec import DecoderLayerSpec

# config.hidden_activation -> the gated MLP's activation.
_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


def _plus_one_loader(param: torch.Tensor, weights: Any, name: str, shard_id: Any = None) -> None:
    replicated_weight_loader(param, weights, name, shard_id)
    param.data += 1.0


class GemmaRMSNorm(RMSNorm):
    """``x / rms(x) * (1 + w)``: the checkpoint's ``w`` is stored as ``1 + w`` when loaded."""

    def __init__(self, hidden_size: int, eps: float, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(hidden_size, eps, dtype=dtype, device=device)
        self.weight.weight_loader = _plus_one_loader


class Gemma2DecoderLayer(LlamaDecoderLayer):
    norm_cls = GemmaRMSNorm

    def __init__(self, b: LlamaBuild, prefix: str) -> None:
        super().__init__(b, prefix)
        hidden, eps = b.config.hidden_size, b.config.rms_norm_eps
        self.pre_feedforward_layernorm = GemmaRMSNorm(hidden, eps, dtype=b.dtype, device=b.device)
        self.post_feedforward_layernorm = GemmaRMSNorm(hidden, eps, dtype=b.dtype, device=b.device)

    def spec(self) -> DecoderLayerSpec:
        """input_layernorm before attention, post_attention_layernorm on its output;
        pre_feedforward_layernorm before the MLP, post_feedforward_layernorm on its output."""
        base = super().spec()
        return DecoderLayerSpec(
            attention=base.attention,
            mlp=base.mlp,
            attention_norm=self.input_layernorm,
            attention_out_norm=self.post_attention_layernorm,
            mlp_norm=self.pre_feedforward_layernorm,
            mlp_out_norm=self.post_feedforward_layernorm,
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
        x = self.input_layernorm(hidden, residual)
        a = self.post_attention_layernorm(self.self_attn(x, cos, sin, kv_cache, attn))
        x = self.pre_feedforward_layernorm(a, residual)
        return self.post_feedforward_layernorm(self.mlp(x))


class Gemma2ForCausalLM(LlamaForCausalLM):
    """Gemma 2 (see the module docstring for what differs from Llama)."""

    decoder_layer_cls = Gemma2DecoderLayer

    def __init__(self, config: Any, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        # sqrt(hidden) rounded to the model's dtype, as transformers scales the embeddings.
        self.embedding_scale = torch.tensor(config.hidden_size**0.5, dtype=self.dtype).item()
        self.final_softcap = getattr(config, "final_logit_softcapping", None)

    @classmethod
    def config_refusal(cls, config: Any) -> str | None:
        return cls._activation_refusal(config) or rope_refusal(config)

    @classmethod
    def _activation_refusal(cls, config: Any) -> str | None:
        act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
        if act not in _ACTIVATIONS:
            return f"hidden_activation '{act}' is not built for {cls.__name__} (gelu_pytorch_tanh only)"
        return None

    @classmethod
    def _activation(cls, config: Any) -> str:
        return _ACTIVATIONS[getattr(config, "hidden_activation", None) or config.hidden_act]

    @classmethod
    def _attention_scale(cls, config: Any, head_dim: int) -> float:
        return float(config.query_pre_attn_scalar) ** -0.5

    @classmethod
    def _attention_softcap(cls, config: Any) -> float | None:
        cap = getattr(config, "attn_logit_softcapping", None)
        return float(cap) if cap else None

    def prepare(
        self, input_ids: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden, residual, cos, sin = super().prepare(input_ids, positions)
        residual.mul_(self.embedding_scale)
        return hidden, residual, cos, sin

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)
        if self.final_softcap:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits


# ---------------------------------------------------------------- Gemma 3

GEMMA3_TABLES = ("full_attention", "sliding_attention")  # rotary table 0 and 1


class Gemma3Attention(Qwen3Attention):
    head_norm_cls = GemmaRMSNorm


class Gemma3DecoderLayer(Gemma2DecoderLayer):
    """Gemma 2's layer with (1 + w) q/k head norms, rotating by the local table where it slides."""

    attention_cls = Gemma3Attention

    def __init__(self, b: LlamaBuild, prefix: str) -> None:
        super().__init__(b, prefix)
        self.rotary_table = GEMMA3_TABLES.index("sliding_attention" if b.sliding_window else "full_attention")

    def spec(self) -> DecoderLayerSpec:
        base = super().spec()
        return replace(base, attention=replace(base.attention, rotary_table=self.rotary_table))

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        attn: AttentionMetadata,
    ) -> torch.Tensor:
        t = self.rotary_table
        return super().forward(hidden, residual, cos[t], sin[t], kv_cache, attn)


class _TwoTables:
    """cos/sin of both of Gemma 3's rotary tables, stacked: ``[2, T, 1, head_dim]``."""

    def __init__(self, tables: list[RotaryEmbedding]) -> None:
        self.tables = tables

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [t.cos_sin(positions, dtype) for t in self.tables]
        return torch.stack([c for c, _ in pairs]), torch.stack([s for _, s in pairs])


def _gemma3_rope_configs(config: Any) -> dict[str, Any]:
    """Each layer type's RoPE settings as a config of its own (what ``rope_parameters`` reads)."""
    params = getattr(config, "rope_parameters", None) or {}
    out = {}
    for layer_type in GEMMA3_TABLES:
        sub = params.get(layer_type) if isinstance(params.get(layer_type), dict) else None
        if sub is None:  # the older spelling: rope_theta / rope_local_base_freq, rope_scaling on global layers
            theta = config.rope_theta if layer_type == "full_attention" else config.rope_local_base_freq
            sub = {"rope_type": "default", "rope_theta": theta}
            scaling = getattr(config, "rope_scaling", None)
            if layer_type == "full_attention" and isinstance(scaling, dict):
                sub = {**sub, **scaling}
        out[layer_type] = SimpleNamespace(rope_parameters=dict(sub), max_position_embeddings=config.max_position_embeddings)
    return out


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    """Gemma 3's text model (gemma3_text): see the module docstring."""

    decoder_layer_cls = Gemma3DecoderLayer

    @classmethod
    def config_refusal(cls, config: Any) -> str | None:
        why = cls._activation_refusal(config)
        if why is not None:
            return why
        if getattr(config, "use_bidirectional_attention", False):
            return "use_bidirectional_attention (an encoder's mask) is not built"
        for layer_type, sub in _gemma3_rope_configs(config).items():
            why = rope_refusal(sub)
            if why is not None:
                return f"{layer_type} layers: {why}"
        return None

    @classmethod
    def _rotary(cls, config: Any, head_dim: int, device: torch.device) -> Any:
        subs = _gemma3_rope_configs(config)
        return _TwoTables([RotaryEmbedding.from_config(subs[t], head_dim, device) for t in GEMMA3_TABLES])
