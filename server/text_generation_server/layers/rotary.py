"""Rotary position embedding (Llama's rotate-half layout).

Reads the base and scaling from the model config in either spelling
transformers has used: ``rope_parameters`` (5.x) or ``rope_theta`` plus
``rope_scaling`` (4.x). Supported scaling types: default, linear, llama3.
cos/sin are computed per forward from the positions (cheap next to a matmul),
so there is no table to outgrow.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from text_generation_server.layers.fused import rotate_half_

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_parameters(config: Any) -> dict[str, Any]:
    """The config's RoPE settings as one dict with ``rope_type`` and ``rope_theta``."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None)
    if isinstance(scaling, dict):
        for key, value in scaling.items():
            params.setdefault(key, value)
    params.setdefault("rope_type", params.get("type") or "default")
    if params.get("rope_theta") is None:
        params["rope_theta"] = getattr(config, "rope_theta", None) or 10000.0
    return params


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict[str, Any], config: Any) -> torch.Tensor:
    try:
        factor = float(params["factor"])
        low_freq_factor = float(params["low_freq_factor"])
        high_freq_factor = float(params["high_freq_factor"])
    except KeyError as e:
        raise ValueError(
            f"rope type 'llama3' needs '{e.args[0]}' in the config's rope settings"
        ) from e
    old_context_len = (
        params.get("original_max_position_embeddings") or config.max_position_embeddings
    )
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_refusal(config: Any) -> str | None:
    """What in the config's RoPE settings is not built, or ``None``."""
    params = rope_parameters(config)
    rope_type = params["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        return f"rope type '{rope_type}' is not built (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
    partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
    if partial not in (None, 1, 1.0):
        return f"partial_rotary_factor={partial} (rotary over part of each head) is not built (only 1.0)"
    return None


def inverse_frequencies(config: Any, head_dim: int, device: torch.device) -> torch.Tensor:
    """``[head_dim // 2]`` float32 inverse frequencies, scaled as the config asks."""
    why = rope_refusal(config)
    if why is not None:
        raise ValueError(f"the model config's {why}")
    params = rope_parameters(config)
    rope_type = params["rope_type"]
    base = float(params["rope_theta"])
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float)
    inv_freq = 1.0 / (base ** (exponents / head_dim))
    if rope_type == "linear":
        inv_freq = inv_freq / float(params["factor"])
    elif rope_type == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, params, config)
    return inv_freq


class RotaryEmbedding(torch.nn.Module):
    """Rotates query/key heads by their absolute positions."""

    def __init__(self, inv_freq: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    @classmethod
    def from_config(cls, config: Any, head_dim: int, device: torch.device) -> RotaryEmbedding:
        return cls(inverse_frequencies(config, head_dim, device))

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of shape ``[T, 1, head_dim]`` for ``positions [T]``, in ``dtype``."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype).unsqueeze(1), emb.sin().to(dtype).unsqueeze(1)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate ``x [T, heads, head_dim]`` with cos/sin from :meth:`cos_sin`.

        May rotate ``x`` in place (see :func:`~text_generation_server.layers.fused.rotate_half_`);
        use the returned tensor.
        """
        return rotate_half_(x, cos, sin)
