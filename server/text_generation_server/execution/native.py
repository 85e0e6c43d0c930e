"""Decode steps through the native CPU decoder layers (``kernels/csrc/decoder.cpp``).

Each decoder layer of the model's spec becomes one ``tgs_cpu.DecoderLayer``,
built once at load from typed parts: every linear as a ``tgs_cpu.Linear``
(dense in 32 or 16 bits, or the native 4-bit kernel's packing, from the quantization
method's :meth:`~text_generation_server.layers.quant.base.QuantMethod.native_linear`),
its norms by slot, its heads, rotary and activation. Decode steps then run

- on one unsplit model, the whole stack in one call (:class:`NativeCpuStackPlan`);
- on several shards, each half layer in one call with the row-parallel
  all-reduce between them (:class:`NativeCpuLayersPlan`).

The arithmetic is the modules' own (the same kernels: fused norm, 4-bit or
dense products, rotary in place, paged attention in place, the MLP activations) minus
the Python calls between them. Steps where a sequence adds a few tokens
(speculative checks, short prompts) run the same way, each token a decode row
of its own; longer prefills run through the modules.

The layers compute in float32 whatever the model's dtype: a bfloat16 or
float16 model keeps its linear weights (and its KV cache) in 16 bits, read
by the kernels as they are, and hands the layers float32 copies of its norms,
biases and router (a few vectors); a step's hidden states are float32 inside
the stack, and the final norm and the LM head take them as they are.

A layer is taken when :func:`native_layer_unsupported` has nothing against
it; what it refuses is logged with the plan line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from text_generation_server.execution.plan import ExecutionPlan, ModulePlan
from text_generation_server.kernels import cpu_ops_status
from text_generation_server.kernels.config import DENSE_FROM_ROWS, KernelConfig
from text_generation_server.layers.attention import AttentionMetadata
from text_generation_server.layers.linear import ParallelLinear
from text_generation_server.layers.norm import LayerNorm, RMSNorm
from text_generation_server.layers.quant.base import NativeLinear
from text_generation_server.models.spec import (
    ACTIVATIONS,
    DecoderLayerSpec,
    MLPSpec,
    ModelSpec,
    MoESpec,
)

if TYPE_CHECKING:
    from text_generation_server.models.base import CausalLM


# Model dtypes the native layers run (computing in float32, the weights in the model's dtype).
NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _linear_unsupported(name: str, layer: ParallelLinear) -> str | None:
    if layer.bias is not None and layer.bias.device.type != "cpu":
        return f"{name}'s bias is on {layer.bias.device}, not on the CPU"
    if layer.native_linear() is None:
        return f"{name}'s kernel ({layer.quant_method.kernel_name(layer)}) has no native form"
    return None


def _mlp_unsupported(m: MLPSpec, who: str = "") -> str | None:
    if m.activation not in ACTIVATIONS:
        return f"{who}activation '{m.activation}' is not built natively ({', '.join(ACTIVATIONS)})"
    if m.gated and (len(m.gate_up.output_sizes) != 2 or m.gate_up.output_sizes[0] != m.gate_up.output_sizes[1]):
        return f"{who}gate and up have different widths"
    if not m.gated and len(m.gate_up.output_sizes) != 1:
        return (f"{who}'{m.activation}' is not gated, but the MLP's input projection has "
                f"{len(m.gate_up.output_sizes)} parts")  # fmt: skip
    for name, lin in (("gate_up", m.gate_up), ("down", m.down)):
        why = _linear_unsupported(f"{who}{name}", lin)
        if why is not None:
            return why
    return None


def _moe_unsupported(m: MoESpec) -> str | None:
    if m.router.device.type != "cpu":
        return f"the router is on {m.router.device}, not on the CPU"
    for i, expert in enumerate(m.experts):
        if expert.activation != "silu":
            return f"expert {i}'s activation '{expert.activation}' is not built natively (silu)"
        if expert.down.bias is not None:
            return f"expert {i}'s down has a bias"
        why = _mlp_unsupported(expert, f"expert {i}'s ")
        if why is not None:
            return why
    return None


def native_layer_unsupported(layer: DecoderLayerSpec) -> str | None:
    """Why the native decoder layer cannot run ``layer``, or ``None``."""
    a, m = layer.attention, layer.mlp
    if a.rotary != "neox":
        return f"rotary '{a.rotary}' is not built natively (neox only)"
    why = _moe_unsupported(m) if isinstance(m, MoESpec) else _mlp_unsupported(m)
    if why is not None:
        return why
    if layer.parallel and (layer.attention_out_norm is not None or layer.mlp_out_norm is not None):
        return "a parallel layer with block out-norms"
    if a.head_dim % 8 or a.head_dim > 512:
        return f"head_dim {a.head_dim} is not a multiple of 8 up to 512"
    for name, lin in (("qkv", a.qkv), ("o", a.o)):
        why = _linear_unsupported(name, lin)
        if why is not None:
            return why
    if (a.q_norm is None) != (a.k_norm is None):
        return "only one of the query and key heads has a norm"
    for slot, norm in _norm_slots(layer).items():
        if norm.weight.device.type != "cpu":
            return f"the {slot} norm is on {norm.weight.device}, not on the CPU"
        if slot.endswith("_heads") and not isinstance(norm, RMSNorm):
            return f"the {slot} norm is a {type(norm).__name__}, not an RMSNorm"
    return None


def _mlp_bias(layer: DecoderLayerSpec) -> torch.Tensor | None:
    """The MLP's row-parallel output bias (none for a mixture of experts)."""
    return None if isinstance(layer.mlp, MoESpec) else layer.mlp.down.bias


