"""What every served architecture provides to the engine."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch

from text_generation_server.layers.attention import AttentionMetadata

if TYPE_CHECKING:
    from text_generation_server.execution import ExecutionPlan
    from text_generation_server.models.spec import ModelSpec


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture has no implementation here."""


class CausalLM(torch.nn.Module):
    """A decoder-only language model sharded for one rank.

    Attributes the engine relies on: ``config`` (transformers config),
    ``num_layers``, ``num_kv_heads`` (KV heads held by this rank, for sizing
    the KV cache), ``head_dim``, ``dtype``, ``device``, ``vocab_size`` (full
    vocabulary), ``kernel`` (linear kernel in use) and ``tp_plan`` (how heads,
    MLP and vocabulary are split across ranks).

    The model is plain torch modules: ``forward`` is its arithmetic on any
    device and dtype. :meth:`spec` declares its decoder layers for the
    execution plan, which ``load_model`` chooses and sets as ``plan``; the
    engine runs forwards through ``plan.forward``.
    """

    # Checkpoint module name -> (fused module name, part id), e.g. q_proj -> (qkv_proj, "q").
    packed_modules_mapping: ClassVar[dict[str, tuple[str, Any]]] = {}

    config: Any
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    vocab_size: int
    kernel: str = "unloaded"
    tp_plan: str
    plan: ExecutionPlan  # set by load_model

    @classmethod
    def config_refusal(cls, config: Any) -> str | None:
        """What in ``config`` (a transformers config) this implementation does not serve, or
        ``None``. Asked before any shard starts (the launcher's preflight) and at load."""
        return None

    def checkpoint_views(self, weights: Any) -> None:
        """Present stored tensors under the names the model loads (e.g. the parts of a fused
        projection, :meth:`~text_generation_server.weights.Weights.split`) before loading."""

    def skip_checkpoint_tensor(self, name: str) -> bool:
        """True for checkpoint tensors the model knowingly does not use."""
        return False

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        attn: AttentionMetadata,
    ) -> torch.Tensor:
        """Hidden states ``[T, hidden]`` after the final norm for the flattened tokens ``[T]``."""
        raise NotImplementedError

    def spec(self) -> ModelSpec | None:
        """The decoder layers as the execution plan reads them (``models/spec.py``); ``None``
        keeps every step on the modules."""
        return None

    def prepare(
        self, input_ids: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """What the first decoder layer takes: ``(hidden, residual, cos, sin)`` for the tokens
        (a zero ``hidden``, the embedded tokens as the residual stream, the rotary tables)."""
        raise NotImplementedError

    def finish(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The final norm over the last layer's output joined to the residual stream."""
        raise NotImplementedError

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[N, hidden]`` -> ``[N, vocab_size]`` float32 logits, full vocabulary on every rank."""
        raise NotImplementedError
