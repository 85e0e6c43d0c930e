"""RMSNorm as Llama-family models define it (statistics in float32), and LayerNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from text_generation_server.layers.fused import add_rms_norm_, rms_norm
from text_generation_server.layers.loading import replicated_weight_loader, set_weight_attrs


def _as(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``weight`` in ``x``'s dtype: a 16-bit model's final norm also takes the native layers'
    float32 output (a copy of one vector per call)."""
    return weight if weight.dtype == x.dtype else weight.to(x.dtype)


class RMSNorm(torch.nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``, replicated on every rank."""

    def __init__(
        self, hidden_size: int, eps: float, *, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.eps = eps
        weight = torch.empty(hidden_size, dtype=dtype, device=device)
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        set_weight_attrs(self.weight, weight_loader=replicated_weight_loader, shard_ids=(None,))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The norm of ``x``; with ``residual``, first ``residual += x`` (in place) and the norm of that."""
        w = _as(self.weight, x)
        if residual is None:
            return rms_norm(x, w, self.eps)
        return add_rms_norm_(x, residual, w, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class LayerNorm(torch.nn.Module):
    """``(x - mean) / sqrt(var + eps) * weight + bias`` (Falcon's), replicated on every rank; the
    same calling convention as :class:`RMSNorm`."""

    def __init__(
        self, hidden_size: int, eps: float, *, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.eps = eps
        for name in ("weight", "bias"):
            param = torch.nn.Parameter(torch.empty(hidden_size, dtype=dtype, device=device), requires_grad=False)
            set_weight_attrs(param, weight_loader=replicated_weight_loader, shard_ids=(None,))
            setattr(self, name, param)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The norm of ``x``; with ``residual``, first ``residual += x`` (in place) and the norm of that."""
        if residual is not None:
            residual.add_(x)
            x = residual
        return F.layer_norm(x, (x.shape[-1],), _as(self.weight, x), _as(self.bias, x), self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
