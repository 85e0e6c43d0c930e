"""The Triton source of the GPTQ matmul (see ``triton_kernel.py``).

Imported only when the kernel is first used, so serving without CUDA never
imports Triton.
"""

import triton
import triton.language as tl


@triton.jit
def gptq_matmul(
    x_ptr,
    qweight_ptr,
    qzeros_ptr,
    scales_ptr,
    g_idx_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_qwk,
    stride_qwn,
    stride_qzg,
    stride_qzn,
    stride_sg,
    stride_sn,
    stride_ym,
    stride_yn,
    BITS: tl.constexpr,
    ZERO_OFFSET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    per_word: tl.constexpr = 32 // BITS
    mask: tl.constexpr = (1 << BITS) - 1
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    zero_shift = (offs_n % per_word) * BITS
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=m_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        kn_ok = k_ok[:, None] & n_ok[None, :]
        words = tl.load(
            qweight_ptr + (offs_k[:, None] // per_word) * stride_qwk + offs_n[None, :] * stride_qwn,
            mask=kn_ok,
            other=0,
        )
        codes = (words >> ((offs_k[:, None] % per_word) * BITS)) & mask
        group = tl.load(g_idx_ptr + offs_k, mask=k_ok, other=0)
        scale = tl.load(
            scales_ptr + group[:, None] * stride_sg + offs_n[None, :] * stride_sn,
            mask=kn_ok,
            other=0.0,
        ).to(tl.float32)
        zero_words = tl.load(
            qzeros_ptr + group[:, None] * stride_qzg + (offs_n[None, :] // per_word) * stride_qzn,
            mask=kn_ok,
            other=0,
        )
        zeros = ((zero_words >> zero_shift[None, :]) & mask) + ZERO_OFFSET
        w = ((codes - zeros).to(tl.float32) * scale).to(x.dtype)
        acc += tl.dot(x, w)
    tl.store(
        y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
        acc.to(y_ptr.dtype.element_ty),
        mask=m_ok[:, None] & n_ok[None, :],
    )
