"""Packing and unpacking of GPTQ tensors in the AutoGPTQ / GPTQModel layout.

Integer codes are packed into int32 words as one continuous little-endian
bit stream: value ``k`` occupies bits ``k*b .. k*b+b-1`` of the stream, lowest
bits first. For 2, 4 and 8 bits that is ``32 // b`` whole values per word;
for 3 bits 32 values fill exactly three words, with values 10 and 21
straddling a word boundary (the layout AutoGPTQ writes).

Per quantized linear ``W [out, in]`` with ``G`` groups:

- ``qweight`` int32 ``[in * b / 32, out]``: codes packed along the input dim;
- ``qzeros`` int32 ``[G, out * b / 32]``: zero points packed along the
  output dim; checkpoint format ``"gptq"`` (v1) stores ``zero - 1``,
  ``"gptq_v2"`` stores ``zero`` itself;
- ``scales`` fp16 ``[G, out]``; ``g_idx`` int32 ``[in]``.

Dequantization: ``w[o, i] = scales[g_idx[i], o] * (q[i, o] - zero[g_idx[i], o])``.

These functions are shared by the quantizer (writing) and the serving side
(loading), so they validate shapes and raise ``ValueError`` naming what is
wrong rather than producing a silently misaligned tensor.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")

_WORD = 32
_WORD_MASK = (1 << _WORD) - 1


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported; supported: {', '.join(map(str, SUPPORTED_BITS))}")


def _check_format(checkpoint_format: str) -> None:
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(
            f"checkpoint_format={checkpoint_format!r} is not supported; supported: {', '.join(CHECKPOINT_FORMATS)}"
        )


def packed_length(n: int, bits: int) -> int:
    """Number of int32 words holding ``n`` codes of ``bits`` bits.

    Raises ``ValueError`` unless ``n * bits`` is a whole number of words, the
    only case the layout defines.
    """
    _check_bits(bits)
    if (n * bits) % _WORD:
        raise ValueError(
            f"{n} values of {bits} bits do not fill whole 32-bit words "
            f"(need a multiple of {_WORD // _gcd(bits, _WORD)} values)"
        )
    return n * bits // _WORD


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Reinterpret unsigned 32-bit values held in int64 as int32 (two's complement)."""
    return torch.where(words >= (1 << 31), words - (1 << _WORD), words).to(torch.int32)


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``[n, cols]`` (each in ``[0, 2**bits)``) along dim 0.

    Returns int32 ``[n * bits / 32, cols]``. Codes outside the range raise
    ``ValueError`` (they would corrupt neighbouring values).
    """
    if codes.dim() != 2:
        raise ValueError(f"expected a 2-D tensor of codes, got shape {tuple(codes.shape)}")
    n, cols = codes.shape
    words_n = packed_length(n, bits)
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= (1 << bits)):
        raise ValueError(
            f"codes must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing, "
            f"got [{int(c.min())}, {int(c.max())}]"
        )
    if _WORD % bits == 0:
        per = _WORD // bits
        shifts = torch.arange(per, dtype=torch.int64, device=codes.device).mul_(bits).view(1, per, 1)
        words = (c.view(words_n, per, cols) << shifts).sum(dim=1)
        return _to_int32(words)
    # Bit stream across word boundaries (3 bits): place the low part of each
    # value in its word and the spill-over in the next one. Bits never
    # overlap, so summing is the same as or-ing.
    offset = torch.arange(n, dtype=torch.int64, device=codes.device) * bits
    word_idx = offset // _WORD
    shift = (offset % _WORD).view(n, 1)
    words = torch.zeros(words_n + 1, cols, dtype=torch.int64, device=codes.device)
    words.index_add_(0, word_idx, (c << shift) & _WORD_MASK)
    words.index_add_(0, word_idx + 1, c >> (_WORD - shift))
    return _to_int32(words[:words_n])


def unpack_rows(packed: torch.Tensor, bits: int, n: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: int32 ``[words, cols]`` -> int32 codes ``[n, cols]``, on the
    packed tensor's device.

    ``n`` defaults to ``words * 32 / bits``; a different ``n`` must fit the words.
    """
    if packed.dim() != 2:
        raise ValueError(f"expected a 2-D packed tensor, got shape {tuple(packed.shape)}")
    _check_bits(bits)
    words_n, cols = packed.shape
    if n is None:
        n = words_n * _WORD // bits
    if packed_length(n, bits) != words_n:
        raise ValueError(f"{words_n} packed words hold {words_n * _WORD // bits} {bits}-bit values, not {n}")
    w = packed.to(torch.int64) & _WORD_MASK
    mask = (1 << bits) - 1
    if _WORD % bits == 0:
        per = _WORD // bits
        shifts = torch.arange(per, dtype=torch.int64, device=packed.device).mul_(bits).view(1, per, 1)
        return ((w.unsqueeze(1) >> shifts) & mask).reshape(n, cols).to(torch.int32)
    offset = torch.arange(n, dtype=torch.int64, device=packed.device) * bits
    word_idx = offset // _WORD
    shift = (offset % _WORD).view(n, 1)
    padded = torch.cat([w, torch.zeros(1, cols, dtype=torch.int64, device=packed.device)])
    low = padded[word_idx] >> shift
    high = (padded[word_idx + 1] << (_WORD - shift)) & _WORD_MASK
    return ((low | high) & mask).to(torch.int32)


