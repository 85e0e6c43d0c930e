"""The kernel switches: read from the environment in one place, validated, logged once.

Every switch is optional; unset means "choose by what this host and model can run".

=======================  ====================================  ==================================
variable                 values                                what it pins
=======================  ====================================  ==================================
``CPU_KERNELS``          auto, on, off                         the native CPU kernels (``on``: a
                                                               failure to build them is an error)
``CPU_KERNELS_ISA``      auto, avx2, avx512-vnni               the 4-bit matmul's instruction set
``GPTQ_KERNEL``          a name from ``gptq_kernels.KERNELS``  the GPTQ kernel tried first
``LM_HEAD_KERNEL``       dense, half, int8, int8-bf16          the LM head kernel (no fallback)
``GPTQ_PREFILL_DTYPE``   auto, float32, bfloat16               the dtype of 4-bit prefill products
=======================  ====================================  ==================================

A shard parses them once when it loads its model (:meth:`KernelConfig.from_env`)
and hands the result down: to the quantization config (GPTQ kernel, prefill
dtype), to the LM head and to the execution plan. A bad value is refused
there, naming the variable and what it accepts. The native library itself is
loaded once per process (``kernels.cpu_ops_status``), with the same parser.

:data:`DENSE_FROM_ROWS` is the one row count from which 4-bit products unpack
the weights for a float matrix product instead of the integer kernel; the
native decoder layers receive it with each linear (``csrc/decoder.cpp``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch

# From this many rows on (prefill), unpacking 4-bit weights once per call and running a float
# matrix product beats the integer kernel (measured crossover: 64-128 rows).
DENSE_FROM_ROWS = 96

CPU_KERNELS_MODES = ("auto", "on", "off")
CPU_KERNELS_ISAS = ("auto", "avx2", "avx512-vnni")
LM_HEAD_KERNEL_NAMES = ("dense", "half", "int8", "int8-bf16")
PREFILL_DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
}

# field -> environment variable
_ENV = {
    "cpu_kernels": "CPU_KERNELS",
    "cpu_kernels_isa": "CPU_KERNELS_ISA",
    "gptq_kernel": "GPTQ_KERNEL",
    "lm_head_kernel": "LM_HEAD_KERNEL",
    "gptq_prefill_dtype": "GPTQ_PREFILL_DTYPE",
}


class KernelConfigError(ValueError):
    """A kernel switch holds a value it does not accept; the message names both."""


def _gptq_kernel_names() -> tuple[str, ...]:
    from text_generation_server.layers.quant.gptq_kernels import kernel_names

    return tuple(kernel_names())


@dataclass(frozen=True)
class KernelConfig:
    """The validated kernel switches; the defaults choose everything automatically."""

    cpu_kernels: str = "auto"
    cpu_kernels_isa: str = "auto"
    gptq_kernel: str | None = None
    lm_head_kernel: str | None = None
    gptq_prefill_dtype: str = "auto"

    def __post_init__(self) -> None:
        allowed = {
            "cpu_kernels": CPU_KERNELS_MODES,
            "cpu_kernels_isa": CPU_KERNELS_ISAS,
            "lm_head_kernel": LM_HEAD_KERNEL_NAMES,
            "gptq_prefill_dtype": tuple(PREFILL_DTYPES),
        }
        for name, values in allowed.items():
            value = getattr(self, name)
            if value is not None and value not in values:
                raise KernelConfigError(
                    f"{_ENV[name]}={value!r}: expected one of {', '.join(values)}"
                )
        if self.gptq_kernel is not None and self.gptq_kernel not in _gptq_kernel_names():
            raise KernelConfigError(
                f"GPTQ_KERNEL={self.gptq_kernel} is not a GPTQ kernel; choose one of: "
                f"{', '.join(_gptq_kernel_names())}"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> KernelConfig:
        """The switches as the environment sets them (empty counts as unset)."""
        env = os.environ if environ is None else environ
        values: dict[str, str] = {}
        for name, var in _ENV.items():
            raw = env.get(var, "").strip()
            if raw:
                # Kernel names are lower case; GPTQ kernel names are matched as written.
                values[name] = raw if name == "gptq_kernel" else raw.lower()
        return cls(**values)

    @staticmethod
    def variable(field_name: str) -> str:
        """The environment variable behind a field, for messages."""
        return _ENV[field_name]

    def pinned(self) -> dict[str, str]:
        """The switches set away from their automatic choice, by variable name."""
        default = KernelConfig()
        return {
            _ENV[f.name]: str(getattr(self, f.name))
            for f in fields(self)
            if getattr(self, f.name) != getattr(default, f.name)
        }

    def describe(self) -> str:
        pinned = self.pinned()
        if not pinned:
            return "all automatic"
        return ", ".join(f"{k}={v}" for k, v in pinned.items())

    def prefill_dtype(self) -> tuple[torch.dtype, str]:
        """The dtype of 4-bit products of :data:`DENSE_FROM_ROWS`+ rows, and why.

        bfloat16 where the CPU multiplies it natively, else float32, unless
        ``GPTQ_PREFILL_DTYPE`` pins it.
        """
        from text_generation_server.utils.cpu import host_has_bf16_instructions

        pinned = PREFILL_DTYPES[self.gptq_prefill_dtype]
        if pinned is not None:
            return pinned, f"GPTQ_PREFILL_DTYPE={self.gptq_prefill_dtype}"
        if host_has_bf16_instructions():
            return torch.bfloat16, "this CPU has native bf16 dot products"
        return torch.float32, "this CPU has no native bf16 dot products"
