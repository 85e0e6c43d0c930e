"""LLM.int8 (bitsandbytes): int8 weights with per-row scales, outlier features in float.

Weights are quantized row-wise to int8 from float16, as bitsandbytes'
``Int8Params`` does. Each call quantizes the activations row-wise; input
features whose magnitude reaches ``threshold`` in any row are taken out and
multiplied in the activation dtype against the dequantized weight columns,
the rest in int8. These are the operations bitsandbytes' ``MatMul8bitLt``
runs in inference, called directly so nothing is built for autograd.

In a row-parallel layer each rank holds part of every row, of the weight
and of the activations. Quantizing each part by its own absmax would make
the result depend on the number of shards; instead the ranks agree on each
row's absmax (over the whole row, by an all-gather of one value per row:
once per weight at load, once per call for the activations), so N shards
compute exactly the int8 values one shard does, and their sum differs from
one shard's only by float summation order.
"""

from __future__ import annotations

import torch

from text_generation_server.layers.quant.base import LinearSpec
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
        self.shared_rows = False  # row-parallel: ranks share each row's absmax

    def create_weights(self, layer: torch.nn.Module, spec: LinearSpec) -> None:
        super().create_weights(layer, spec)
        self.shared_rows = spec.input_is_sharded

    def quantize(self, layer: torch.nn.Module, weight: torch.Tensor) -> None:
        w16 = weight.to(torch.float16)
        del weight
        if self.shared_rows:
            row_absmax = _whole_row_absmax(layer, w16.abs().amax(dim=1).float())
            int8 = _round_to_int8(w16, row_absmax)
        else:
            int8, row_absmax, _ = bnb().functional.int8_vectorwise_quant(w16)
        del w16
        self.register(layer, "weight", int8)
        self.register(layer, "weight_scale", row_absmax)

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        if x.shape[0] == 0:
            return x.new_empty(0, layer.weight.shape[0])
        # The quantizer zeroes outliers in its input while it works, so it gets a copy.
        x16 = x.to(torch.float16, copy=True)
        if self.shared_rows:
            x_int8, x_scale, outlier_cols = self._quantize_shared(layer, x16)
        else:
            x_int8, x_scale, outlier_cols = bnb().functional.int8_vectorwise_quant(
                x16, threshold=self.threshold
            )
        if bias is not None:
            bias = bias.to(x.dtype)
        out, _ = torch.ops.bitsandbytes.int8_mixed_scaled_mm(
            x, x_int8, layer.weight, x_scale, layer.weight_scale, outlier_cols, bias
        )
        return out

    def _quantize_shared(
        self, layer: torch.nn.Module, x16: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """bitsandbytes' ``int8_vectorwise_quant`` with each row's absmax taken over all ranks.

        Outlier features (``|x| >= threshold``) are found per column, so each
        rank finds exactly its own columns of the set one shard would find.
        """
        outlier_cols = None
        if self.threshold > 0.0:
            outliers = x16.abs() >= self.threshold
            outlier_cols = torch.argwhere(outliers.any(dim=0)).view(-1)
            x16[outliers] = 0
        row_absmax = _whole_row_absmax(layer, x16.abs().amax(dim=1).float())
        x_int8 = _round_to_int8(x16, row_absmax)
        if x16.shape[0] > 1 and outlier_cols is not None and outlier_cols.numel():
            x_int8[:, outlier_cols] = 0
        return x_int8, row_absmax, outlier_cols

    def kernel_name(self, layer: torch.nn.Module) -> str:
        device = layer.weight.device.type
        return (
            f"bnb-llm.int8-{device}[{backend(device).int8_matmul}, "
            f"outliers >= {self.threshold:g} in {dtype_name(self.dtype)}]"
        )


def _whole_row_absmax(layer: torch.nn.Module, local: torch.Tensor) -> torch.Tensor:
    """Max over ranks of each rank's per-row absmax ``[rows]`` (float32)."""
    dist = layer.dist
    gathered = dist.all_gather(local.unsqueeze(-1), dim=-1, sizes=[1] * dist.world_size)
    return gathered.amax(dim=-1)


def _round_to_int8(t16: torch.Tensor, row_absmax: torch.Tensor) -> torch.Tensor:
    # bitsandbytes' own rounding, operation for operation, so one shard and N agree.
    return torch.round(t16 * (127.0 / row_absmax.unsqueeze(-1))).to(torch.int8)
