"""Attention over the paged KV cache in Triton kernels (CUDA).

Decode: one program per (sequence, query head) walks that sequence's cache
blocks through its block table, ``BLOCK_N`` keys at a time, with an online
softmax. Prefill and chunks with earlier context (any number of new tokens
per sequence, one launch for the whole batch): one program per (sequence,
query head, block of ``BLOCK_M`` new tokens), causal over the positions, the
new tokens' keys read back from the cache where they were just written. Keys
and values are read in place, never gathered into a contiguous copy of every
context (which the SDPA path does per layer and step), and no Python loop
runs per sequence. Grouped KV heads are shared by index
(``head // (heads / kv_heads)``); a sliding window and Gemma's score soft cap
are honoured. Accumulation is float32 whatever the cache dtype. On a CPU host
the kernels run under ``TRITON_INTERPRET=1`` (tests, small shapes).
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


if triton is not None:

    @triton.jit
    def _paged_prefill_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, tables_ptr, lens_ptr, qlens_ptr, qstarts_ptr,
        scale, window, softcap,
        stride_qt, stride_qh,
        stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh,
        stride_ot, stride_oh,
        stride_tb,
        GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    ):  # fmt: skip
        seq = tl.program_id(0)
        head = tl.program_id(1)
        qblock = tl.program_id(2)
        q_len = tl.load(qlens_ptr + seq)
        if qblock * BLOCK_M >= q_len:
            return
        length = tl.load(lens_ptr + seq)
        q_start = tl.load(qstarts_ptr + seq)
        kv_head = head // GROUP
        rows = qblock * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < q_len
        query_pos = length - q_len + rows  # the new tokens sit at the end of the context
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        q = tl.load(q_ptr + (q_start + rows)[:, None] * stride_qt + head * stride_qh + d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        denom = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        last = tl.minimum(length, length - q_len + (qblock + 1) * BLOCK_M)  # keys the block's last query sees
        first = 0
        if HAS_WINDOW:
            first = tl.maximum(length - q_len + qblock * BLOCK_M - window + 1, 0)
        start = (first // BLOCK_N) * BLOCK_N
        for base in range(start, last, BLOCK_N):
            pos = base + tl.arange(0, BLOCK_N)
            key_ok = pos < last
            block = tl.load(tables_ptr + seq * stride_tb + pos // BLOCK_SIZE, mask=key_ok, other=0)
            offset = pos % BLOCK_SIZE
            k_rows = k_cache_ptr + block * stride_kb + offset * stride_ks + kv_head * stride_kh
            keys = tl.load(k_rows[:, None] + d[None, :], mask=key_ok[:, None] & d_ok[None, :], other=0.0)
            scores = tl.dot(q, tl.trans(keys.to(tl.float32))) * scale
            if HAS_SOFTCAP:
                scores = softcap * (2.0 * tl.sigmoid(2.0 * scores / softcap) - 1.0)
            visible = key_ok[None, :] & (pos[None, :] <= query_pos[:, None])
            if HAS_WINDOW:
                visible = visible & (pos[None, :] > query_pos[:, None] - window)
            scores = tl.where(visible, scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            # rows that have seen no visible key yet keep -inf; exp(-inf - -inf) would be NaN
            safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(scores - safe[:, None])
            correction = tl.exp(m - safe)
            v_rows = v_cache_ptr + block * stride_vb + offset * stride_vs + kv_head * stride_vh
            values = tl.load(v_rows[:, None] + d[None, :], mask=key_ok[:, None] & d_ok[None, :], other=0.0)
            acc = acc * correction[:, None] + tl.dot(p, values.to(tl.float32))
            denom = denom * correction + tl.sum(p, axis=1)
            m = m_new
        out = acc / tl.where(denom == 0.0, 1.0, denom)[:, None]
        tl.store(out_ptr + (q_start + rows)[:, None] * stride_ot + head * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def paged_attention_varlen(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_lens: list[int],
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """``q [T, heads, D]`` (each sequence's new tokens, flattened in order) against their contexts,
    causally -> ``[T, heads, D]``. Sequence ``b``'s ``query_lens[b]`` new tokens sit at the end of
    its ``context_lens[b]`` positions, whose keys/values (the new ones included) are in the cache."""
    tokens, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads cannot share {kv_heads} KV heads")
    q = q.contiguous()
    out = torch.empty_like(q)
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    device = q.device
    qlens = torch.tensor(query_lens, dtype=torch.int32, device=device)
    qstarts = torch.tensor(starts[:-1], dtype=torch.int32, device=device)
    tables = block_tables.to(torch.int32).contiguous()
    lens = context_lens.to(torch.int32).contiguous()
    block_m = 16 if max(query_lens) <= 16 else 32
    block_n = 32
    grid = (len(query_lens), heads, triton.cdiv(max(query_lens), block_m))
    _paged_prefill_kernel[grid](
        q, k_cache, v_cache, out, tables, lens, qlens, qstarts,
        float(scale), int(window or 0), float(softcap or 0.0),
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        tables.stride(0),
        GROUP=heads // kv_heads, BLOCK_SIZE=block_size, HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_WINDOW=bool(window), HAS_SOFTCAP=bool(softcap),
    )  # fmt: skip
    return out


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
