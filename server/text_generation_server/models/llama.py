"""Llama-family decoder (Llama, SmolLM, Mistral, Qwen2) from tensor-parallel layers.

Parameter names follow the checkpoint's (``model.layers.N.self_attn...``)
except where projections are fused: q/k/v -> ``qkv_proj`` and gate/up ->
``gate_up_proj`` (see ``packed_modules_mapping``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from loguru import logger

from text_generation_server.distributed import Distributed
from text_generation_server.layers.attention import (
    AttentionBackend,
    AttentionMetadata,
    PagedAttention,
    select_attention_backend,
)
from text_generation_server.layers.embedding import ParallelLMHead, VocabParallelEmbedding
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
from text_generation_server.layers.quant.base import QuantConfig
from text_generation_server.layers.rotary import RotaryEmbedding
from text_generation_server.models.base import CausalLM
from text_generation_server.weights import shard_range


def _split_sizes(size: int, world_size: int, align: int = 1) -> list[int]:
    return [b - a for a, b in (shard_range(size, world_size, r, align) for r in range(world_size))]


class LlamaAttention(torch.nn.Module):
    def __init__(
        self,
        config: Any,
        prefix: str,
        *,
        partition: HeadPartition,
        total_heads: tuple[int, int],
        head_dim: int,
        qkv_bias: bool,
        o_bias: bool,
        quant: QuantConfig,
        backend: AttentionBackend,
        dist: Distributed,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = partition.num_heads
        self.num_kv_heads = partition.num_kv_heads
        self.head_dim = head_dim
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        self.qkv_proj = QKVParallelLinear(
            hidden,
            head_dim,
            total_heads[0],
            total_heads[1],
            partition,
            bias=qkv_bias,
            quant_method=quant(f"{prefix}.qkv_proj"),
            dist=dist,
            dtype=dtype,
            device=device,
        )
        # o_proj's input columns are this rank's query heads, in head order.
        self.o_proj = RowParallelLinear(
            total_heads[0] * head_dim,
            hidden,
            input_range=(partition.q_start * head_dim, partition.q_stop * head_dim),
            bias=o_bias,
            quant_method=quant(f"{prefix}.o_proj"),
            dist=dist,
            dtype=dtype,
            device=device,
        )
        self.attn = PagedAttention(
            self.num_heads,
            self.num_kv_heads,
            head_dim,
            scale=head_dim**-0.5,
            backend=backend,
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
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = RotaryEmbedding.apply(q.view(tokens, self.num_heads, self.head_dim), cos, sin)
        k = RotaryEmbedding.apply(k.view(tokens, self.num_kv_heads, self.head_dim), cos, sin)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        return self.o_proj(self.attn(q, k, v, kv_cache, attn))


class LlamaMLP(torch.nn.Module):
    def __init__(
        self,
        config: Any,
        prefix: str,
        *,
        bias: bool,
        quant: QuantConfig,
        dist: Distributed,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act '{act}' in the model config; supported: silu")
        size = config.intermediate_size
        # Both halves split the same way so a rank's gate and up rows pair up,
        # and down_proj takes the matching input columns.
        align = quant.input_alignment()
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size,
            [size, size],
            align=align,
            bias=bias,
            quant_method=quant(f"{prefix}.gate_up_proj"),
            dist=dist,
            dtype=dtype,
            device=device,
        )
        self.down_proj = RowParallelLinear(
            size,
            config.hidden_size,
            input_range=shard_range(size, dist.world_size, dist.rank, align),
            bias=bias,
            quant_method=quant(f"{prefix}.down_proj"),
            dist=dist,
            dtype=dtype,
            device=device,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.gate_up_proj.output_sizes, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(torch.nn.Module):
    def __init__(self, config: Any, prefix: str, **kwargs: Any) -> None:
        super().__init__()
        dtype, device = kwargs["dtype"], kwargs["device"]
        self.self_attn = LlamaAttention(
            config,
            f"{prefix}.self_attn",
            partition=kwargs["partition"],
            total_heads=kwargs["total_heads"],
            head_dim=kwargs["head_dim"],
            qkv_bias=kwargs["qkv_bias"],
            o_bias=kwargs["o_bias"],
            quant=kwargs["quant"],
            backend=kwargs["backend"],
            dist=kwargs["dist"],
            dtype=dtype,
            device=device,
        )
        self.mlp = LlamaMLP(
            config,
            f"{prefix}.mlp",
            bias=kwargs["mlp_bias"],
            quant=kwargs["quant"],
            dist=kwargs["dist"],
            dtype=dtype,
            device=device,
        )
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps, dtype=dtype, device=device)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, dtype=dtype, device=device)

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        attn: AttentionMetadata,
    ) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin, kv_cache, attn)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class LlamaModel(torch.nn.Module):
    def __init__(
        self,
        config: Any,
        *,
        dist: Distributed,
        dtype: torch.dtype,
        device: torch.device,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, dist=dist, dtype=dtype, device=device
        )
        self.layers = torch.nn.ModuleList(
            LlamaDecoderLayer(
                config, f"model.layers.{i}", dist=dist, dtype=dtype, device=device, **kwargs
            )
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device)


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
        partition = partitions[dist.rank]
        self.num_kv_heads = partition.num_kv_heads
        self._warn_unsupported_features(config)
        self.rotary = RotaryEmbedding.from_config(config, self.head_dim, device)
        self.model = LlamaModel(
            config,
            dist=dist,
            dtype=dtype,
            device=device,
            partition=partition,
            total_heads=(num_heads, num_kv_heads),
            head_dim=self.head_dim,
            quant=quant,
            backend=select_attention_backend(device),
            **self._biases(config),
        )
        self.lm_head = ParallelLMHead(
            config.vocab_size,
            config.hidden_size,
            dist=dist,
            dtype=dtype,
            device=device,
            tied_to=self.model.embed_tokens if tie_word_embeddings else None,
        )
        self.tp_plan = self._describe_plan(partitions, num_kv_heads, quant.input_alignment())

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

    def _describe_plan(self, partitions: list[HeadPartition], num_kv_heads: int, align: int) -> str:
        world = self.dist.world_size
        if world == 1:
            return (
                f"single shard: {self.config.num_attention_heads} q heads, "
                f"{num_kv_heads} kv heads, no split"
            )
        mlp = "/".join(map(str, _split_sizes(self.config.intermediate_size, world, align)))
        vocab = "/".join(map(str, _split_sizes(self.vocab_size, world)))
        return f"{world} shards: {describe_partition(partitions)}, mlp {mlp}, vocab {vocab}"

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
        hidden = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary.cos_sin(positions, hidden.dtype)
        for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
            hidden = layer(hidden, cos, sin, kv_cache, attn)
        return self.model.norm(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral: Llama layout; its sliding window is not applied (logged at load)."""


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2: Llama layout with biases on q/k/v only."""

    @classmethod
    def _biases(cls, config: Any) -> dict[str, bool]:
        return {"qkv_bias": True, "o_bias": False, "mlp_bias": False}
