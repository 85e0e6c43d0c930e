"""GPTQ kernels and the once-per-layer choice between them.

Preference order per device: CUDA -> Triton; CPU -> the native AVX2 kernel,
then torch's int4 packed matmul; the dequantize-then-matmul reference takes
whatever the fast kernels refuse, so a constraint never stops a model from
loading.
"""

from __future__ import annotations

import torch

from text_generation_server.kernels.config import KernelConfig
from text_generation_server.layers.quant.gptq_kernels.base import (
    ConcatKernel,
    GPTQKernel,
    GPTQWeights,
)
from text_generation_server.layers.quant.gptq_kernels.cpu_int4 import CpuInt4Kernel
from text_generation_server.layers.quant.gptq_kernels.cpu_native import CpuInt4NativeKernel
from text_generation_server.layers.quant.gptq_kernels.reference import ReferenceKernel
from text_generation_server.layers.quant.gptq_kernels.triton_kernel import TritonKernel

__all__ = [
    "KERNELS",
    "ConcatKernel",
    "GPTQKernel",
    "GPTQWeights",
    "build_kernel",
    "kernel_names",
]

KERNELS: dict[str, type[GPTQKernel]] = {
    k.name: k for k in (TritonKernel, CpuInt4NativeKernel, CpuInt4Kernel, ReferenceKernel)
}


def kernel_names() -> list[str]:
    """Names accepted as a kernel preference."""
    return list(KERNELS)


def _preferred(device: torch.device) -> list[type[GPTQKernel]]:
    if device.type == "cuda":
        return [TritonKernel, ReferenceKernel]
    return [CpuInt4NativeKernel, CpuInt4Kernel, ReferenceKernel]


def build_kernel(
    weights: GPTQWeights,
    device: torch.device,
    prefer: str | None = None,
    kernels: KernelConfig | None = None,
) -> tuple[GPTQKernel, list[str]]:
    """The first kernel that takes ``weights``, and why each one tried before it did not.

    ``prefer`` (a name from :func:`kernel_names`; by default ``kernels.gptq_kernel``, i.e.
    ``GPTQ_KERNEL``) is tried first; ``kernels`` carries the other switches (prefill dtype).
    """
    kernels = kernels or KernelConfig()
    prefer = prefer or kernels.gptq_kernel
    order = _preferred(device)
    if prefer is not None:
        if prefer not in KERNELS:
            raise ValueError(
                f"unknown GPTQ kernel '{prefer}'; choose one of: {', '.join(kernel_names())}"
            )
        order = [KERNELS[prefer], *(k for k in order if k is not KERNELS[prefer])]
    reasons = []
    for cls in order:
        why = cls.unsupported(weights, device)
        if why is None:
            try:
                return cls.from_config(weights, kernels), reasons
            except (RuntimeError, ValueError) as err:
                # A constraint the kernel did not declare: fall back rather than fail the load.
                why = f"refused the layer at load ({err})"
        reasons.append(f"{cls.name}: {why}")
    return ReferenceKernel(weights), reasons
