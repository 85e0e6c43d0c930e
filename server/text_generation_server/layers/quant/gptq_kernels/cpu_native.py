"""4-bit GPTQ on the CPU through the project's own AVX2 kernel (``tgs_cpu.int4_linear``).

Activations are quantized per kernel group to 16 bits and multiplied with
the 4-bit codes in integer arithmetic (``vpmaddwd``), one fp16 scale and one
zero point per (row, group) as the checkpoint stores them: within ~3e-5 of
the float product (torch's bf16 int4 matmul: ~3e-3) and about twice its
speed for the few rows of a decode step. From :data:`DENSE_FROM_ROWS` rows on
(prefill) the weights are unpacked to float32 for the call and multiplied by
a float matrix product instead. The weights are laid
out once at load with the same group sorting and padding as
``cpu-int4pack-bf16`` (act-order, ragged groups, partial groups of a
row-parallel shard), then packed per output row: 16 bytes per 32 input
features, low nibbles first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from text_generation_server.kernels import cpu_ops_status
from text_generation_server.layers.quant.gptq_kernels.base import GPTQKernel, GPTQWeights
from text_generation_server.layers.quant.gptq_kernels.cpu_int4 import (
    SortedLayout,
    _common_unsupported,
)

GROUP_SIZES = (256, 128, 64, 32)
# From this many rows on (prefill), unpacking the weights to float32 once per call and
# running a float matrix product beats the integer kernel (measured crossover: 64-128).
DENSE_FROM_ROWS = 96


def pack_rows(codes: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` codes 0..15 -> uint8 ``[N, K / 2]``: per 32 features, byte j = q[j] | q[16 + j] << 4."""
    n, k = codes.shape
    blocks = codes.to(torch.uint8).view(n, k // 32, 2, 16)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


class CpuInt4NativeKernel(GPTQKernel):
    name = "cpu-int4-avx2"

    @classmethod
    def unsupported(cls, weights: GPTQWeights, device: torch.device) -> str | None:
        why = _common_unsupported(weights, device, GROUP_SIZES)
        if why is not None:
            return why
        status = cpu_ops_status()
        if not status.available:
            return f"the native CPU kernels are unavailable ({status.reason})"
        return None

    def __init__(self, weights: GPTQWeights) -> None:
        status = cpu_ops_status()
        if not status.available:
            raise RuntimeError(f"the native CPU kernels are unavailable ({status.reason})")
        layout = SortedLayout.build(weights, GROUP_SIZES)
        self.layout = layout
        self.group_size = layout.group_size
        self.in_features, self.out_features = layout.in_features, layout.out_features
        self.padded_in, self.pad = layout.padded_in, layout.pad
        self.qweight = pack_rows(layout.codes)
        # Per (row, kernel group): the checkpoint's fp16 scale and its zero point.
        self.scales = weights.scales.to(torch.float16)[layout.groups].t().contiguous()
        zeros = layout.zeros[layout.groups].t()
        if int(zeros.min()) < 0 or int(zeros.max()) > 255:
            raise ValueError("zero points outside 0..255")
        self.zeros = zeros.to(torch.uint8).contiguous()
        self.source = layout.source
        layout.codes = layout.zeros = layout.scales = torch.empty(0)  # the packed copy is kept

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x32 = self.layout.kernel_input(x.to(torch.float32)).contiguous()
        ops = torch.ops.tgs_cpu
        if x32.shape[0] >= DENSE_FROM_ROWS:
            w = ops.int4_dequantize(self.qweight, self.scales, self.zeros, self.group_size)
            y = F.linear(x32, w)
        else:
            y = ops.int4_linear(x32, self.qweight, self.scales, self.zeros, self.group_size)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        held = {"qweight": self.qweight, "scales": self.scales, "zeros": self.zeros}
        if self.source is not None:
            held["source"] = self.source
        return held
