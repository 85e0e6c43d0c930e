"""Llama-family decoder (Llama, SmolLM, Mistral, Qwen2, Qwen3, Granite, Phi-3) from tensor-parallel layers.

Parameter names follow the checkpoint's (``model.layers.N.self_attn...``)
except where projections are fused: q/k/v -> ``qkv_proj`` and gate/up ->
``gate_up_proj`` (see ``packed_modules_mapping``).

The modules are the arithmetic on any device and dtype; :meth:`LlamaDecoderLayer.spec`
declares the same layer for the execution plan (``execution/``), which decides once at
load whether decode steps run through native kernels instead. A family member with
another layer shape subclasses the layer (its modules, ``forward`` and ``spec``) and
names it in ``decoder_layer_cls``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from text_generation_server.distributed import Distributed
from text_generation_server.layers.attention import (
    AttentionBackend,
    AttentionMetadata,
    PagedAttention,
    select_attention_backend,
)
from text_generation_server.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from text_generation_server.layers.fused import gelu_tanh_mul, silu_mul
from text_generation_server.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from text_generation_server.layers.norm import LayerNorm, RMSNorm
from text_generation_server.layers.partition import (
    HeadPartition,
    describe_partition,
    partition_heads,
)
from text_generation_server.layers.quant.base import QuantConfig
from text_generation_server.layers.rotary import RotaryEmbedding, rope_refusal
from text_generation_server.models.base import CausalLM
from text_generation_server.models.spec import AttentionSpec, DecoderLayerSpec, MLPSpec, ModelSpec
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
    attention_scale: float  # softmax scale of q.k
    activation: str = "silu"  # of the gated MLP: silu or gelu_tanh
    attention_softcap: float | None = None  # scores capped to softcap * tanh(score / softcap)
    sliding_window: int | None = None  # this layer's (set per layer by LlamaModel)

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
            self.num_heads, self.num_kv_heads, hd, scale=b.attention_scale, backend=b.backend,
            sliding_window=b.sliding_window, softcap=b.attention_softcap,
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
        qk = RotaryEmbedding.apply(self.norm_heads(qk), cos, sin)
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        v = qkv[:, self.q_size + self.kv_size :].view(tokens, self.num_kv_heads, self.head_dim)
        return self.o_proj(self.attn(q, k, v, kv_cache, attn))

    def norm_heads(self, qk: torch.Tensor) -> torch.Tensor:
        """``qk [T, q heads + kv heads, D]`` before rotary; Llama has no per-head norm."""
        return qk


class Qwen3Attention(LlamaAttention):
    """Llama attention with an RMSNorm over each query and key head (``q_norm``, ``k_norm``,
    weights of head_dim, shared by the heads) before rotary."""

    head_norm_cls: ClassVar[type[RMSNorm]] = RMSNorm

    def __init__(self, b: LlamaBuild, prefix: str) -> None:
        super().__init__(b, prefix)
        eps = b.config.rms_norm_eps
        self.q_norm = self.head_norm_cls(self.head_dim, eps, dtype=b.dtype, device=b.device)
        self.k_norm = self.head_norm_cls(self.head_dim, eps, dtype=b.dtype, device=b.device)

    def norm_heads(self, qk: torch.Tensor) -> torch.Tensor:
        tokens, d = qk.shape[0], self.head_dim
        q = self.q_norm(qk[:, : self.num_heads].reshape(-1, d)).view(tokens, self.num_heads, d)
        k = self.k_norm(qk[:, self.num_heads :].reshape(-1, d)).view(tokens, self.num_kv_heads, d)
        return torch.cat([q, k], dim=1)


_GATED_ACTIVATIONS = {"silu": silu_mul, "gelu_tanh": gelu_tanh_mul}


class LlamaMLP(torch.nn.Module):
    def __init__(self, b: LlamaBuild, prefix: str) -> None:
        super().__init__()
        if b.activation not in _GATED_ACTIVATIONS:
            raise ValueError(f"unsupported activation '{b.activation}'; supported: {', '.join(_GATED_ACTIVATIONS)}")
        self.activation = b.activation
        self._act_mul = _GATED_ACTIVATIONS[b.activation]
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
        return self.down_proj(self._act_mul(self.gate_up_proj(x), self.gate_up_proj.output_sizes))


class LlamaDecoderLayer(torch.nn.Module):
    attention_cls: ClassVar[type[LlamaAttention]] = LlamaAttention
    norm_cls: ClassVar[type[RMSNorm] | type[LayerNorm]] = RMSNorm  # every norm of the model, the final one too

    def __init__(self, b: LlamaBuild, prefix: str) -> None:
        super().__init__()
        hidden, eps = b.config.hidden_size, b.config.rms_norm_eps
        self.self_attn = self.attention_cls(b, f"{prefix}.self_attn")
        self.mlp = LlamaMLP(b, f"{prefix}.mlp")
        self.input_layernorm = self.norm_cls(hidden, eps, dtype=b.dtype, device=b.device)
        self.post_attention_layernorm = self.norm_cls(hidden, eps, dtype=b.dtype, device=b.device)

    @staticmethod
    def _attention_spec(a: LlamaAttention) -> AttentionSpec:
        return AttentionSpec(
            qkv=a.qkv_proj, o=a.o_proj, num_heads=a.num_heads, num_kv_heads=a.num_kv_heads,
            head_dim=a.head_dim, scale=a.attn.scale, rotary="neox",
            q_norm=getattr(a, "q_norm", None), k_norm=getattr(a, "k_norm", None),
            sliding_window=a.attn.sliding_window, softcap=a.attn.softcap,
        )

    def spec(self) -> DecoderLayerSpec:
        """Pre-norm: input_layernorm before attention, post_attention_layernorm before the MLP."""
        m = self.mlp
        return DecoderLayerSpec(
            attention=self._attention_spec(self.self_attn),
            mlp=MLPSpec(gate_up=m.gate_up_proj, down=m.down_proj, activation=m.activation),
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
        """The layer's MLP output; ``residual`` (the stream before it) gains ``hidden`` and
        the attention output, in place. The layer's output is ``residual + returned``."""
        x = self.input_layernorm(hidden, residual)
        x = self.post_attention_layernorm(self.self_attn(x, cos, sin, kv_cache, attn), residual)
        return self.mlp(x)