def _norm_slots(layer: DecoderLayerSpec) -> dict:
    """The layer's norms by native slot name: the block norms and the per-head q/k norms."""
    slots = dict(layer.norms())
    if layer.attention.q_norm is not None:
        slots["q_heads"] = layer.attention.q_norm
    if layer.attention.k_norm is not None:
        slots["k_heads"] = layer.attention.k_norm
    return slots


def model_unsupported(spec: ModelSpec | None) -> str | None:
    """Why no native layer can run this model at all, or ``None``."""
    if spec is None:
        return "the model declares no spec"
    if spec.device.type != "cpu":
        return f"the native layers run on the CPU, not {spec.device.type}"
    if spec.dtype not in NATIVE_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in NATIVE_DTYPES)
        return f"the native layers run {names} models, not {str(spec.dtype).removeprefix('torch.')}"
    status = cpu_ops_status()
    if not status.available:
        return f"the native CPU kernels do not run here ({status.reason})"
    for i, layer in enumerate(spec.layers):
        why = native_layer_unsupported(layer)
        if why is not None:
            return f"layer {i}: {why}"
    return None


def _f32(t: torch.Tensor) -> torch.Tensor:
    """``t``'s data as float32: itself when it is, else a copy the native layer keeps."""
    return t.data.float().contiguous()


def build_linear(native: NativeLinear, bias: torch.Tensor | None) -> Any:
    """A ``tgs_cpu.Linear`` holding ``native``'s weights (shared, not copied)."""
    lin = torch.classes.tgs_cpu.Linear()
    if native.kind == "dense":
        lin.set_dense(native.weight)
    elif native.kind == "int4":
        lin.set_int4(native.qweight, native.meta, native.group_size, native.kernel_in, DENSE_FROM_ROWS,
                     native.prefill_dtype == torch.bfloat16)
        if native.source is not None or native.kernel_in != native.in_features:
            lin.set_input_layout(native.source, native.in_features)
    elif native.kind == "concat":
        for part in native.parts:
            lin.add_part(build_linear(part, None))
    else:
        raise ValueError(f"unknown native linear kind {native.kind!r}")
    if bias is not None:
        lin.set_bias(_f32(bias))
    return lin


