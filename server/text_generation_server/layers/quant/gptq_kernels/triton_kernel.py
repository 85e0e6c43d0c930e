"""GPTQ matmul in Triton, for CUDA.

One program computes a ``[BLOCK_M, BLOCK_N]`` tile of the output: for each
block of input features it unpacks the codes from ``qweight``, looks up each
feature's group through ``g_idx`` (so act-order and any group size, ragged
or not, take the same path), unpacks that group's zero points from
``qzeros`` and multiplies the dequantized tile with the activations,
accumulating in fp32. Nothing is repacked: the kernel reads the
checkpoint's tensors as they are.

Triton runs this on the CPU under ``TRITON_INTERPRET=1`` (slowly), which is
how its arithmetic is tested on hosts without a GPU.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch

from text_generation_server.layers.quant.gptq_kernels.base import (
    GPTQKernel,
    GPTQWeights,
    tensor_bytes,
)

SUPPORTED_BITS = (2, 4, 8)
BLOCK_M, BLOCK_N, BLOCK_K = 16, 32, 32

_compiled: dict[bool, Any] = {}


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _kernel() -> Any:
    # Built on first use: Triton decides at decoration time whether to interpret.
    mode = interpreting()
    if mode in _compiled:
        return _compiled[mode]
    import triton
    import triton.language as tl

    @triton.jit
    def gptq_matmul(
        x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, y_ptr,
        M, N, K,
        stride_xm, stride_xk, stride_qwk, stride_qwn, stride_qzg, stride_qzn,
        stride_sg, stride_sn, stride_ym, stride_yn,
        BITS: tl.constexpr, ZERO_OFFSET: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        per_word: tl.constexpr = 32 // BITS
        mask: tl.constexpr = (1 << BITS) - 1
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = offs_m < M
        n_ok = offs_n < N
        zero_shift = (offs_n % per_word) * BITS
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            x = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                mask=m_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            kn_ok = k_ok[:, None] & n_ok[None, :]
            words = tl.load(
                qweight_ptr + (offs_k[:, None] // per_word) * stride_qwk
                + offs_n[None, :] * stride_qwn,
                mask=kn_ok,
                other=0,
            )
            codes = (words >> ((offs_k[:, None] % per_word) * BITS)) & mask
            group = tl.load(g_idx_ptr + offs_k, mask=k_ok, other=0)
            scale = tl.load(
                scales_ptr + group[:, None] * stride_sg + offs_n[None, :] * stride_sn,
                mask=kn_ok,
                other=0.0,
            ).to(tl.float32)
            zero_words = tl.load(
                qzeros_ptr + group[:, None] * stride_qzg
                + (offs_n[None, :] // per_word) * stride_qzn,
                mask=kn_ok,
                other=0,
            )
            zeros = ((zero_words >> zero_shift[None, :]) & mask) + ZERO_OFFSET
            w = ((codes - zeros).to(tl.float32) * scale).to(x.dtype)
            acc += tl.dot(x, w)
        tl.store(
            y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
            acc.to(y_ptr.dtype.element_ty),
            mask=m_ok[:, None] & n_ok[None, :],
        )

    _compiled[mode] = gptq_matmul
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
            x, w.qweight, w.qzeros, w.scales, self.g_idx, y,
            m, n, k,
            x.stride(0), x.stride(1), w.qweight.stride(0), w.qweight.stride(1),
            w.qzeros.stride(0), w.qzeros.stride(1), w.scales.stride(0), w.scales.stride(1),
            y.stride(0), y.stride(1),
            BITS=w.bits, ZERO_OFFSET=self.zero_offset,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        )
        return y

    def nbytes(self) -> int:
        w = self.weights
        return tensor_bytes(w.qweight, w.qzeros, w.scales, self.g_idx)
