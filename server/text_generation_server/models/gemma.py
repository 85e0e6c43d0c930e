"""Gemma 2 from the Llama family's parts.

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
"""

from __future__ import annotations

from typing import Any

import torch

from text_generation_server.layers.attention import AttentionMetadata
from text_generation_server.layers.loading import replicated_weight_loader
from text_generation_server.layers.norm import RMSNorm
from text_generation_server.models.llama import LlamaBuild, LlamaDecoderLayer, LlamaForCausalLM
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
        act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
        if act not in _ACTIVATIONS:
            return f"hidden_activation '{act}' is not built for {cls.__name__} (gelu_pytorch_tanh only)"
        from text_generation_server.layers.rotary import rope_refusal

        return rope_refusal(config)

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