def build_layer(layer: DecoderLayerSpec) -> Any:
    """A ``tgs_cpu.DecoderLayer`` for ``layer`` (checked by :func:`native_layer_unsupported` first)."""
    a, m = layer.attention, layer.mlp

    def linear(lin: ParallelLinear, with_bias: bool = True) -> Any:
        native = lin.native_linear()
        assert native is not None
        return build_linear(native, lin.bias if with_bias else None)

    out = torch.classes.tgs_cpu.DecoderLayer()
    for slot, norm in _norm_slots(layer).items():
        if isinstance(norm, LayerNorm):
            out.set_layer_norm(slot, _f32(norm.weight), _f32(norm.bias), float(norm.eps))
        else:
            out.set_norm(slot, _f32(norm.weight), float(norm.eps))
    if layer.parallel:
        out.set_parallel(True)
    # A row-parallel layer's bias is added once, after the all-reduce: the layer holds it apart.
    out.set_attention(linear(a.qkv), linear(a.o, False), a.num_heads, a.num_kv_heads, a.head_dim, float(a.scale))
    if isinstance(m, MoESpec):
        out.set_router(_f32(m.router), int(m.top_k))
        for expert in m.experts:
            out.add_expert(linear(expert.gate_up), linear(expert.down, False))
    else:
        out.set_mlp(linear(m.gate_up), linear(m.down, False), m.activation)
    for block, bias in (("attention", a.o.bias), ("mlp", _mlp_bias(layer))):
        if bias is not None:
            out.set_output_bias(block, _f32(bias))
    if layer.output_scale != 1.0:
        out.set_output_scale(float(layer.output_scale))
    if a.sliding_window:
        out.set_sliding_window(int(a.sliding_window))
    if a.softcap:
        out.set_attention_softcap(float(a.softcap))
    if a.rotary_table:
        out.set_rotary_table(int(a.rotary_table))
    out.check()
    return out


# Steps whose sequences each add at most this many tokens (speculative checks, short prompts and
# prompt tails after a cached prefix) run natively too, every token as a decode row of its own; the
# paged decode kernel reads a sequence's keys once per token, so longer prompts go to the modules.
MAX_NATIVE_QUERY = 16


def as_decode_rows(positions: torch.Tensor, attn: AttentionMetadata) -> AttentionMetadata | None:
    """``attn`` with every new token as a sequence of its own (its sequence's block table, the
    tokens up to its position as context), or ``None`` when a sequence adds more than
    :data:`MAX_NATIVE_QUERY` tokens. The layer writes every token's keys and values before any
    attends, so each token sees the ones before it in the same step."""
    if max(attn.query_lens) > MAX_NATIVE_QUERY:
        return None
    counts = torch.tensor(attn.query_lens, device=attn.block_tables.device)
    return AttentionMetadata(
        slot_mapping=attn.slot_mapping,
        block_tables=attn.block_tables.repeat_interleave(counts, dim=0).contiguous(),
        context_lens=(positions + 1).contiguous(),
        query_lens=[1] * int(positions.numel()),
    )


class _NativeCpuPlan(ExecutionPlan):
    """Decode steps natively; every other step through the modules."""

    def __init__(self, model: CausalLM, spec: ModelSpec) -> None:
        super().__init__(model)
        self.spec = spec
        self.layers = [build_layer(layer) for layer in spec.layers]
        # Which layers finish a block's output after its all-reduce (its row-parallel bias, its
        # out-norm, its scale): a call skipped where none does.
        self.out_norms = [
            (s.attention_out_norm is not None or s.attention.o.bias is not None or s.output_scale != 1.0,
             s.mlp_out_norm is not None or _mlp_bias(s) is not None or s.output_scale != 1.0)
            for s in spec.layers
        ]
        self.parallel = [s.parallel for s in spec.layers]
        self.rotary_tables = [s.attention.rotary_table for s in spec.layers]
        self.head_dim = spec.layers[0].attention.head_dim
        self.modules = ModulePlan(model)

    @classmethod
    def build(cls, model: CausalLM, kernels: KernelConfig) -> ExecutionPlan | str:
        spec = model.spec()
        why = model_unsupported(spec) or cls.refuses(spec)  # type: ignore[arg-type]
        return why if why is not None else cls(model, spec)  # type: ignore[arg-type]

    @classmethod
    def refuses(cls, spec: ModelSpec) -> str | None:
        """What this plan, beyond the native layers themselves, cannot run."""
        return None

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        attn: AttentionMetadata,
    ) -> torch.Tensor:
        if not attn.is_decode:
            rows = as_decode_rows(positions, attn)
            if rows is None:
                return self.modules.forward(input_ids, positions, kv_caches, attn)
            attn = rows
        if len(kv_caches) != len(self.layers):
            raise ValueError(f"expected {len(self.layers)} KV cache layers, got {len(kv_caches)}")
        hidden, residual, cos, sin = self.model.prepare(input_ids, positions)
        t = hidden.shape[0]
        if cos.dtype != torch.float32:  # a 16-bit model's tables, rounded: the float32 ones instead
            cos, sin = self.model.rotary.cos_sin(positions, torch.float32)
        # [tables, T, D]: one table unless layers rotate by different ones (Gemma 3).
        cos, sin = cos.reshape(-1, t, self.head_dim), sin.reshape(-1, t, self.head_dim)
        residual = residual.float()
        hidden = self.decode(hidden.float(), residual, cos, sin, kv_caches, attn)
        # The final norm in float32 too: every LM head kernel takes float32 activations.
        return self.model.finish(hidden, residual)

    def decode(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        attn: AttentionMetadata,
    ) -> torch.Tensor:
        raise NotImplementedError


