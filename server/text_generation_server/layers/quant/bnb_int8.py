"""LLM.int8 (bitsandbytes): int8 weights with per-row scales, outlier features in float.

Weights are quantized row-wise to int8 from float16, as bitsandbytes'
``Int8Params`` does. Each call quantizes the activations row-wise; input
features whose magnitude reaches ``threshold`` in any row are taken out and
multiplied in the activation dtype against the dequantized weight columns,
the rest in int8. These are the operations bitsandbytes' ``MatMul8bitLt``
runs in inference, called directly so nothing is built for autograd.
"""

from __future__ import annotations

import torch

from text_generation_server.layers.quant.bnb_load import QuantizeOnLoadMethod
from text_generation_server.layers.quant.bnb_runtime import backend, bnb
from text_generation_server.layers.quant.unquantized import dtype_name

# TGI's default outlier threshold (the LLM.int8 paper's).
DEFAULT_THRESHOLD = 6.0


class BitsAndBytesInt8Method(QuantizeOnLoadMethod):
    """``weight`` int8 ``[out, in]`` and ``weight_scale`` float32 ``[out]`` (row absmax)."""

    def __init__(self, threshold: float = DEFAULT_THRESHOLD) -> None:
        super().__init__()
        self.threshold = threshold

    def quantize(self, layer: torch.nn.Module, weight: torch.Tensor) -> None:
        functional = bnb().functional
        int8, row_absmax, _ = functional.int8_vectorwise_quant(weight.to(torch.float16))
        del weight
        self.register(layer, "weight", int8)
        self.register(layer, "weight_scale", row_absmax)

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        if x.shape[0] == 0:
            return x.new_empty(0, layer.weight.shape[0])
        functional = bnb().functional
        # The quantizer zeroes outliers in its input while it works, so it gets a copy.
        x16 = x.to(torch.float16, copy=True)
        x_int8, x_scale, outlier_cols = functional.int8_vectorwise_quant(
            x16, threshold=self.threshold
        )
        if bias is not None:
            bias = bias.to(x.dtype)
        out, _ = torch.ops.bitsandbytes.int8_mixed_scaled_mm(
            x, x_int8, layer.weight, x_scale, layer.weight_scale, outlier_cols, bias
        )
        return out

    def kernel_name(self, layer: torch.nn.Module) -> str:
        device = layer.weight.device.type
        return (
            f"bnb-llm.int8-{device}[{backend(device).int8_matmul}, "
            f"outliers >= {self.threshold:g} in {dtype_name(self.dtype)}]"
        )
