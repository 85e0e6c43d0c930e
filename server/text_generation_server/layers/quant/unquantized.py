"""Dense weights in the serving dtype, multiplied with ``F.linear``."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from text_generation_server.kernels.config import KernelConfig
from text_generation_server.layers.quant.base import (
    LinearSpec,
    NativeLinear,
    QuantConfig,
    QuantMethod,
    linear_param,
)

_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def dtype_name(dtype: torch.dtype) -> str:
    """Short dtype name for logs (``fp32``, ``bf16``, ``fp16``)."""
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


class UnquantizedLinearMethod(QuantMethod):
    """``weight [out, in]`` in the serving dtype."""

    def create_weights(self, layer: torch.nn.Module, spec: LinearSpec) -> None:
        weight = torch.empty(
            spec.out_features, spec.in_features, dtype=spec.dtype, device=spec.device
        )
        layer.register_parameter("weight", linear_param(weight, output_dim=0, input_dim=1))

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return F.linear(x, layer.weight, bias)

    def kernel_name(self, layer: torch.nn.Module) -> str:
        return f"dense-{dtype_name(layer.weight.dtype)}"

    def native_linear(self, layer: torch.nn.Module) -> NativeLinear | None:
        w = layer.weight
        if w.dtype != torch.float32 or w.device.type != "cpu":
            return None
        return NativeLinear.dense(w.data)


class UnquantizedConfig(QuantConfig):
    """No quantization: every linear layer is dense."""

    name = "unquantized"

    @classmethod
    def from_checkpoint(
        cls, checkpoint_quant_config: dict[str, Any] | None, kernels: KernelConfig | None = None
    ) -> UnquantizedConfig:
        return cls()

    def get_method(self, prefix: str) -> QuantMethod:
        return UnquantizedLinearMethod()
