"""4-bit NF4 / FP4 weights (bitsandbytes), blockwise absmax scales, float compute.

The weight is quantized in blocks of ``blocksize`` consecutive values of the
row-major ``[out, in]`` slice, one float32 absmax per block, without nested
(double) quantization of the scales, as transformers' default
``BitsAndBytesConfig`` does. Compute runs in the serving dtype: on CUDA with
bitsandbytes' 4-bit GEMM, on CPU by bitsandbytes' dequantize into a temporary
float weight followed by a torch matmul (bitsandbytes has no general CPU
4-bit matmul for every dtype).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from text_generation_server.layers.quant.bnb_load import QuantizeOnLoadMethod
from text_generation_server.layers.quant.bnb_runtime import bnb
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

    def quantize(self, layer: torch.nn.Module, weight: torch.Tensor) -> None:
        packed, state = bnb().functional.quantize_4bit(
            weight.contiguous(),
            blocksize=self.blocksize,
            compress_statistics=False,
            quant_type=self.quant_type,
            quant_storage=torch.uint8,
        )
        del weight
        self.register(layer, "weight", packed)
        self.register(layer, "weight_absmax", state.absmax)
        state.absmax = layer.weight_absmax.data
        self.state = state

    def dequantize(self, layer: torch.nn.Module) -> torch.Tensor:
        """This rank's weight ``[out, in]`` in the serving dtype."""
        return bnb().functional.dequantize_4bit(layer.weight.data, self.state)

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        if x.device.type == "cuda":
            return bnb().matmul_4bit(x, layer.weight.t(), quant_state=self.state, bias=bias)
        return F.linear(x, self.dequantize(layer), bias)

    def kernel_name(self, layer: torch.nn.Module) -> str:
        device = layer.weight.device.type
        how = "gemm" if device == "cuda" else "dequantize+torch-matmul"
        return f"bnb-{self.quant_type}-b{self.blocksize}-{device}[{how}, {dtype_name(self.dtype)}]"
