"""Dense weights in the serving dtype, multiplied with ``F.linear``.

On the CPU, 16-bit weights whose products ATen would compute slowly (float16
everywhere; bfloat16 where the CPU has no bf16 dot products) go through the
native kernel ``tgs_cpu.dense16_linear`` instead: the weights widened in
registers, the activations and sums in float32.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from text_generation_server.kernels import cpu_ops
from text_generation_server.kernels.config import KernelConfig
from text_generation_server.layers.quant.base import (
    LinearSpec,
    NativeLinear,
    QuantConfig,
    QuantMethod,
    linear_param,
)
from text_generation_server.utils.cpu import host_has_bf16_instructions

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
        w = layer.weight
        if w.device.type == "cpu" and _native_dense16(w.dtype):
            ops = cpu_ops()
            if ops is not None:
                y = ops.dense16_linear(x.reshape(-1, x.shape[-1]).float().contiguous(), w)
                if bias is not None:
                    y.add_(bias)
                return y.to(x.dtype).view(*x.shape[:-1], w.shape[0])
        return F.linear(x, w, bias)

    def kernel_name(self, layer: torch.nn.Module) -> str:
        return f"dense-{dtype_name(layer.weight.dtype)}"

    def native_linear(self, layer: torch.nn.Module) -> NativeLinear | None:
        w = layer.weight
        if w.dtype not in _DTYPE_NAMES or w.device.type != "cpu":
            return None
        return NativeLinear.dense(w.data)


def _native_dense16(dtype: torch.dtype) -> bool:
    """Whether a CPU product with ``dtype`` weights goes through ``tgs_cpu.dense16_linear``."""
    return dtype == torch.float16 or (dtype == torch.bfloat16 and not host_has_bf16_instructions())


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
