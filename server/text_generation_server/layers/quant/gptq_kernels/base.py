"""What every GPTQ kernel takes and promises.

A kernel is built once per linear layer, at load, from that rank's
:class:`GPTQWeights`, and then only multiplies. Whether it can take a layer
is its own business (:meth:`GPTQKernel.unsupported` says why not), so the
choice between kernels never depends on shapes tested elsewhere.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from text_generation_server.kernels.config import KernelConfig
from text_generation_server.layers.quant.base import NativeLinear
from text_generation_server.quantize.packing import unpack_gptq


@dataclass
class GPTQWeights:
    """One rank's packed GPTQ tensors, in the checkpoint layout.

    ``g_idx`` holds, for each of this rank's input features, the row of
    ``scales``/``qzeros`` that applies to it (already made local when the
    rank holds a slice of the groups).
    """

    qweight: torch.Tensor  # int32 [in * bits / 32, out]
    qzeros: torch.Tensor  # int32 [G, out * bits / 32]
    scales: torch.Tensor  # float [G, out]
    g_idx: torch.Tensor  # int [in], values in [0, G)
    bits: int
    checkpoint_format: str  # "gptq" (zeros stored minus one) or "gptq_v2"

    @property
    def in_features(self) -> int:
        return self.g_idx.shape[0]

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]

    @property
    def num_groups(self) -> int:
        return self.scales.shape[0]

    def unpack(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer codes ``[out, in]`` and zero points ``[G, out]`` (int32)."""
        return unpack_gptq(self.qweight, self.qzeros, self.bits, self.checkpoint_format)


class GPTQKernel(ABC):
    """``x @ W.T`` for one layer's GPTQ weights, prepared once."""

    name: ClassVar[str]

    @classmethod
    @abstractmethod
    def unsupported(cls, weights: GPTQWeights, device: torch.device) -> str | None:
        """Why this kernel cannot take ``weights`` on ``device``, or ``None`` when it can."""

    @classmethod
    def from_config(cls, weights: GPTQWeights, kernels: KernelConfig) -> GPTQKernel:
        """Build for ``weights`` with the shard's kernel switches (most kernels have none)."""
        return cls(weights)  # type: ignore[call-arg]

    @abstractmethod
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, in]`` activations -> ``[T, out]`` in ``x``'s dtype."""

    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """The weight data this kernel keeps (packed weights, scales, zeros, indices), by name."""

    def nbytes(self) -> int:
        """Bytes of :meth:`tensors`."""
        return tensor_bytes(*self.tensors().values())


def tensor_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class ConcatKernel(GPTQKernel):
    """Several kernels over consecutive output slices of one layer, outputs side by side.

    Used for a fused layer whose parts (e.g. q/k/v) carry different act-order
    permutations.
    """

    def __init__(self, kernels: list[GPTQKernel]) -> None:
        self.kernels = kernels
        self.name = kernels[0].name

    @classmethod
    def unsupported(cls, weights: GPTQWeights, device: torch.device) -> str | None:
        return "built from per-part kernels only"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([k(x) for k in self.kernels], dim=-1)

    def native_linear(self) -> NativeLinear | None:
        """The parts side by side, where every part has a native form."""
        parts = [getattr(k, "native_linear", lambda: None)() for k in self.kernels]
        if any(p is None for p in parts):
            return None
        return NativeLinear.concat(parts)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            f"part{i}_{n}": t for i, k in enumerate(self.kernels) for n, t in k.tensors().items()
        }
