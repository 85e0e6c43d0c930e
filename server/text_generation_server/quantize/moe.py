"""Mixtral's experts for the quantizer, as the checkpoint stores them.

transformers keeps a layer's experts as stacked 3-D tensors; the checkpoint (and GPTQModel's
quantized layout) as one linear per expert and projection:
``block_sparse_moe.experts.E.w1`` (gate), ``w3`` (up) and ``w2`` (down), beside the router
``block_sparse_moe.gate``. The quantizer reads a layer's experts into :class:`CheckpointMoE`,
whose linears it quantizes and writes under those names: each expert calibrated on the tokens
the router sends it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

PREFIX = "block_sparse_moe"


def is_moe(layer: torch.nn.Module) -> bool:
    """A transformers decoder layer whose MLP is a routed mixture of experts (Mixtral)."""
    mlp = getattr(layer, "mlp", None)
    return mlp is not None and hasattr(mlp, "experts") and hasattr(mlp, "gate")


class CheckpointExpert(torch.nn.Module):
    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.w1 = torch.nn.Linear(hidden, inter, bias=False)
        self.w3 = torch.nn.Linear(hidden, inter, bias=False)
        self.w2 = torch.nn.Linear(inter, hidden, bias=False)

    def hidden_of(self, x: torch.Tensor) -> torch.Tensor:
        """``silu(w1 x) * w3 x``: what w2 multiplies."""
        return F.silu(self.w1(x)) * self.w3(x)


class CheckpointMoE(torch.nn.Module):
    """A layer's router and experts, one ``nn.Linear`` per checkpoint tensor."""

    def __init__(self, hidden: int, inter: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.gate = torch.nn.Linear(hidden, num_experts, bias=False)
        self.experts = torch.nn.ModuleList(CheckpointExpert(hidden, inter) for _ in range(num_experts))

    @classmethod
    def load(cls, checkpoint: Any, prefix: str, config: Any) -> CheckpointMoE:
        """The experts of the layer at ``prefix`` (``model.layers.N.``), float32."""
        with torch.device("meta"):
            moe = cls(config.hidden_size, config.intermediate_size, config.num_local_experts,
                      config.num_experts_per_tok)  # fmt: skip
        state = {name: checkpoint.get(f"{prefix}{PREFIX}.{name}").to(torch.float32) for name in moe.state_dict()}
        moe.load_state_dict(state, assign=True)
        return moe

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row of ``x [T, hidden]``: the top-k experts' weights (softmax in float32,
        renormalized over the k) and indices."""
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        return weights / weights.sum(-1, keepdim=True), chosen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The weighted sum of each row's experts."""
        weights, chosen = self.route(x)
        out = torch.zeros_like(x)
        for e in torch.unique(chosen).tolist():
            rows, slot = torch.where(chosen == e)
            y = self.experts[e].w2(self.experts[e].hidden_of(x[rows]))
            out.index_add_(0, rows, y * weights[rows, slot, None])
        return out

    def load_into(self, block: torch.nn.Module) -> bool:
        """Fill transformers' stacked-expert block with these weights (to check the staged
        arithmetic against its forward); False where its layout is not the one known here."""
        experts = block.experts
        if not (hasattr(block.gate, "weight") and hasattr(experts, "gate_up_proj") and hasattr(experts, "down_proj")):
            return False
        gate_up = torch.stack([torch.cat([e.w1.weight, e.w3.weight]) for e in self.experts])
        down = torch.stack([e.w2.weight for e in self.experts])
        if tuple(experts.gate_up_proj.shape) != tuple(gate_up.shape):
            return False
        block.gate.weight = torch.nn.Parameter(self.gate.weight.detach().clone(), requires_grad=False)
        experts.gate_up_proj = torch.nn.Parameter(gate_up, requires_grad=False)
        experts.down_proj = torch.nn.Parameter(down, requires_grad=False)
        return True
