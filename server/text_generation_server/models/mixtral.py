"""Mixtral: Mistral's attention with a sparse mixture of experts in place of the MLP.

Each layer's router (``block_sparse_moe.gate``, replicated) scores the experts per token; the
top ``num_experts_per_tok`` (2) are kept, their softmax probabilities renormalized to sum to
one (in float32, as transformers computes them), and the token's output is the weighted sum
of those experts' gated MLPs (``w2(silu(w1 x) * w3 x)``).

Every expert is split across the shards like a dense MLP (``w1``/``w3`` by output rows, ``w2``
by input columns, in units the quantization allows), so each rank holds a slice of every
expert and computes its partial sum of the weighted outputs; the layer all-reduces once, after
the experts, as a dense MLP does. GPTQ checkpoints quantize each expert's linears on their own,
the router stays float; both namings are read: ``block_sparse_moe.experts.E.w1/w3/w2`` (the
original checkpoints, AutoGPTQ) and ``mlp.experts.E.gate_proj/up_proj/down_proj`` with
``mlp.gate`` (GPTQModel 7 with transformers 5).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from text_generation_server.layers.attention import AttentionMetadata
from text_generation_server.layers.fused import silu_mul
from text_generation_server.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from text_generation_server.layers.loading import replicated_weight_loader, set_weight_attrs
from text_generation_server.models.llama import (
    LINEAR_TENSORS,
    LlamaAttention,
    LlamaBuild,
    LlamaDecoderLayer,
    MistralForCausalLM,
)
from text_generation_server.models.spec import DecoderLayerSpec, MLPSpec, MoESpec
from text_generation_server.weights import shard_range


class MixtralExpert(torch.nn.Module):
    """One expert: ``w13`` = [w1 (gate) | w3 (up)] column-parallel, ``w2`` row-parallel; its
    output is this rank's partial sum (the block all-reduces once for all experts)."""

    def __init__(self, b: LlamaBuild, prefix: str) -> None:
        super().__init__()
        size, hidden = b.config.intermediate_size, b.config.hidden_size
        align = b.quant.input_alignment()
        self.w13 = MergedColumnParallelLinear(
            hidden, [size, size], align=align, bias=False, quant_method=b.quant(f"{prefix}.w13"), **b.tensor_args()
        )
        self.w2 = RowParallelLinear(
            size, hidden, input_range=shard_range(size, b.dist.world_size, b.dist.rank, align), bias=False,
            quant_method=b.quant(f"{prefix}.w2"), **b.tensor_args(),
        )  # fmt: skip

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """``w2(silu(w1 x) * w3 x)`` without the all-reduce."""
        h = silu_mul(self.w13(x), self.w13.output_sizes)
        return self.w2.quant_method.apply(self.w2, h, None)


class Router(torch.nn.Module):
    """The replicated ``[experts, hidden]`` router (not quantized)."""

    def __init__(self, experts: int, hidden: int, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        weight = torch.empty(experts, hidden, dtype=dtype, device=device)
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        set_weight_attrs(self.weight, weight_loader=replicated_weight_loader, shard_ids=(None,))


def route(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's top-k experts and their weights: softmax in float32, renormalized over the k."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), experts


class MixtralMoE(torch.nn.Module):
    activation = "silu"

    def __init__(self, b: LlamaBuild, prefix: str) -> None:
        super().__init__()
        c = b.config
        self.top_k = int(c.num_experts_per_tok)
        self.dist = b.dist
        self.gate = Router(c.num_local_experts, c.hidden_size, dtype=b.dtype, device=b.device)
        self.experts = torch.nn.ModuleList(
            MixtralExpert(b, f"{prefix}.experts.{e}") for e in range(c.num_local_experts)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, chosen = route(F.linear(x, self.gate.weight), self.top_k)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e in torch.unique(chosen).tolist():
            tokens, slot = torch.where(chosen == e)
            y = self.experts[e].partial(x[tokens])
            out.index_add_(0, tokens, y.float() * weights[tokens, slot, None])
        out = out.to(x.dtype)
        return self.dist.all_reduce(out) if self.dist.world_size > 1 else out


class MixtralDecoderLayer(LlamaDecoderLayer):
    """Mistral's layer with ``block_sparse_moe`` in place of the MLP."""

    def __init__(self, b: LlamaBuild, prefix: str) -> None:
        torch.nn.Module.__init__(self)
        hidden, eps = b.config.hidden_size, b.config.rms_norm_eps
        self.self_attn = LlamaAttention(b, f"{prefix}.self_attn")
        self.block_sparse_moe = MixtralMoE(b, f"{prefix}.block_sparse_moe")
        self.input_layernorm = self.norm_cls(hidden, eps, dtype=b.dtype, device=b.device)
        self.post_attention_layernorm = self.norm_cls(hidden, eps, dtype=b.dtype, device=b.device)

    @property
    def mlp(self) -> MixtralMoE:  # type: ignore[override]
        return self.block_sparse_moe

    def spec(self) -> DecoderLayerSpec:
        a = self.self_attn
        moe = self.block_sparse_moe
        return DecoderLayerSpec(
            attention=LlamaDecoderLayer._attention_spec(a),
            mlp=MoESpec(
                router=moe.gate.weight,
                top_k=moe.top_k,
                experts=[MLPSpec(gate_up=e.w13, down=e.w2, activation="silu") for e in moe.experts],
            ),
            attention_norm=self.input_layernorm,
            mlp_norm=self.post_attention_layernorm,
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
        x = self.post_attention_layernorm(self.self_attn(x, cos, sin, kv_cache, attn), residual)
        return self.block_sparse_moe(x)


class MixtralForCausalLM(MistralForCausalLM):
    """Mixtral (see the module docstring)."""

    decoder_layer_cls = MixtralDecoderLayer
    packed_modules_mapping: ClassVar[dict[str, tuple[str, Any]]] = {
        **MistralForCausalLM.packed_modules_mapping,
        "w1": ("w13", 0),
        "w3": ("w13", 1),
    }

    @classmethod
    def config_refusal(cls, config: Any) -> str | None:
        k, n = getattr(config, "num_experts_per_tok", None), getattr(config, "num_local_experts", None)
        if not k or not n or not 0 < k <= n:
            return f"num_experts_per_tok={k} of num_local_experts={n} is not a routing"
        return super().config_refusal(config)

    @classmethod
    def intermediate_size(cls, config: Any) -> int:
        return config.intermediate_size

    # transformers 5's names (GPTQModel 7 writes them) -> the original checkpoint's.
    _EXPERT_NAMES: ClassVar[dict[str, str]] = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}

    def checkpoint_views(self, weights: Any) -> None:
        c = self.config
        for i in range(c.num_hidden_layers):
            src, dst = f"model.layers.{i}.mlp", f"model.layers.{i}.block_sparse_moe"
            if not weights.has(f"{src}.gate.weight"):
                continue
            renames = {f"{src}.gate.weight": f"{dst}.gate.weight"}
            for e in range(c.num_local_experts):
                for new, old in self._EXPERT_NAMES.items():
                    for suffix, _ in LINEAR_TENSORS:
                        renames[f"{src}.experts.{e}.{new}.{suffix}"] = f"{dst}.experts.{e}.{old}.{suffix}"
            for old, new in renames.items():
                if weights.has(old):
                    weights.split(old, 0, [(new, None)])
