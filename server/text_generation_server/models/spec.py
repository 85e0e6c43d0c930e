"""What a decoder-only model computes, declared once per model: its spec.

A model is plain torch modules (its ``forward`` is the reference arithmetic,
on any device and dtype). Beside them it declares, with :class:`ModelSpec`,
what each decoder layer computes in terms the execution plan
(``execution/``) can map onto other kernels: where its norms sit, which
linear layers (with their quantization methods) produce q/k/v, the attention
output, the gated MLP, how many heads this rank holds, the rotary rule, the
attention scale and the activation. The plan chooses, once at load, how to
run that (the modules themselves, native CPU operators per layer, the whole
stack in one native call, later CUDA kernels); the model never knows.

Every decoder layer follows one residual convention, the one the modules
implement: a layer receives the previous block's output ``hidden`` and the
residual stream ``residual``; each block (attention, then MLP) first adds its
input to the stream (``residual += hidden``, in place), reads the stream
through its pre-norm if it has one, and returns its output, through its
out-norm if it has one. The model's final norm closes the last block the
same way. A parallel layer (Falcon) adds its input to the stream once and
returns the sum of both blocks, each read from that stream. A new
architecture is its module file plus its spec: anything the spec cannot say
(another activation, another rotary) keeps the module path, and the plan
logs why.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from text_generation_server.layers.linear import ParallelLinear
from text_generation_server.layers.norm import LayerNorm, RMSNorm

Norm = RMSNorm | LayerNorm
GATED_ACTIVATIONS = ("silu", "gelu_tanh")  # act(gate) * up over [gate | up]
ACTIVATIONS = (*GATED_ACTIVATIONS, "gelu")  # gelu: not gated, gelu(up) in its erf form (Falcon)
ROTARY_STYLES = ("neox",)  # rotate-half over the whole head


@dataclass(frozen=True)
class AttentionSpec:
    """Self-attention over the paged KV cache, for this rank's heads."""

    qkv: ParallelLinear  # fused [q | k | v] output of this rank's heads
    o: ParallelLinear  # row-parallel output projection
    num_heads: int  # query heads on this rank
    num_kv_heads: int  # KV heads on this rank
    head_dim: int
    scale: float  # softmax scale of q.k
    rotary: str = "neox"
    # RMSNorm over each query / key head (weights of head_dim) before rotary (Qwen3).
    q_norm: RMSNorm | None = None
    k_norm: RMSNorm | None = None
    sliding_window: int | None = None  # attend to the last this many positions only
    softcap: float | None = None  # scores capped to softcap * tanh(score / softcap) (Gemma 2)
    # Which of the model's rotary tables the layer rotates by (``prepare``'s cos/sin carry a
    # leading table dim where there are several: Gemma 3's local layers use table 1).
    rotary_table: int = 0


@dataclass(frozen=True)
class MLPSpec:
    """A gated MLP, ``down(act(gate) * up)`` with gate and up fused as ``[gate | up]``; or, for
    an activation that is not gated (``gelu``), ``down(act(up))`` with ``gate_up`` the up
    projection alone."""

    gate_up: ParallelLinear
    down: ParallelLinear  # row-parallel
    activation: str = "silu"

    @property
    def gated(self) -> bool:
        return self.activation in GATED_ACTIVATIONS


@dataclass(frozen=True)
class MoESpec:
    """A sparse mixture of gated-MLP experts (Mixtral): per token, the router's top ``top_k``
    experts by softmax probability (float32), renormalized over the k, weight their outputs.
    Each expert is split across ranks like a dense MLP; their weighted partial sums are
    all-reduced once."""

    router: torch.Tensor  # [experts, hidden], replicated
    top_k: int
    experts: list[MLPSpec]


@dataclass(frozen=True)
class DecoderLayerSpec:
    """One decoder layer: where its norms sit around its two blocks."""

    attention: AttentionSpec
    mlp: MLPSpec | MoESpec
    attention_norm: Norm | None  # pre-norm of the attention block
    mlp_norm: Norm | None  # pre-norm of the MLP block
    attention_out_norm: Norm | None = None  # on attention's output, before it joins the stream
    mlp_out_norm: Norm | None = None  # on the MLP's output, before it joins the stream
    # Each block's output (after its out-norm) is multiplied by this before it joins the stream
    # (Granite's residual_multiplier).
    output_scale: float = 1.0
    # Both blocks read the same stream (Falcon): the MLP through mlp_norm, or through
    # attention_norm's output where mlp_norm is None; the layer's output is the sum of the
    # two blocks' outputs (one all-reduce when split). No out-norms.
    parallel: bool = False

    def norms(self) -> dict[str, Norm]:
        """The norms present, by slot name (``attention``, ``attention_out``, ``mlp``, ``mlp_out``)."""
        slots = {
            "attention": self.attention_norm,
            "attention_out": self.attention_out_norm,
            "mlp": self.mlp_norm,
            "mlp_out": self.mlp_out_norm,
        }
        return {k: v for k, v in slots.items() if v is not None}


@dataclass(frozen=True)
class ModelSpec:
    """The decoder stack of one rank's model, as the execution plan sees it."""

    layers: list[DecoderLayerSpec]
    hidden_size: int
    device: torch.device
    dtype: torch.dtype
    world_size: int
