"""Attention over a paged KV cache.

The engine owns the cache: per layer a pair of tensors
``[num_blocks, block_size, num_kv_heads, head_dim]``. Each forward first
writes the new tokens' keys and values at their slots, then every sequence's
queries attend causally to its whole context (earlier tokens from the cache
plus the new ones). A sequence's new tokens sit at positions
``[context_len - query_len, context_len)``.

The arithmetic lives behind :class:`AttentionBackend`, chosen once per model
by :func:`select_attention_backend`: SDPA over gathered keys anywhere, the
native paged decode kernel on CPUs that have it, the Triton paged decode
kernel on CUDA (``triton_attention.py``).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from loguru import logger

from text_generation_server.kernels import cpu_ops_status
from text_generation_server.layers.fused import native_ops


@dataclass
class AttentionMetadata:
    """Where one forward's tokens go in the KV cache and what each sequence sees."""

    slot_mapping: torch.Tensor  # [T] int64: block_id * block_size + offset of each new token
    block_tables: torch.Tensor  # [B, max_blocks] int64 block ids per sequence (padding = 0)
    context_lens: torch.Tensor  # [B] int64 tokens in KV per sequence after this forward
    query_lens: list[int]  # [B] new tokens per sequence, in flattened order
    _memo: dict[Any, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def memo(self, key: Any, build: Callable[[], Any]) -> Any:
        """Compute ``build()`` once per forward and share it between layers."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def context_lens_list(self) -> list[int]:
        return self.memo("context_lens_list", lambda: [int(c) for c in self.context_lens.tolist()])

    @property
    def is_decode(self) -> bool:
        """Every sequence adds exactly one token."""
        return self.memo("is_decode", lambda: all(q == 1 for q in self.query_lens))

    @property
    def is_prefill(self) -> bool:
        """No sequence has context from an earlier forward."""
        return all(q == c for q, c in zip(self.query_lens, self.context_lens_list, strict=True))

    @property
    def max_context_len(self) -> int:
        return max(self.context_lens_list, default=0)

    @property
    def query_start_loc(self) -> list[int]:
        """Offsets of each sequence's first new token in the flattened batch (``B + 1`` entries)."""

        def build() -> list[int]:
            starts = [0]
            for q in self.query_lens:
                starts.append(starts[-1] + q)
            return starts

        return self.memo("query_start_loc", build)


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store the new tokens' ``k``/``v`` ``[T, kv_heads, head_dim]`` at their slots."""
    kv_heads, head_dim = k_cache.shape[-2:]
    k_cache.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def _context_slots(block_tables: torch.Tensor, block_size: int, length: int) -> torch.Tensor:
    """``[B, length]`` cache slots of each sequence's first ``length`` tokens."""
    blocks = -(-length // block_size)
    table = block_tables[:, :blocks]
    offsets = torch.arange(block_size, device=table.device)
    slots = table.unsqueeze(-1) * block_size + offsets
    return slots.reshape(table.shape[0], blocks * block_size)[:, :length]


def _gather(cache: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[len(slots), kv_heads, head_dim]`` cache rows at ``slots`` (flat), as ``dtype``.
    index_select: a plain row gather, several times cheaper than advanced indexing."""
    return cache.view(-1, *cache.shape[2:]).index_select(0, slots).to(dtype)


def _capped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None,
    causal: bool,
    softcap: float,
) -> torch.Tensor:
    """Attention with scores capped to ``softcap * tanh(score / softcap)`` (Gemma 2), on SDPA's
    ``[B, heads, L, D]`` layouts and masks; grouped KV heads repeated for their queries."""
    if k.shape[1] != q.shape[1]:
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    scores = torch.tanh(scores / softcap) * softcap
    if causal:
        n, m = scores.shape[-2:]
        mask = torch.ones(n, m, dtype=torch.bool, device=q.device).tril(m - n)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)


class AttentionBackend(ABC):
    """Writes new keys/values to the paged cache and computes attention."""

    name: str

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        attn: AttentionMetadata,
        scale: float,
        window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        """``q [T, heads, D]``, new ``k``/``v`` ``[T, kv_heads, D]`` -> ``[T, heads, D]``.

        ``window``: a sliding window; each query sees only the keys of the last ``window``
        positions up to its own (``key > query - window``, as transformers masks it).
        ``softcap``: scores are capped to ``softcap * tanh(score / softcap)`` before the softmax."""


class TorchSDPABackend(AttentionBackend):
    """``F.scaled_dot_product_attention`` on keys/values gathered from the cache.

    Decode steps are one batched call over all sequences; sequences with
    several new tokens (prefill, chunks with earlier context) are handled one
    by one, and a fresh prefill attends to its new keys directly without
    reading the cache back.
    """

    name = "torch-sdpa over gathered paged KV"

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        attn: AttentionMetadata,
        scale: float,
        window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        write_kv(k, v, k_cache, v_cache, attn.slot_mapping)
        if attn.is_decode:
            return self._decode(q, k_cache, v_cache, attn, scale, rows=None, window=window, softcap=softcap)
        out = torch.empty_like(q)
        starts = attn.query_start_loc
        contexts = attn.context_lens_list
        single = [b for b, n in enumerate(attn.query_lens) if n == 1]
        if single:
            rows = attn.memo("single_rows", lambda: torch.tensor(single, device=q.device))
            tokens = attn.memo(
                "single_tokens", lambda: torch.tensor([starts[b] for b in single], device=q.device)
            )
            out[tokens] = self._decode(q[tokens], k_cache, v_cache, attn, scale, rows=rows, window=window,
                                       softcap=softcap)
        for b, n in enumerate(attn.query_lens):
            if n == 1:
                continue
            s, e = starts[b], starts[b + 1]
            ctx = contexts[b]
            if ctx == n and (window is None or n <= window):
                out[s:e] = self._causal(q[s:e], k[s:e], v[s:e], scale, softcap)
            else:
                if window is None and not softcap and q.device.type == "cpu" and ctx > n:
                    out[s:e] = self._context_then_causal(q[s:e], k[s:e], v[s:e], k_cache, v_cache, attn, b, ctx,
                                                         scale)
                else:
                    out[s:e] = self._with_context(q[s:e], k_cache, v_cache, attn, b, ctx, scale, window, softcap)
        return out

    @staticmethod
    def _sdpa(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        softcap: float | None = None,
    ) -> torch.Tensor:
        """SDPA on ``[B, heads, L, D]`` layouts; grouped KV heads are broadcast by SDPA.
        With ``softcap`` (which SDPA cannot do) the same attention written out."""
        if softcap:
            return _capped_attention(q, k, v, scale, mask, causal, softcap)
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=causal,
            scale=scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )

    def _causal(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, softcap: float | None = None
    ) -> torch.Tensor:
        out = self._sdpa(
            q.transpose(0, 1).unsqueeze(0),
            k.transpose(0, 1).unsqueeze(0),
            v.transpose(0, 1).unsqueeze(0),
            scale,
            causal=True,
            softcap=softcap,
        )
        return out.squeeze(0).transpose(0, 1)

    def _with_context(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        attn: AttentionMetadata,
        b: int,
        ctx: int,
        scale: float,
        window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        n = q.shape[0]
        block_size = k_cache.shape[1]

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            slots = _context_slots(attn.block_tables[b : b + 1], block_size, ctx)[0]
            # Query i sits at position ctx - n + i and sees keys up to that position
            # (and, with a window, after position - window).
            key_pos = torch.arange(ctx, device=q.device)
            query_pos = torch.arange(n, device=q.device) + (ctx - n)
            mask = key_pos[None, :] <= query_pos[:, None]
            if window is not None:
                mask &= key_pos[None, :] > query_pos[:, None] - window
            return slots, mask

        slots, mask = attn.memo(("context", b, block_size, window), build)
        keys, values = _gather(k_cache, slots, q.dtype), _gather(v_cache, slots, q.dtype)
        out = self._sdpa(
            q.transpose(0, 1).unsqueeze(0),
            keys.transpose(0, 1).unsqueeze(0),
            values.transpose(0, 1).unsqueeze(0),
            scale,
            mask=mask,
            softcap=softcap,
        )
        return out.squeeze(0).transpose(0, 1)

    def _context_then_causal(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        attn: AttentionMetadata,
        b: int,
        ctx: int,
        scale: float,
    ) -> torch.Tensor:
        """A chunk of ``n`` new tokens after ``ctx - n`` cached ones, without a mask: every query sees
        all the earlier tokens (one unmasked pass, each KV head's query heads stacked as rows) and
        the chunk's own keys causally (a second pass), the two merged by their log-sum-exps."""
        n, heads, head_dim = q.shape
        block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
        group = heads // kv_heads
        slots = attn.memo(("context-before", b, block_size),
                          lambda: _context_slots(attn.block_tables[b : b + 1], block_size, ctx - n)[0])
        keys = _gather(k_cache, slots, q.dtype).transpose(0, 1).unsqueeze(0)
        values = _gather(v_cache, slots, q.dtype).transpose(0, 1).unsqueeze(0)
        # [n, heads, D] -> [1, kv_heads, group * n, D]: rows of one KV head's query heads, token-major.
        grouped = q.view(n, kv_heads, group, head_dim).permute(1, 2, 0, 3).reshape(1, kv_heads, group * n, head_dim)
        before, lse_before = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            grouped, keys, values, 0.0, False, scale=scale)
        before = before.view(kv_heads, group, n, head_dim).permute(2, 0, 1, 3).reshape(n, heads, head_dim)
        lse_before = lse_before.view(kv_heads, group, n).permute(2, 0, 1).reshape(n, heads)
        own_k, own_v = k.to(q.dtype), v.to(q.dtype)
        if group > 1:
            own_k, own_v = own_k.repeat_interleave(group, dim=1), own_v.repeat_interleave(group, dim=1)
        own, lse_own = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.transpose(0, 1).unsqueeze(0), own_k.transpose(0, 1).unsqueeze(0), own_v.transpose(0, 1).unsqueeze(0),
            0.0, True, scale=scale)
        own, lse_own = own.squeeze(0).transpose(0, 1), lse_own.squeeze(0).transpose(0, 1)
        top = torch.maximum(lse_before, lse_own)
        w_before, w_own = torch.exp(lse_before - top), torch.exp(lse_own - top)
        total = (w_before + w_own).unsqueeze(-1)
        return ((before.float() * w_before.unsqueeze(-1) + own.float() * w_own.unsqueeze(-1)) / total).to(q.dtype)

    def _decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        attn: AttentionMetadata,
        scale: float,
        rows: torch.Tensor | None,
        window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        """One new token per sequence (``rows`` of the batch, or all): ``q [B, heads, D]``."""
        block_size, kv_heads, head_dim = k_cache.shape[1:]

        def build() -> tuple[torch.Tensor, torch.Tensor | None]:
            tables = attn.block_tables if rows is None else attn.block_tables[rows]
            lens = attn.context_lens if rows is None else attn.context_lens[rows]
            longest = int(lens.max())
            slots = _context_slots(tables, block_size, longest)
            if bool((lens == longest).all()) and (window is None or longest <= window):
                return slots, None
            pos = torch.arange(longest, device=lens.device)[None, :]
            valid = pos < lens[:, None]
            if window is not None:
                valid &= pos >= lens[:, None] - window  # the query sits at lens - 1
            return slots, valid[:, None, None, :]

        slots, mask = attn.memo(("decode", rows is None, block_size, window), build)
        batch, length = slots.shape
        flat = slots.reshape(-1)
        keys = _gather(k_cache, flat, q.dtype).view(batch, length, kv_heads, head_dim)
        values = _gather(v_cache, flat, q.dtype).view(batch, length, kv_heads, head_dim)
        out = self._sdpa(
            q.unsqueeze(2),
            keys.transpose(1, 2),
            values.transpose(1, 2),
            scale,
            mask=mask,
            softcap=softcap,
        )
        return out.squeeze(2)


# Cache element types the native kernels read (keys and values are computed in float32 either way).
NATIVE_CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class CpuPagedDecodeBackend(TorchSDPABackend):
    """Decode steps in one native operator per layer, reading keys/values in place.

    When every sequence adds one token, the tensors are float32 and the cache float32, bfloat16 or float16, the new
    keys/values are stored with ``tgs_cpu.write_kv_`` and each sequence's query
    attends to its context straight from its cache blocks with
    ``tgs_cpu.paged_attention_decode`` (no gathered copy of the context).
    Prefills and anything else take the SDPA path.
    """

    name = "native paged decode (CPU), torch-sdpa for prefill"

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        attn: AttentionMetadata,
        scale: float,
        window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        ops = native_ops(q, k, v) if attn.is_decode and k_cache.dtype in NATIVE_CACHE_DTYPES else None
        if ops is None or k_cache.dtype != v_cache.dtype or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
            return super().forward(q, k, v, k_cache, v_cache, attn, scale, window, softcap)
        ops.write_kv_(k, v, k_cache, v_cache, attn.slot_mapping)
        return ops.paged_attention_decode(
            q, k_cache, v_cache, attn.block_tables, attn.context_lens, scale, window or 0, softcap or 0.0
        )


class TritonPagedDecodeBackend(TorchSDPABackend):
    """CUDA: every step in one Triton kernel launch per layer (``triton_attention.py``), keys and
    values read in place from the cache blocks: the decode kernel when every sequence adds one
    token, the varlen kernel for prefills, chunks after earlier context and mixed steps."""

    name = "Triton paged attention (CUDA): decode and varlen prefill kernels"

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        attn: AttentionMetadata,
        scale: float,
        window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
            return super().forward(q, k, v, k_cache, v_cache, attn, scale, window, softcap)
        from text_generation_server.layers.triton_attention import (
            paged_attention_decode,
            paged_attention_varlen,
        )

        write_kv(k, v, k_cache, v_cache, attn.slot_mapping)
        if attn.is_decode:
            return paged_attention_decode(q, k_cache, v_cache, attn.block_tables, attn.context_lens, scale, window,
                                          softcap)
        return paged_attention_varlen(q, k_cache, v_cache, attn.block_tables, attn.context_lens, attn.query_lens,
                                      scale, window, softcap)


def custom_kernels_disabled() -> bool:
    """``DISABLE_CUSTOM_KERNELS`` (TGI's launcher flag, passed to the shards): plain torch only."""
    return os.environ.get("DISABLE_CUSTOM_KERNELS", "").strip().lower() in ("1", "true", "yes", "on")


def select_attention_backend(device: torch.device) -> AttentionBackend:
    """The attention implementation for ``device``; called once per model and logged."""
    backend: AttentionBackend = TorchSDPABackend()
    if device.type == "cpu":
        status = cpu_ops_status()
        if status.available:
            backend = CpuPagedDecodeBackend()
        else:
            logger.info(f"Native CPU kernels not used: {status.reason}")
    if device.type == "cuda":
        from text_generation_server.layers.triton_attention import triton_unavailable

        why = "DISABLE_CUSTOM_KERNELS is set" if custom_kernels_disabled() else triton_unavailable(device)
        if why is None:
            backend = TritonPagedDecodeBackend()
        else:
            logger.info(f"Triton paged decode attention not used: {why}")
    logger.info(f"Attention backend: {backend.name} on {device}")
    return backend


class PagedAttention(torch.nn.Module):
    """Attention for one layer's local heads over its slice of the paged KV cache."""

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        scale: float,
        backend: AttentionBackend,
        sliding_window: int | None = None,
        softcap: float | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.backend = backend
        self.sliding_window = sliding_window
        self.softcap = softcap

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        attn: AttentionMetadata,
    ) -> torch.Tensor:
        """``q [T, heads, D]``, ``k``/``v`` ``[T, kv_heads, D]`` -> ``[T, heads * D]``."""
        k_cache, v_cache = kv_cache
        out = self.backend.forward(q, k, v, k_cache, v_cache, attn, self.scale, self.sliding_window, self.softcap)
        return out.reshape(out.shape[0], self.num_heads * self.head_dim)

    def extra_repr(self) -> str:
        window = f", sliding_window={self.sliding_window}" if self.sliding_window else ""
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}{window}, "
                f"backend={self.backend.name}")
