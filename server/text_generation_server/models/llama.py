"""Llama-family decoder (Llama, SmolLM, Mistral, Qwen2) from tensor-parallel layers.

Parameter names follow the checkpoint's (``model.layers.N.self_attn...``)
except where projections are fused: q/k/v -> ``qkv_proj`` and gate/up ->
``gate_up_proj`` (see ``packed_modules_mapping``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from loguru import logger

from text_generation_server.distributed import Distributed
from text_generation_server.layers.attention import (
    AttentionBackend,
    AttentionMetadata,
    PagedAttention,
    select_attention_backend,
)
from text_generation_server.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from text_generation_server.layers.fused import silu_mul
from text_generation_server.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from text_generation_server.layers.norm import RMSNorm
from text_generation_server.layers.partition import (
    HeadPartition,
    describe_partition,
    partition_heads,
)
from text_generation_server.layers.quant.base import NativeLinear, QuantConfig
from text_generation_server.layers.rotary import RotaryEmbedding
from text_generation_server.models.base import CausalLM
from text_generation_server.weights import shard_range


@dataclass(frozen=True)
class LlamaBuild:
    """Everything a layer needs to create its rank's shard, decided once per model."""

    config: Any
    dist: Distributed
    dtype: torch.dtype
    device: torch.device
    quant: QuantConfig
    backend: AttentionBackend
    partition: HeadPartition  # this rank's heads
    num_heads: int  # whole model
    num_kv_heads: int  # whole model
    head_dim: int
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool

    def tensor_args(self) -> dict[str, Any]:
        return {"dist": self.dist, "dtype": self.dtype, "device": self.device}


class LlamaAttention(torch.nn.Module):
    def __init__(self, b: LlamaBuild, prefix: str) -> None:
        super().__init__()
        part, hd = b.partition, b.head_dim
        self.num_heads = part.num_heads
        self.num_kv_heads = part.num_kv_heads
        self.head_dim = hd
        self.q_size = self.num_heads * hd
        self.kv_size = self.num_kv_heads * hd
        self.qkv_proj = QKVParallelLinear(
            b.config.hidden_size,
            hd,
            b.num_heads,
            b.num_kv_heads,
            part,
            bias=b.qkv_bias,
            quant_method=b.quant(f"{prefix}.qkv_proj"),
            **b.tensor_args(),
        )
        # o_proj's input columns are this rank's query heads, in head order.
        self.o_proj = RowParallelLinear(
            b.num_heads * hd,
            b.config.hidden_size,
            input_range=(part.q_start * hd, part.q_stop * hd),
            bias=b.o_bias,
            quant_method=b.quant(f"{prefix}.o_proj"),
            **b.tensor_args(),
        )
        self.attn = PagedAttention(
            self.num_heads, self.num_kv_heads, hd, scale=hd**-0.5, backend=b.backend
        )

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        attn: AttentionMetadata,
    ) -> torch.Tensor:
        tokens = hidden.shape[0]
        qkv = self.qkv_proj(hidden)
        # q and k sit side by side in the fused output: one rotary pass covers both heads.
        qk = qkv[:, : self.q_size + self.kv_size].view(tokens, -1, self.head_dim)
        qk = RotaryEmbedding.apply(qk, cos, sin)
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        v = qkv[:, self.q_size + self.kv_size :].view(tokens, self.num_kv_heads, self.head_dim)
        return self.o_proj(self.attn(q, k, v, kv_cache, attn))


