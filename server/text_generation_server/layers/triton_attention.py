"""Decode attention over the paged KV cache in one Triton kernel (CUDA).

One program per (sequence, query head) walks that sequence's cache blocks
through its block table, ``BLOCK_N`` keys at a time, with an online softmax:
keys and values are read in place, never gathered into a contiguous copy of
every context (which the SDPA path does per layer and step). Grouped KV heads
are shared by index (``head // (heads / kv_heads)``); a sliding window and
Gemma's score soft cap are honoured. Accumulation is float32 whatever the
cache dtype. On a CPU host the kernel runs under ``TRITON_INTERPRET=1``
(tests, small shapes).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a dependency; the import guard keeps the message clear
    triton = None
    tl = None


def triton_unavailable(device: torch.device) -> str | None:
    """Why the kernel cannot run on ``device`` (None when it can)."""
    import os

    if triton is None:
        return "triton is not installed"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"Triton kernels run on CUDA devices (this is {device.type})"
    return None


if triton is not None:

    @triton.jit
    def _paged_decode_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, tables_ptr, lens_ptr,
        scale, window, softcap,
        stride_qb, stride_qh,
        stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh,
        stride_ob, stride_oh,
        stride_tb,
        GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    ):  # fmt: skip
        seq = tl.program_id(0)
        head = tl.program_id(1)
        kv_head = head // GROUP
        length = tl.load(lens_ptr + seq)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        q = tl.load(q_ptr + seq * stride_qb + head * stride_qh + d, mask=d_ok, other=0.0).to(tl.float32)

        first = 0
        if HAS_WINDOW:
            # the query sits at position length - 1 and sees keys after (length - 1) - window
            first = tl.maximum(length - window, 0)
        m = tl.full([1], float("-inf"), tl.float32)
        denom = tl.zeros([1], tl.float32)
        acc = tl.zeros([BLOCK_D], tl.float32)
        start = (first // BLOCK_N) * BLOCK_N
        for base in range(start, length, BLOCK_N):
            pos = base + tl.arange(0, BLOCK_N)
            ok = (pos < length) & (pos >= first)
            block = tl.load(tables_ptr + seq * stride_tb + pos // BLOCK_SIZE, mask=ok, other=0)
            offset = pos % BLOCK_SIZE
            k_rows = k_cache_ptr + block * stride_kb + offset * stride_ks + kv_head * stride_kh
            keys = tl.load(k_rows[:, None] + d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
            scores = tl.sum(keys.to(tl.float32) * q[None, :], axis=1) * scale
            if HAS_SOFTCAP:
                scores = softcap * (2.0 * tl.sigmoid(2.0 * scores / softcap) - 1.0)
            scores = tl.where(ok, scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=0))
            p = tl.exp(scores - m_new)
            correction = tl.exp(m - m_new)
            v_rows = v_cache_ptr + block * stride_vb + offset * stride_vs + kv_head * stride_vh
            values = tl.load(v_rows[:, None] + d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
            acc = acc * correction + tl.sum(p[:, None] * values.to(tl.float32), axis=0)
            denom = denom * correction + tl.sum(p, axis=0)
            m = m_new
        out = acc / denom
        tl.store(out_ptr + seq * stride_ob + head * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


def paged_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """``q [B, heads, D]`` against each sequence's ``context_lens[b]`` cached keys -> ``[B, heads, D]``.

    ``k_cache``/``v_cache`` ``[num_blocks, block_size, kv_heads, D]`` (the last dim contiguous),
    ``block_tables [B, max_blocks]``; the new token's key/value must already be in the cache.
    """
    batch, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads cannot share {kv_heads} KV heads")
    q = q.contiguous()
    out = torch.empty_like(q)
    tables = block_tables.to(torch.int32).contiguous()
    lens = context_lens.to(torch.int32).contiguous()
    block_n = max(16, min(64, triton.next_power_of_2(block_size)))
    _paged_decode_kernel[(batch, heads)](
        q, k_cache, v_cache, out, tables, lens,
        float(scale), int(window or 0), float(softcap or 0.0),
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        tables.stride(0),
        GROUP=heads // kv_heads, BLOCK_SIZE=block_size, HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_N=block_n,
        HAS_WINDOW=bool(window), HAS_SOFTCAP=bool(softcap),
    )  # fmt: skip
    return out