class LlamaModel(torch.nn.Module):
    def __init__(
        self, b: LlamaBuild, layer_cls: type[LlamaDecoderLayer], windows: list[int | None], norm_eps: float
    ) -> None:
        super().__init__()
        config = b.config
        self.embed_tokens = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, **b.tensor_args()
        )
        self.layers = torch.nn.ModuleList(
            layer_cls(replace(b, sliding_window=windows[i]), f"model.layers.{i}")
            for i in range(config.num_hidden_layers)
        )
        self.norm = layer_cls.norm_cls(config.hidden_size, norm_eps, dtype=b.dtype, device=b.device)


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
    # The decoder layer: a family member with another layer (norm placement, extra norms)
    # names its own class and spec here; the rest of the model is shared.
    decoder_layer_cls: ClassVar[type[LlamaDecoderLayer]] = LlamaDecoderLayer

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
        self.quant = quant
        self.dist = dist
        self.dtype = dtype
        self.device = device
        self.vocab_size = config.vocab_size
        self.num_layers = config.num_hidden_layers
        num_heads = config.num_attention_heads
        num_kv_heads = self._num_kv_heads(config)
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        partitions = partition_heads(num_heads, num_kv_heads, dist.world_size)
        self.num_kv_heads = partitions[dist.rank].num_kv_heads
        self.sliding_windows = self._sliding_windows(config)
        self.rotary = self._rotary(config, self.head_dim, device)
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
            attention_scale=self._attention_scale(config, self.head_dim),
            activation=self._activation(config),
            attention_softcap=self._attention_softcap(config),
            **self._biases(config),
        )
        self.model = LlamaModel(build, self.decoder_layer_cls, self.sliding_windows, self.norm_eps(config))
        self.lm_head = ParallelLMHead(
            config.vocab_size,
            config.hidden_size,
            **build.tensor_args(),
            tied_to=self.model.embed_tokens if tie_word_embeddings else None,
            kernel=quant.lm_head_kernel(),
        )
        self.tp_plan = self._describe_plan(build, partitions)

    @classmethod
    def config_refusal(cls, config: Any) -> str | None:
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            return f"hidden_act '{act}' is not built for {cls.__name__} (silu only)"
        return rope_refusal(config)

    @classmethod
    def _attention_scale(cls, config: Any, head_dim: int) -> float:
        return head_dim**-0.5

    @classmethod
    def _rotary(cls, config: Any, head_dim: int, device: torch.device) -> Any:
        """What ``prepare`` asks for each step's cos/sin (``cos_sin(positions, dtype)``)."""
        return RotaryEmbedding.from_config(config, head_dim, device)

    @classmethod
    def _num_kv_heads(cls, config: Any) -> int:
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads

    @classmethod
    def norm_eps(cls, config: Any) -> float:
        return config.rms_norm_eps

    @classmethod
    def intermediate_size(cls, config: Any) -> int:
        return config.intermediate_size

    @classmethod
    def _activation(cls, config: Any) -> str:
        return "silu"

    @classmethod
    def _attention_softcap(cls, config: Any) -> float | None:
        return None

    @classmethod
    def _biases(cls, config: Any) -> dict[str, bool]:
        attention_bias = bool(getattr(config, "attention_bias", False))
        return {
            "qkv_bias": attention_bias,
            "o_bias": attention_bias,
            "mlp_bias": bool(getattr(config, "mlp_bias", False)),
        }

    @staticmethod
    def _sliding_windows(config: Any) -> list[int | None]:
        """Each layer's sliding window (None: full attention). ``layer_types`` says which layers
        slide where the config has it (Qwen2/Qwen3 from ``max_window_layers``); otherwise a
        ``sliding_window`` applies to every layer unless ``use_sliding_window`` is false (Mistral)."""
        n = config.num_hidden_layers
        window = getattr(config, "sliding_window", None)
        if not window:
            return [None] * n
        types = getattr(config, "layer_types", None)
        if types:
            return [int(window) if t == "sliding_attention" else None for t in types]
        if getattr(config, "use_sliding_window", True) is False:
            return [None] * n
        return [int(window)] * n

    def _describe_plan(self, b: LlamaBuild, partitions: list[HeadPartition]) -> str:
        world = self.dist.world_size
        sliding = [w for w in self.sliding_windows if w]
        slide = ""
        if sliding:
            sizes = "/".join(map(str, sorted(set(sliding))))
            slide = f", sliding window {sizes} on {len(sliding)} of {len(self.sliding_windows)} layers"
        if world == 1:
            return f"single shard: {b.num_heads} q heads, {b.num_kv_heads} kv heads, no split{slide}"
        align = b.quant.input_alignment()
        mlp = "/".join(map(str, _split_sizes(self.intermediate_size(self.config), world, align)))
        vocab = "/".join(map(str, _split_sizes(self.vocab_size, world)))
        return f"{world} shards: {describe_partition(partitions)}, mlp {mlp}, vocab {vocab}{slide}"

    def spec(self) -> ModelSpec:
        return ModelSpec(
            layers=[layer.spec() for layer in self.model.layers],
            hidden_size=self.config.hidden_size,
            device=self.device,
            dtype=self.dtype,
            world_size=self.dist.world_size,
        )

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
        hidden, residual, cos, sin = self.prepare(input_ids, positions)
        for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
            hidden = layer(hidden, residual, cos, sin, kv_cache, attn)
        return self.finish(hidden, residual)

    def prepare(
        self, input_ids: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        residual = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary.cos_sin(positions, residual.dtype)
        # Each layer adds its input to the residual stream as its first step (fused with the
        # norm), so layer 0 starts from a zero addend.
        return torch.zeros_like(residual), residual, cos, sin

    def finish(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.model.norm(hidden, residual)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral: Llama layout with a sliding window on every layer (where the config sets one)."""


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2: Llama layout with biases on q/k/v only."""

    @classmethod
    def _biases(cls, config: Any) -> dict[str, bool]:
        return {"qkv_bias": True, "o_bias": False, "mlp_bias": False}


class Qwen3DecoderLayer(LlamaDecoderLayer):
    attention_cls = Qwen3Attention


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3: Llama layout (no biases by default) with per-head q/k RMSNorm before rotary."""

    decoder_layer_cls = Qwen3DecoderLayer


class GraniteDecoderLayer(LlamaDecoderLayer):
    """Granite: each block's output is scaled by ``residual_multiplier`` before it joins the stream."""

    def __init__(self, b: LlamaBuild, prefix: str) -> None:
        super().__init__(b, prefix)
        self.residual_scale = float(b.config.residual_multiplier)

    def spec(self) -> DecoderLayerSpec:
        return replace(super().spec(), output_scale=self.residual_scale)

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
        a = self.self_attn(x, cos, sin, kv_cache, attn) * self.residual_scale
        x = self.post_attention_layernorm(a, residual)
        return self.mlp(x) * self.residual_scale


class GraniteForCausalLM(LlamaForCausalLM):
    """IBM Granite: Llama layout with an embedding multiplier, block outputs scaled by the residual
    multiplier, the attention multiplier as softmax scale, and logits divided by logits_scaling."""

    decoder_layer_cls = GraniteDecoderLayer

    def __init__(self, config: Any, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.embedding_scale = float(config.embedding_multiplier)
        self.logits_scaling = float(config.logits_scaling)

    @classmethod
    def _attention_scale(cls, config: Any, head_dim: int) -> float:
        return float(config.attention_multiplier)

    def prepare(
        self, input_ids: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden, residual, cos, sin = super().prepare(input_ids, positions)
        residual.mul_(self.embedding_scale)
        return hidden, residual, cos, sin

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().compute_logits(hidden) / self.logits_scaling


class Phi3ForCausalLM(LlamaForCausalLM):
    """Phi-3: Llama arithmetic with q/k/v stored fused as ``qkv_proj`` and gate/up as ``gate_up_proj``.

    The checkpoint's fused tensors are read as their parts (q, k, v; gate, up), so each is
    split over the ranks like Llama's separate projections; GPTQ checkpoints of the fused
    modules (as GPTQModel writes Phi-3) are split the same way, ``qzeros`` in whole words.
    """

    @classmethod
    def config_refusal(cls, config: Any) -> str | None:
        params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        rope_type = params.get("rope_type") or params.get("type")
        if rope_type in ("longrope", "su", "yarn"):
            return (f"rope scaling '{rope_type}' (the 128k-context Phi-3 variants) is not built; "
                    f"the 4k-context checkpoints are served")
        return super().config_refusal(config)

    def checkpoint_views(self, weights: Any) -> None:
        c = self.config
        q = c.num_attention_heads * self.head_dim
        kv = (getattr(c, "num_key_value_heads", None) or c.num_attention_heads) * self.head_dim
        inter = c.intermediate_size
        per = getattr(self.quant, "features_per_word", None)
        fused_layers = (
            ("self_attn", "qkv_proj", (("q_proj", q), ("k_proj", kv), ("v_proj", kv))),
            ("mlp", "gate_up_proj", (("gate_proj", inter), ("up_proj", inter))),
        )
        for i in range(c.num_hidden_layers):
            for block, fused, parts in fused_layers:
                prefix = f"model.layers.{i}.{block}"
                for suffix, dim in LINEAR_TENSORS:
                    name = f"{prefix}.{fused}.{suffix}"
                    if not weights.has(name):
                        continue
                    names = [f"{prefix}.{part}.{suffix}" for part, _ in parts]
                    if dim is None:  # every part has all of it
                        weights.split(name, 0, [(n, None) for n in names])
                        continue
                    sizes = [size for _, size in parts]
                    if suffix == "qzeros":
                        sizes = [whole_words(name, size, per) for size in sizes]
                    weights.split(name, dim, list(zip(names, sizes, strict=True)))


# Tensors a checkpoint may hold for one linear layer (dense or GPTQ) and the dim along its output
# features (None: per input feature). Views of fused or renamed linears cover each of them.
LINEAR_TENSORS: tuple[tuple[str, int | None], ...] = (
    ("weight", 0), ("bias", 0), ("qweight", 1), ("scales", 1), ("qzeros", 1), ("g_idx", None),
)


def whole_words(name: str, features: int, per: Any, what: str = "a part") -> int:
    """Packed words (``per`` features each, the quantization's ``features_per_word``) holding
    ``features`` output features; :class:`CheckpointError` when they do not fill whole words."""
    from text_generation_server.weights import CheckpointError

    if per is None or (features / per) != int(features / per):
        raise CheckpointError(f"{name}: {what} of {features} output features does not fill whole packed words")
    return int(features / per)