class LlamaMLP(torch.nn.Module):
    def __init__(self, b: LlamaBuild, prefix: str) -> None:
        super().__init__()
        act = getattr(b.config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act '{act}' in the model config; supported: silu")
        size = b.config.intermediate_size
        # gate and up are split alike so a rank's rows pair up, and down_proj
        # takes the matching input columns, in units the quantization allows.
        align = b.quant.input_alignment()
        self.gate_up_proj = MergedColumnParallelLinear(
            b.config.hidden_size,
            [size, size],
            align=align,
            bias=b.mlp_bias,
            quant_method=b.quant(f"{prefix}.gate_up_proj"),
            **b.tensor_args(),
        )
        self.down_proj = RowParallelLinear(
            size,
            b.config.hidden_size,
            input_range=shard_range(size, b.dist.world_size, b.dist.rank, align),
            bias=b.mlp_bias,
            quant_method=b.quant(f"{prefix}.down_proj"),
            **b.tensor_args(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_mul(self.gate_up_proj(x), self.gate_up_proj.output_sizes))


class LlamaDecoderLayer(torch.nn.Module):
    def __init__(self, b: LlamaBuild, prefix: str) -> None:
        super().__init__()
        hidden, eps = b.config.hidden_size, b.config.rms_norm_eps
        self.self_attn = LlamaAttention(b, f"{prefix}.self_attn")
        self.mlp = LlamaMLP(b, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(hidden, eps, dtype=b.dtype, device=b.device)
        self.post_attention_layernorm = RMSNorm(hidden, eps, dtype=b.dtype, device=b.device)
        self.dist = b.dist
        self.fused_decode: FusedDecode | None = None

    def finish_loading(self) -> None:
        """Take the fused decode step where every part of the layer can (chosen once)."""
        self.fused_decode = FusedDecode.build(self)

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        attn: AttentionMetadata,
    ) -> torch.Tensor:
        """The layer's MLP output; ``residual`` (the stream before it) gains ``hidden`` and
        the attention output, in place. The layer's output is ``residual + returned``."""
        if self.fused_decode is not None and attn.is_decode and hidden.dtype == torch.float32:
            return self.fused_decode(hidden, residual, cos, sin, kv_cache, attn)
        x = self.input_layernorm(hidden, residual)
        x = self.post_attention_layernorm(self.self_attn(x, cos, sin, kv_cache, attn), residual)
        return self.mlp(x)


class FusedDecode:
    """A decode step of one layer as two native operators (attention half, MLP half).

    The same arithmetic as the module path (fused norm, linear kernels,
    rotary, paged attention, SiLU-gate) without its per-op Python calls; the
    row-parallel partial sums are all-reduced in between as the modules do.
    Built only when the native CPU kernels run, every linear has a native form
    (dense float32 or the native 4-bit kernel in checkpoint order) and the
    row-parallel layers carry no bias.
    """

    def __init__(self, layer: LlamaDecoderLayer, linears: dict[str, NativeLinear]) -> None:
        a = layer.self_attn
        self.dist = layer.dist
        self.ln1, self.ln2 = layer.input_layernorm, layer.post_attention_layernorm
        self.qkv, self.o = linears["qkv"], linears["o"]
        self.gate_up, self.down = linears["gate_up"], linears["down"]
        self.qkv_bias = a.qkv_proj.bias
        self.num_heads, self.num_kv_heads, self.head_dim = a.num_heads, a.num_kv_heads, a.head_dim
        self.scale = a.attn.scale

    @classmethod
    def build(cls, layer: LlamaDecoderLayer) -> FusedDecode | None:
        from text_generation_server.kernels import cpu_ops

        a, m = layer.self_attn, layer.mlp
        norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
        if cpu_ops() is None or any(w.dtype != torch.float32 or w.device.type != "cpu" for w in norms):
            return None
        if a.o_proj.bias is not None or m.down_proj.bias is not None:
            return None
        parts = {"qkv": a.qkv_proj, "o": a.o_proj, "gate_up": m.gate_up_proj, "down": m.down_proj}
        linears = {name: lin.native_linear() for name, lin in parts.items()}
        if any(v is None for v in linears.values()):
            return None
        if m.gate_up_proj.output_sizes[0] != m.gate_up_proj.output_sizes[1]:
            return None
        return cls(layer, linears)  # type: ignore[arg-type]

    def __call__(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        attn: AttentionMetadata,
    ) -> torch.Tensor:
        ops = torch.ops.tgs_cpu
        t = hidden.shape[0]
        q, o, gu, d = self.qkv, self.o, self.gate_up, self.down
        out = ops.attention_block_decode(
            hidden, residual, self.ln1.weight, self.ln1.eps,
            q.kind, q.tensors, q.group_size, self.qkv_bias, o.kind, o.tensors, o.group_size,
            self.num_heads, self.num_kv_heads, cos.reshape(t, self.head_dim), sin.reshape(t, self.head_dim),
            kv_cache[0], kv_cache[1], attn.slot_mapping, attn.block_tables, attn.context_lens, self.scale,
        )  # fmt: skip
        if self.dist.world_size > 1:
            out = self.dist.all_reduce(out)
        out = ops.mlp_block(
            out, residual, self.ln2.weight, self.ln2.eps, gu.kind, gu.tensors, gu.group_size,
            d.kind, d.tensors, d.group_size,
        )  # fmt: skip
        if self.dist.world_size > 1:
            out = self.dist.all_reduce(out)
        return out


class FusedStack:
    """The decode step of every decoder layer in one native call (one rank, no all-reduce).

    Built when every layer has a :class:`FusedDecode` and the model is not
    split: the per-layer tensors and settings are flattened once, so a decode
    step crosses from Python into the kernels once instead of twice a layer.
    """

    def __init__(self, layers: list[FusedDecode]) -> None:
        tensors: list[torch.Tensor] = []
        ints: list[int] = []
        floats: list[float] = []
        for f in layers:
            q, o, gu, d = f.qkv, f.o, f.gate_up, f.down
            tensors += [f.ln1.weight, *q.tensors]
            if f.qkv_bias is not None:
                tensors.append(f.qkv_bias)
            tensors += [*o.tensors, f.ln2.weight, *gu.tensors, *d.tensors]
            ints += [q.kind, len(q.tensors), q.group_size, int(f.qkv_bias is not None),
                     o.kind, len(o.tensors), o.group_size, gu.kind, len(gu.tensors), gu.group_size,
                     d.kind, len(d.tensors), d.group_size, f.num_heads, f.num_kv_heads]  # fmt: skip
            floats += [float(f.ln1.eps), float(f.ln2.eps), float(f.scale)]
        self.tensors, self.ints, self.floats = tensors, ints, floats
        self.head_dim = layers[0].head_dim

    @classmethod
    def build(cls, model: LlamaForCausalLM) -> FusedStack | None:
        fused = [layer.fused_decode for layer in model.model.layers]
        if model.dist.world_size > 1 or not fused or any(f is None for f in fused):
            return None
        return cls(fused)  # type: ignore[arg-type]

    def __call__(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        attn: AttentionMetadata,
    ) -> torch.Tensor:
        t = hidden.shape[0]
        return torch.ops.tgs_cpu.decoder_stack_decode(
            hidden, residual, self.tensors, self.ints, self.floats,
            cos.reshape(t, self.head_dim), sin.reshape(t, self.head_dim),
            [k for k, _ in kv_caches], [v for _, v in kv_caches],
            attn.slot_mapping, attn.block_tables, attn.context_lens,
        )  # fmt: skip


class LlamaModel(torch.nn.Module):
    def __init__(self, b: LlamaBuild) -> None:
        super().__init__()
        config = b.config
        self.embed_tokens = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, **b.tensor_args()
        )
        self.layers = torch.nn.ModuleList(
            LlamaDecoderLayer(b, f"model.layers.{i}") for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=b.dtype, device=b.device)


def _split_sizes(size: int, world_size: int, align: int = 1) -> list[int]:
    return [b - a for a, b in (shard_range(size, world_size, r, align) for r in range(world_size))]


class LlamaForCausalLM(CausalLM):
    """Llama and SmolLM; the base for Mistral and Qwen2."""

    packed_modules_mapping: ClassVar[dict[str, tuple[str, Any]]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(
        self,
        config: Any,
        *,
        dist: Distributed,
        dtype: torch.dtype,
        device: torch.device,
        quant: QuantConfig,
        tie_word_embeddings: bool,
    ) -> None:
        super().__init__()
        self.config = config
        self.dist = dist
        self.dtype = dtype
        self.device = device
        self.vocab_size = config.vocab_size
        self.num_layers = config.num_hidden_layers
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        partitions = partition_heads(num_heads, num_kv_heads, dist.world_size)
        self.num_kv_heads = partitions[dist.rank].num_kv_heads
        self._warn_unsupported_features(config)
        self.rotary = RotaryEmbedding.from_config(config, self.head_dim, device)
        build = LlamaBuild(
            config=config,
            dist=dist,
            dtype=dtype,
            device=device,
            quant=quant,
            backend=select_attention_backend(device),
            partition=partitions[dist.rank],
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=self.head_dim,
            **self._biases(config),
        )
        self.model = LlamaModel(build)
        self.lm_head = ParallelLMHead(
            config.vocab_size,
            config.hidden_size,
            **build.tensor_args(),
            tied_to=self.model.embed_tokens if tie_word_embeddings else None,
            kernel=quant.lm_head_kernel(),
        )
        self.tp_plan = self._describe_plan(build, partitions)
        self.fused_stack: FusedStack | None = None

    def finish_loading(self) -> None:
        """After every layer chose its fused step: the whole stack in one call where it can."""
        self.fused_stack = FusedStack.build(self)

    @classmethod
    def _biases(cls, config: Any) -> dict[str, bool]:
        attention_bias = bool(getattr(config, "attention_bias", False))
        return {
            "qkv_bias": attention_bias,
            "o_bias": attention_bias,
            "mlp_bias": bool(getattr(config, "mlp_bias", False)),
        }

    def _warn_unsupported_features(self, config: Any) -> None:
        window = getattr(config, "sliding_window", None)
        if window and getattr(config, "use_sliding_window", True):
            logger.warning(
                f"sliding_window={window} is ignored: attention spans the whole context, "
                f"which differs from the reference only for sequences longer than {window} tokens"
            )

    def _describe_plan(self, b: LlamaBuild, partitions: list[HeadPartition]) -> str:
        world = self.dist.world_size
        if world == 1:
            return f"single shard: {b.num_heads} q heads, {b.num_kv_heads} kv heads, no split"
        align = b.quant.input_alignment()
        mlp = "/".join(map(str, _split_sizes(self.config.intermediate_size, world, align)))
        vocab = "/".join(map(str, _split_sizes(self.vocab_size, world)))
        return f"{world} shards: {describe_partition(partitions)}, mlp {mlp}, vocab {vocab}"

    def decode_path(self) -> str:
        """How a decode step runs, for the start-up log."""
        fused = sum(layer.fused_decode is not None for layer in self.model.layers)
        if self.fused_stack is not None:
            return f"fused native layers, all {self.num_layers} in one operator call"
        if fused == self.num_layers:
            return "fused native layers (one operator per attention and MLP half)"
        if fused:
            return f"fused native layers for {fused} of {self.num_layers} layers, modules for the rest"
        return "per-module (no fused native layer: " + (
            "the native CPU kernels do not run here" if self.device.type == "cpu" else f"device {self.device}"
        ) + " or a linear kernel without a native form)"

    def skip_checkpoint_tensor(self, name: str) -> bool:
        # Old checkpoints store the rotary table; tied heads have no tensor of their own.
        if name.endswith("rotary_emb.inv_freq"):
            return True
        return name == "lm_head.weight" and self.lm_head.tied

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        attn: AttentionMetadata,
    ) -> torch.Tensor:
        if len(kv_caches) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} KV cache layers, got {len(kv_caches)}")
        residual = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary.cos_sin(positions, residual.dtype)
        # Each layer adds its input to the residual stream as its first step (fused with the
        # norm), so layer 0 starts from a zero addend.
        hidden = torch.zeros_like(residual)
        if self.fused_stack is not None and attn.is_decode and hidden.dtype == torch.float32:
            hidden = self.fused_stack(hidden, residual, cos, sin, kv_caches, attn)
        else:
            for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
                hidden = layer(hidden, residual, cos, sin, kv_cache, attn)
        return self.model.norm(hidden, residual)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral: Llama layout; its sliding window is not applied (logged at load)."""


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2: Llama layout with biases on q/k/v only."""

    @classmethod
    def _biases(cls, config: Any) -> dict[str, bool]:
        return {"qkv_bias": True, "o_bias": False, "mlp_bias": False}