def pack_cols(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes ``[rows, n]`` along dim 1 -> int32 ``[rows, n * bits / 32]`` (the qzeros layout)."""
    return pack_rows(codes.t(), bits).t().contiguous()


def unpack_cols(packed: torch.Tensor, bits: int, n: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_cols`."""
    return unpack_rows(packed.t(), bits, n).t().contiguous()


def pack_zeros(zeros: torch.Tensor, bits: int, checkpoint_format: str = "gptq") -> torch.Tensor:
    """Pack integer zero points ``[G, out]`` into ``qzeros``.

    Format ``"gptq"`` (v1) stores ``zero - 1``, so a zero point of 0 cannot be
    represented and raises ``ValueError``; ``"gptq_v2"`` stores the zero as is.
    """
    _check_format(checkpoint_format)
    z = zeros.to(torch.int64)
    if checkpoint_format == "gptq":
        if z.numel() and int(z.min()) < 1:
            raise ValueError("a zero point of 0 cannot be stored in the v1 'gptq' format (it stores zero - 1)")
        z = z - 1
    return pack_cols(z, bits)


def unpack_zeros(qzeros: torch.Tensor, bits: int, out_features: int | None = None,
                 checkpoint_format: str = "gptq") -> torch.Tensor:
    """Unpack ``qzeros`` into integer zero points ``[G, out]`` (int32), undoing v1's ``- 1``."""
    _check_format(checkpoint_format)
    z = unpack_cols(qzeros, bits, out_features)
    return z + 1 if checkpoint_format == "gptq" else z


def pack_gptq(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    checkpoint_format: str = "gptq",
) -> dict[str, torch.Tensor]:
    """Pack one quantized linear into its checkpoint tensors.

    ``codes`` are the integer weights in the model's orientation ``[out, in]``,
    ``scales`` and ``zeros`` are ``[G, out]`` and ``g_idx`` is ``[in]`` with
    values in ``[0, G)``. Returns ``{"qweight", "qzeros", "scales", "g_idx"}``
    with the layout's dtypes (int32, int32, fp16, int32).
    """
    out_features, in_features = codes.shape
    groups = scales.shape[0]
    if scales.shape != (groups, out_features) or zeros.shape != (groups, out_features):
        raise ValueError(
            f"scales {tuple(scales.shape)} and zeros {tuple(zeros.shape)} must both be "
            f"[groups, {out_features}] for codes of shape {tuple(codes.shape)}"
        )
    if g_idx.shape != (in_features,):
        raise ValueError(f"g_idx has shape {tuple(g_idx.shape)}, expected ({in_features},)")
    if in_features and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
        raise ValueError(f"g_idx values must lie in [0, {groups}), got [{int(g_idx.min())}, {int(g_idx.max())}]")
    return {
        "qweight": pack_rows(codes.t(), bits),
        "qzeros": pack_zeros(zeros, bits, checkpoint_format),
        # copies: tensors that share storage cannot be saved side by side
        "scales": scales.to(torch.float16, copy=True).contiguous(),
        "g_idx": g_idx.to(torch.int32, copy=True).contiguous(),
    }


def unpack_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    bits: int,
    checkpoint_format: str = "gptq",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack ``qweight`` and ``qzeros`` into integer codes ``[out, in]`` and zeros ``[G, out]``."""
    out_features = qweight.shape[1]
    codes = unpack_rows(qweight, bits).t().contiguous()
    zeros = unpack_zeros(qzeros, bits, out_features, checkpoint_format)
    return codes, zeros


def dequantize_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    checkpoint_format: str = "gptq",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Reconstruct the dense weight ``[out, in]`` of a packed GPTQ linear.

    Implements ``w[o, i] = scales[g_idx[i], o] * (q[i, o] - zero[g_idx[i], o])``
    with zeros read according to ``checkpoint_format``.
    """
    codes, zeros = unpack_gptq(qweight, qzeros, bits, checkpoint_format)
    in_features = codes.shape[1]
    if g_idx.shape != (in_features,):
        raise ValueError(f"g_idx has shape {tuple(g_idx.shape)}, expected ({in_features},) from qweight")
    if scales.shape != zeros.shape:
        raise ValueError(f"scales {tuple(scales.shape)} and qzeros unpack to {tuple(zeros.shape)}: they must match")
    g = g_idx.to(torch.int64)
    s = scales.to(torch.float32)[g].t()  # [out, in]
    z = zeros.to(torch.float32)[g].t()
    return (s * (codes.to(torch.float32) - z)).to(dtype)


def group_index(in_features: int, group_size: int, perm: torch.Tensor | None = None) -> torch.Tensor:
    """``g_idx`` for ``in_features`` columns in groups of ``group_size`` (-1: one group).

    With ``perm`` (the act-order processing order, ``perm[k]`` = column quantized
    k-th), groups are formed in processing order, so column ``perm[k]`` belongs
    to group ``k // group_size`` and ``g_idx`` is no longer monotonic.
    """
    size = in_features if group_size in (-1, 0) else group_size
    order_groups = torch.arange(in_features, dtype=torch.int32) // size
    if perm is None:
        return order_groups
    g_idx = torch.empty(in_features, dtype=torch.int32)
    g_idx[perm.to(torch.int64)] = order_groups
    return g_idx


def num_groups(in_features: int, group_size: int) -> int:
    """G = ceil(in / group_size), 1 for group_size -1."""
    if group_size in (-1, 0):
        return 1
    return -(-in_features // group_size)
