"""4-bit GPTQ on the CPU through the project's own AVX2 kernel (``tgs_cpu.int4_linear``;
an AVX-512 VNNI form of it, with the same integer arithmetic, where the CPU has that).

Activations are quantized per kernel group to 16 bits and multiplied with
the 4-bit codes in integer arithmetic (``vpmaddwd``), one fp16 scale and one
zero point per (row, group) as the checkpoint stores them: within ~3e-5 of
the float product (torch's bf16 int4 matmul: ~3e-3) and about twice its
speed for the few rows of a decode step. Four output rows are computed at
once, so their group scales and zero points are single vector loads. From :data:`DENSE_FROM_ROWS` rows on
(prefill) the weights are unpacked for the call and multiplied by a float
matrix product instead: in bfloat16 where the CPU has native bf16 dot
products (AVX-512 BF16 or AMX; two to four times float32's speed there, with
bf16's rounding of activations and weights, as GPTQModel's CPU path has in
every call), else in float32 (``KernelConfig.prefill_dtype``, chosen once at
load and logged; ``GPTQ_PREFILL_DTYPE`` pins it). The weights are laid
out once at load with the same group sorting and padding as
``cpu-int4pack-bf16`` (act-order, ragged groups, partial groups of a
row-parallel shard), then packed per output row in 64-feature chunks of
16-bit words whose four nibbles hold features j, 16+j, 32+j, 48+j (so masks
and shifts unpack them without shuffles).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from text_generation_server.kernels import cpu_ops_status
from text_generation_server.kernels.config import DENSE_FROM_ROWS, KernelConfig
from text_generation_server.layers.quant.base import NativeLinear
from text_generation_server.layers.quant.gptq_kernels.base import GPTQKernel, GPTQWeights
from text_generation_server.layers.quant.gptq_kernels.cpu_int4 import (
    SortedLayout,
    _common_unsupported,
)

GROUP_SIZES = (256, 128, 64, 32)


def pack_rows(codes: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` codes 0..15 -> int16 words ``[N, K / 4]``: per 64 features, word j holds
    features j, 16 + j, 32 + j and 48 + j in its four nibbles, lowest first."""
    n, k = codes.shape
    chunks = codes.to(torch.int32).view(n, k // 64, 4, 16)
    words = chunks[:, :, 0] | (chunks[:, :, 1] << 4) | (chunks[:, :, 2] << 8) | (chunks[:, :, 3] << 12)
    # int16 holds the 16 bits as they are (values above 32767 wrap to negative).
    return words.to(torch.int16).reshape(n, k // 4).contiguous()


def pack_meta(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """fp16 scales and zero points ``[G, N]`` -> int16 ``[N / 4, G, 6]``: per four-row tile and
    group, the four scales' bits, then the four zero points as bytes."""
    g, n = scales.shape
    s = scales.t().contiguous().view(torch.int16).view(n // 4, 4, g).transpose(1, 2)  # [N/4, G, 4]
    z = zeros.t().to(torch.int32).contiguous().view(n // 4, 4, g).transpose(1, 2)  # [N/4, G, 4]
    z_words = (z[..., 0::2] | (z[..., 1::2] << 8)).to(torch.int16)  # little-endian byte pairs
    return torch.cat([s, z_words], -1).contiguous()


class CpuInt4NativeKernel(GPTQKernel):
    name = "cpu-int4-avx2"

    @classmethod
    def unsupported(cls, weights: GPTQWeights, device: torch.device) -> str | None:
        why = _common_unsupported(weights, device, GROUP_SIZES)
        if why is not None:
            return why
        if weights.out_features % 4:
            return f"multiplies 4 output rows at a time, and {weights.out_features} is not a multiple of 4"
        status = cpu_ops_status()
        if not status.available:
            return f"the native CPU kernels are unavailable ({status.reason})"
        return None

    def __init__(self, weights: GPTQWeights) -> None:
        # The float product's dtype for calls of DENSE_FROM_ROWS+ rows: exact float32 unless
        # the shard's switches choose bfloat16 (from_config).
        self.prefill_dtype = torch.float32
        status = cpu_ops_status()
        if not status.available:
            raise RuntimeError(f"the native CPU kernels are unavailable ({status.reason})")
        layout = SortedLayout.build(weights, GROUP_SIZES)
        layout.pad_to(64)  # the kernel reads whole 64-feature chunks
        self.layout = layout
        self.group_size = layout.group_size
        self.in_features, self.out_features = layout.in_features, layout.out_features
        self.padded_in, self.pad = layout.padded_in, layout.pad
        self.qweight = pack_rows(layout.codes)
        # Per (kernel group, row): the checkpoint's fp16 scale and its zero point.
        zeros = layout.zeros[layout.groups]
        if int(zeros.min()) < 0 or int(zeros.max()) > 255:
            raise ValueError("zero points outside 0..255")
        self.meta = pack_meta(weights.scales.to(torch.float16)[layout.groups], zeros)
        self.source = layout.source
        layout.codes = layout.zeros = layout.scales = torch.empty(0)  # the packed copy is kept

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x32 = self.layout.kernel_input(x.to(torch.float32)).contiguous()
        ops = torch.ops.tgs_cpu
        if x32.shape[0] >= DENSE_FROM_ROWS:
            if self.prefill_dtype == torch.bfloat16:
                w = ops.int4_dequantize_bf16(self.qweight, self.meta, self.group_size)
                y = F.linear(x32.to(torch.bfloat16), w).to(torch.float32)
            else:
                y = F.linear(x32, ops.int4_dequantize(self.qweight, self.meta, self.group_size))
        else:
            y = ops.int4_linear(x32, self.qweight, self.meta, self.group_size)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    @classmethod
    def from_config(cls, weights: GPTQWeights, kernels: KernelConfig) -> CpuInt4NativeKernel:
        kernel = cls(weights)
        kernel.prefill_dtype = kernels.prefill_dtype()[0]
        return kernel

    def native_linear(self) -> NativeLinear | None:
        """These weights for the native decoder layers, with the input's reordering and padding."""
        return NativeLinear.int4(
            self.qweight, self.meta, self.group_size, self.in_features, self.prefill_dtype, source=self.source
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        held = {"qweight": self.qweight, "meta": self.meta}
        if self.source is not None:
            held["source"] = self.source
        return held
