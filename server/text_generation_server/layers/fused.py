"""Elementwise steps of a decoder layer, each one pass where the native CPU kernels run.

Each function computes exactly what its torch formulation below it does;
when the tensors are float32 on a CPU with the native kernels loaded
(``text_generation_server.kernels``) it runs as one ``tgs_cpu`` operator
instead of several torch ops, which is most of what a decode step of a small
model costs besides its matrix products. Anything else (CUDA, bf16, no
kernels) takes the torch path, so callers never choose.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from text_generation_server.kernels import cpu_ops


def native_ops(*tensors: torch.Tensor):
    """``torch.ops.tgs_cpu`` when every tensor is float32 on the CPU and the kernels run, else None."""
    for t in tensors:
        if t.dtype != torch.float32 or t.device.type != "cpu":
            return None
    return cpu_ops()


def _torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.float()
    variance = x32.pow(2).mean(-1, keepdim=True)
    return weight * (x32 * torch.rsqrt(variance + eps)).to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last dim (statistics in float32)."""
    ops = native_ops(x, weight)
    if ops is not None and x.dim() == 2 and x.is_contiguous():
        return ops.rms_norm(x, weight, eps)
    return _torch_rms_norm(x, weight, eps)


def add_rms_norm_(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``residual += x`` in place, then :func:`rms_norm` of the new residual."""
    ops = native_ops(x, residual, weight)
    if ops is not None and x.dim() == 2 and x.is_contiguous() and residual.is_contiguous():
        return ops.add_rms_norm_(x, residual, weight, eps)
    residual.add_(x)
    return _torch_rms_norm(residual, weight, eps)


def rotate_half_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama's rotary embedding of ``x [T, heads, D]``: ``x * cos + cat(-x2, x1) * sin``.

    ``cos``/``sin`` are ``[T, 1, D]``. Rotates in place where the native kernel
    runs (``x`` may be a view into a fused q/k/v output); returns the result
    either way.
    """
    ops = native_ops(x, cos, sin)
    if ops is not None and x.dim() == 3 and x.stride(2) == 1 and x.stride(1) == x.shape[2]:
        t, _, d = x.shape
        ops.rotary_(x, cos.reshape(t, d), sin.reshape(t, d))
        return x
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def gelu_tanh_mul(gate_up: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """``gelu_tanh(gate) * up`` (GELU's tanh approximation, Gemma's ``gelu_pytorch_tanh``)."""
    ops = native_ops(gate_up)
    if ops is not None and gate_up.dim() == 2 and gate_up.is_contiguous() and sizes[0] == sizes[1]:
        return ops.gelu_tanh_mul(gate_up)
    gate, up = gate_up.split(sizes, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def silu_mul(gate_up: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up = [gate | up]`` along the last dim (``sizes`` of the two)."""
    ops = native_ops(gate_up)
    if ops is not None and gate_up.dim() == 2 and gate_up.is_contiguous() and sizes[0] == sizes[1]:
        return ops.silu_mul(gate_up)
    gate, up = gate_up.split(sizes, dim=-1)
    return F.silu(gate) * up
