"""``--quantize bitsandbytes | bitsandbytes-nf4 | bitsandbytes-fp4``: quantize at load.

These take an ordinary float checkpoint and quantize each linear layer of
the decoder (not the embedding or LM head) as its slice is read on each rank;
no offline step and no quantized checkpoint. ``bitsandbytes`` is LLM.int8
(int8 weights, outliers at ``|x| >= 6.0`` in float); the two 4-bit variants
use the NF4 or FP4 code in blocks of 64 and compute in the serving dtype.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from text_generation_server.kernels.config import KernelConfig
from text_generation_server.layers.quant.base import QuantConfig, QuantMethod
from text_generation_server.layers.quant.bnb_4bit import DEFAULT_BLOCKSIZE, BitsAndBytes4bitMethod
from text_generation_server.layers.quant.bnb_int8 import DEFAULT_THRESHOLD, BitsAndBytesInt8Method
from text_generation_server.layers.quant.bnb_runtime import check_device, log_backend


class _BitsAndBytesConfig(QuantConfig):
    # Quantize-on-load: no checkpoint is ever quantized with these.
    checkpoint_methods: ClassVar[tuple[str, ...]] = ()
    quantizes_at_load = True
    int8: ClassVar[bool] = False

    def check_supported(self, dtype: torch.dtype, device: torch.device) -> None:
        check_device(self.name, dtype, device, int8=self.int8)
        log_backend(device)


class BitsAndBytes8bitConfig(_BitsAndBytesConfig):
    """LLM.int8 with the outlier threshold TGI uses."""

    name = "bitsandbytes"
    int8 = True

    def __init__(self, threshold: float = DEFAULT_THRESHOLD) -> None:
        self.threshold = threshold

    @classmethod
    def from_checkpoint(
        cls, checkpoint_quant_config: dict[str, Any] | None, kernels: KernelConfig | None = None
    ) -> BitsAndBytes8bitConfig:
        return cls()

    def get_method(self, prefix: str) -> QuantMethod:
        return BitsAndBytesInt8Method(self.threshold)


class _BitsAndBytes4bitConfig(_BitsAndBytesConfig):
    quant_type: ClassVar[str]

    def __init__(self, blocksize: int = DEFAULT_BLOCKSIZE) -> None:
        self.blocksize = blocksize

    @classmethod
    def from_checkpoint(
        cls, checkpoint_quant_config: dict[str, Any] | None, kernels: KernelConfig | None = None
    ) -> _BitsAndBytes4bitConfig:
        return cls()

    def get_method(self, prefix: str) -> QuantMethod:
        return BitsAndBytes4bitMethod(self.quant_type, self.blocksize)


class BitsAndBytesNF4Config(_BitsAndBytes4bitConfig):
    """4-bit NormalFloat: code points at the quantiles of a normal distribution."""

    name = "bitsandbytes-nf4"
    quant_type = "nf4"


class BitsAndBytesFP4Config(_BitsAndBytes4bitConfig):
    """4-bit float (1 sign, 2 exponent, 1 mantissa bit)."""

    name = "bitsandbytes-fp4"
    quant_type = "fp4"


BITSANDBYTES_CONFIGS: tuple[type[QuantConfig], ...] = (
    BitsAndBytes8bitConfig,
    BitsAndBytesNF4Config,
    BitsAndBytesFP4Config,
)
