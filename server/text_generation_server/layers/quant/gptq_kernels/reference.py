"""Dequantize-then-matmul: the reference every other GPTQ kernel is tested
against, and the fallback for layouts the fast kernels refuse (2/3/8 bits,
group shapes they cannot express). It keeps the checkpoint's packed tensors
and rebuilds the dense weight on every call, so it costs no memory and much
time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from text_generation_server.layers.quant.gptq_kernels.base import GPTQKernel, GPTQWeights
from text_generation_server.quantize.packing import dequantize_gptq


class ReferenceKernel(GPTQKernel):
    name = "gptq-reference"

    def __init__(self, weights: GPTQWeights) -> None:
        self.weights = weights
        self.g_idx = weights.g_idx.to(torch.int64)

    @classmethod
    def unsupported(cls, weights: GPTQWeights, device: torch.device) -> str | None:
        return None

    def dequantize(self) -> torch.Tensor:
        """The dense ``[out, in]`` weight in float32, built on the weights' own device."""
        w = self.weights
        return dequantize_gptq(w.qweight, w.qzeros, w.scales, self.g_idx, w.bits, w.checkpoint_format)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize().to(x.dtype))

    def tensors(self) -> dict[str, torch.Tensor]:
        w = self.weights
        return {"qweight": w.qweight, "qzeros": w.qzeros, "scales": w.scales, "g_idx": self.g_idx}
