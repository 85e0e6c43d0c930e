"""4-bit NF4 / FP4 weights (bitsandbytes), blockwise absmax scales, float compute.

The weight is quantized in blocks of ``blocksize`` consecutive values of the
row-major ``[out, in]`` slice, one float32 absmax per block, without nested
(double) quantization of the scales, as transformers' default
``BitsAndBytesConfig`` does. Compute runs in the serving dtype: on CUDA with
bitsandbytes' 4-bit GEMM; on CPU in bfloat16 with bitsandbytes' own AVX-512
BF16 kernel when the CPU has those instructions (the weight is repacked once
into that kernel's layout, as bitsandbytes' ``Linear4bit`` does at inference);
otherwise by bitsandbytes' dequantize into a temporary float weight followed
by a torch matmul (bitsandbytes has no CPU 4-bit matmul for other dtypes).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from text_generation_server.layers.quant.bnb_load import QuantizeOnLoadMethod
from text_generation_server.layers.quant.bnb_runtime import bnb, cpu_4bit_kernel_available
from text_generation_server.layers.quant.unquantized import dtype_name

# bitsandbytes' and transformers' default: 64 values share one scale.
DEFAULT_BLOCKSIZE = 64


class BitsAndBytes4bitMethod(QuantizeOnLoadMethod):
    """``weight`` uint8 (two 4-bit codes per byte) and ``weight_absmax`` float32 per block."""

    def __init__(self, quant_type: str, blocksize: int = DEFAULT_BLOCKSIZE) -> None:
        super().__init__()
        self.quant_type = quant_type
        self.blocksize = blocksize
        self.state: Any = None  # bitsandbytes QuantState: shape, blocksize, code, dtype
        self.cpu_kernel = False  # weight repacked for bitsandbytes' AVX-512 BF16 kernel

    def quantize(self, layer: torch.nn.Module, weight: torch.Tensor) -> None:
        packed, state = bnb().functional.quantize_4bit(
            weight.contiguous(),
            blocksize=self.blocksize,
            compress_statistics=False,
            quant_type=self.quant_type,
            quant_storage=torch.uint8,
        )
        out_features, in_features = weight.shape
        del weight
        if self._use_cpu_kernel(out_features, in_features, state.dtype, packed.device):
            # [N, K/2] bytes and bf16 absmax [K/blocksize, N], the kernel's own layout.
            packed, state = bnb().functional._convert_weight_packed_for_cpu(packed, state)
            self.cpu_kernel = True
        self.register(layer, "weight", packed)
        self.register(layer, "weight_absmax", state.absmax)
        state.absmax = layer.weight_absmax.data
        self.state = state

    def _use_cpu_kernel(
        self, out_features: int, in_features: int, dtype: torch.dtype, device: torch.device
    ) -> bool:
        """bitsandbytes' CPU 4-bit kernel: bfloat16 only, AVX-512 BF16, its tile shapes."""
        functional = bnb().functional
        return (
            device.type == "cpu"
            and dtype == torch.bfloat16
            and cpu_4bit_kernel_available()
            and hasattr(functional, "_convert_weight_packed_for_cpu")
            and out_features % 32 == 0
            and in_features % self.blocksize == 0
            and in_features % 2 == 0
        )

    def dequantize(self, layer: torch.nn.Module) -> torch.Tensor:
        """This rank's weight ``[out, in]`` in the serving dtype (standard layout only)."""
        return bnb().functional.dequantize_4bit(layer.weight.data, self.state)

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        if x.device.type == "cuda":
            return bnb().matmul_4bit(x, layer.weight.t(), quant_state=self.state, bias=bias)
        if self.cpu_kernel:
            out = bnb().functional.gemv_4bit(x, layer.weight, state=self.state)
            return out if bias is None else out + bias
        return F.linear(x, self.dequantize(layer), bias)

    def kernel_name(self, layer: torch.nn.Module) -> str:
        device = layer.weight.device.type
        if device == "cuda":
            how = "gemm"
        elif self.cpu_kernel:
            how = "avx512-bf16-gemm"
        else:
            how = "dequantize+torch-matmul"
        return f"bnb-{self.quant_type}-b{self.blocksize}-{device}[{how}, {dtype_name(self.dtype)}]"
