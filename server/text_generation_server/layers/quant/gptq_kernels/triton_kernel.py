"""GPTQ matmul in Triton, for CUDA.

One program computes a ``[BLOCK_M, BLOCK_N]`` tile of the output: for each
block of input features it unpacks the codes from ``qweight``, looks up each
feature's group through ``g_idx`` (so act-order and any group size, ragged
or not, take the same path), unpacks that group's zero points from
``qzeros`` and multiplies the dequantized tile with the activations,
accumulating in fp32. Nothing is repacked: the kernel reads the
checkpoint's tensors as they are.

Triton runs this on the CPU under ``TRITON_INTERPRET=1`` (slowly), which is
how its arithmetic is tested on hosts without a GPU; the variable must be set
before ``triton`` is first imported, since Triton decorates its own library
functions for one mode at import.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch

from text_generation_server.layers.quant.gptq_kernels.base import GPTQKernel, GPTQWeights

SUPPORTED_BITS = (2, 4, 8)
BLOCK_M, BLOCK_N, BLOCK_K = 16, 32, 32


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _kernel() -> Any:
    from text_generation_server.layers.quant.gptq_kernels.triton_source import gptq_matmul

    return gptq_matmul


class TritonKernel(GPTQKernel):
    name = "gptq-triton"

    @classmethod
    def unsupported(cls, weights: GPTQWeights, device: torch.device) -> str | None:
        if not triton_available():
            return "triton is not installed"
        if device.type != "cuda" and not interpreting():
            return f"runs on CUDA (or under TRITON_INTERPRET=1), not {device.type}"
        if weights.bits not in SUPPORTED_BITS:
            return f"unpacks {'/'.join(map(str, SUPPORTED_BITS))}-bit words, not {weights.bits}-bit"
        if weights.in_features == 0 or weights.out_features == 0:
            return "the layer is empty on this rank"
        return None

    def __init__(self, weights: GPTQWeights) -> None:
        self.weights = weights
        self.g_idx = weights.g_idx.to(torch.int32).contiguous()
        self.zero_offset = 1 if weights.checkpoint_format == "gptq" else 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import triton

        w = self.weights
        m, k = x.shape
        n = w.out_features
        y = torch.empty(m, n, dtype=x.dtype, device=x.device)
        grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N))
        _kernel()[grid](
            x,
            w.qweight,
            w.qzeros,
            w.scales,
            self.g_idx,
            y,
            m,
            n,
            k,
            x.stride(0),
            x.stride(1),
            w.qweight.stride(0),
            w.qweight.stride(1),
            w.qzeros.stride(0),
            w.qzeros.stride(1),
            w.scales.stride(0),
            w.scales.stride(1),
            y.stride(0),
            y.stride(1),
            BITS=w.bits,
            ZERO_OFFSET=self.zero_offset,
            BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N,
            BLOCK_K=BLOCK_K,
        )
        return y

    def tensors(self) -> dict[str, torch.Tensor]:
        w = self.weights
        return {"qweight": w.qweight, "qzeros": w.qzeros, "scales": w.scales, "g_idx": self.g_idx}