class NativeCpuLayersPlan(_NativeCpuPlan):
    """Decode steps one native call per half layer, all-reduced in between (any shard count)."""

    name = "native-cpu-layers"

    def decode(self, hidden, residual, cos, sin, kv_caches, attn):  # type: ignore[no-untyped-def]
        dist = self.model.dist
        reduce = dist.world_size > 1
        for layer, (k, v), (attn_out, mlp_out), parallel, table in zip(
            self.layers, kv_caches, self.out_norms, self.parallel, self.rotary_tables, strict=True
        ):
            cos_t, sin_t = cos[table], sin[table]
            if parallel:  # both blocks on the same stream: their sum is all-reduced once
                out = layer.parallel_blocks(hidden, residual, cos_t, sin_t, k, v, attn.slot_mapping,
                                            attn.block_tables, attn.context_lens)
                if reduce:
                    out = dist.all_reduce(out)
                hidden = layer.finish_parallel(out) if attn_out or mlp_out else out
                continue
            out = layer.attention(hidden, residual, cos_t, sin_t, k, v, attn.slot_mapping, attn.block_tables,
                                  attn.context_lens)
            if reduce:
                out = dist.all_reduce(out)
            if attn_out:
                out = layer.finish_attention(out)
            out = layer.mlp(out, residual)
            if reduce:
                out = dist.all_reduce(out)
            hidden = layer.finish_mlp(out) if mlp_out else out
        return hidden

    def describe(self) -> str:
        n = len(self.layers)
        return (f"decode steps and steps of at most {MAX_NATIVE_QUERY} new tokens per sequence through {n} native "
                f"decoder layers (one call per half layer), longer prefills through modules")


class NativeCpuStackPlan(_NativeCpuPlan):
    """Decode steps of the whole decoder stack in one native call (one unsplit model)."""

    name = "native-cpu-stack"

    def __init__(self, model: CausalLM, spec: ModelSpec) -> None:
        super().__init__(model, spec)
        self.stack = torch.classes.tgs_cpu.DecoderStack()
        for layer in self.layers:
            self.stack.append(layer)

    @classmethod
    def refuses(cls, spec: ModelSpec) -> str | None:
        if spec.world_size > 1:
            return f"the model is split over {spec.world_size} shards (an all-reduce sits between half layers)"
        return None

    def decode(self, hidden, residual, cos, sin, kv_caches, attn):  # type: ignore[no-untyped-def]
        return self.stack.decode(hidden, residual, cos, sin, [k for k, _ in kv_caches], [v for _, v in kv_caches],
                                 attn.slot_mapping, attn.block_tables, attn.context_lens)

    def describe(self) -> str:
        n = len(self.layers)
        return (f"decode steps and steps of at most {MAX_NATIVE_QUERY} new tokens per sequence through all {n} "
                f"decoder layers in one native call, longer prefills through modules")
