"""GPTQ tensor packing: the AutoGPTQ v1 layout, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from text_generation_server.quantize.packing import (
    dequantize_gptq,
    group_index,
    num_groups,
    pack_cols,
    pack_gptq,
    pack_rows,
    pack_zeros,
    packed_length,
    unpack_cols,
    unpack_gptq,
    unpack_rows,
    unpack_zeros,
)


def autogptq_pack_rows(intweight: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ's QuantLinear.pack loop over rows (uint32 words), as published."""
    intweight = intweight.astype(np.uint32)
    qweight = np.zeros((intweight.shape[0] // 32 * bits, intweight.shape[1]), dtype=np.uint32)
    i = 0
    row = 0
    while row < qweight.shape[0]:
        if bits in (2, 4, 8):
            for j in range(i, i + (32 // bits)):
                qweight[row] |= intweight[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
        else:  # 3 bits: 32 values over 3 words
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i))
            i += 10
            qweight[row] |= intweight[i] << 30
            row += 1
            qweight[row] |= (intweight[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 1)
            i += 10
            qweight[row] |= intweight[i] << 31
            row += 1
            qweight[row] |= (intweight[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    return qweight


def as_uint32(t: torch.Tensor) -> np.ndarray:
    return t.numpy().astype(np.int64).astype(np.uint32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_rows_matches_autogptq_bit_layout(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (96, 7), generator=g)
    ours = pack_rows(codes, bits)
    assert ours.dtype == torch.int32
    assert ours.shape == (96 * bits // 32, 7)
    np.testing.assert_array_equal(as_uint32(ours), autogptq_pack_rows(codes.numpy(), bits))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack_round_trip_rows_and_cols(bits):
    g = torch.Generator().manual_seed(10 + bits)
    codes = torch.randint(0, 1 << bits, (64 if bits != 3 else 96, 5), generator=g)
    assert torch.equal(unpack_rows(pack_rows(codes, bits), bits).long(), codes)
    wide = codes.t().contiguous()
    packed = pack_cols(wide, bits)
    assert packed.shape == (5, codes.shape[0] * bits // 32)
    assert torch.equal(unpack_cols(packed, bits).long(), wide)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_extreme_codes_survive_sign_bit(bits):
    """All-ones codes fill the int32 sign bit; they must come back unchanged."""
    codes = torch.full((96, 3), (1 << bits) - 1)
    packed = pack_rows(codes, bits)
    assert int(packed[0, 0]) == -1
    assert torch.equal(unpack_rows(packed, bits).long(), codes)


@pytest.mark.parametrize(
    "bits,word", [(2, 0x55555555), (4, 0x77777777), (8, 0x7F7F7F7F)]
)
def test_v1_symmetric_zeros_are_stored_as_zero_minus_one(bits, word):
    zero = 1 << (bits - 1)
    zeros = torch.full((3, 64), zero)
    qzeros = pack_zeros(zeros, bits, "gptq")
    assert qzeros.shape == (3, 64 * bits // 32)
    assert set(as_uint32(qzeros).ravel().tolist()) == {word}
    assert torch.equal(unpack_zeros(qzeros, bits, 64, "gptq").long(), zeros)


def test_v2_zeros_are_stored_as_is():
    zeros = torch.full((2, 16), 8)
    qzeros = pack_zeros(zeros, 4, "gptq_v2")
    assert set(as_uint32(qzeros).ravel().tolist()) == {0x88888888}
    assert torch.equal(unpack_zeros(qzeros, 4, 16, "gptq_v2").long(), zeros)


def test_v1_refuses_a_zero_point_of_zero():
    with pytest.raises(ValueError, match="zero point of 0"):
        pack_zeros(torch.zeros(1, 8, dtype=torch.int64), 4, "gptq")


def test_pack_rejects_out_of_range_codes_and_partial_words():
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_rows(torch.full((8, 1), 16), 4)
    with pytest.raises(ValueError, match="whole 32-bit words"):
        pack_rows(torch.zeros(12, 1, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match="multiple of 32"):
        packed_length(48, 3)
    with pytest.raises(ValueError, match="bits=5"):
        packed_length(32, 5)


def test_g_idx_is_monotonic_by_default_and_permuted_with_act_order():
    g_idx = group_index(128, 32)
    assert g_idx.dtype == torch.int32
    assert torch.equal(g_idx, torch.arange(128, dtype=torch.int32) // 32)
    assert torch.all(g_idx[1:] >= g_idx[:-1])
    assert torch.equal(group_index(128, -1), torch.zeros(128, dtype=torch.int32))

    perm = torch.randperm(128, generator=torch.Generator().manual_seed(0))
    permuted = group_index(128, 32, perm)
    assert not torch.all(permuted[1:] >= permuted[:-1])
    # the k-th processed column belongs to group k // 32
    assert torch.equal(permuted[perm], torch.arange(128, dtype=torch.int32) // 32)
    assert torch.equal(torch.bincount(permuted.long()), torch.full((4,), 32))
    assert num_groups(100, 32) == 4 and num_groups(100, -1) == 1


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_dequantize_equals_reference_formula(bits, fmt):
    g = torch.Generator().manual_seed(bits)
    out_f, in_f, gs = 64, 96, 32
    groups = in_f // gs
    codes = torch.randint(0, 1 << bits, (out_f, in_f), generator=g)
    zeros = torch.randint(1, 1 << bits, (groups, out_f), generator=g)
    scales = (torch.rand(groups, out_f, generator=g) + 0.01).half()
    perm = torch.randperm(in_f, generator=g)
    g_idx = group_index(in_f, gs, perm)
    t = pack_gptq(codes, scales, zeros, g_idx, bits, fmt)
    assert t["qweight"].shape == (in_f * bits // 32, out_f) and t["qweight"].dtype == torch.int32
    assert t["qzeros"].shape == (groups, out_f * bits // 32) and t["qzeros"].dtype == torch.int32
    assert t["scales"].shape == (groups, out_f) and t["scales"].dtype == torch.float16
    assert t["g_idx"].shape == (in_f,) and t["g_idx"].dtype == torch.int32

    got_codes, got_zeros = unpack_gptq(t["qweight"], t["qzeros"], bits, fmt)
    assert torch.equal(got_codes.long(), codes) and torch.equal(got_zeros.long(), zeros)

    dense = dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, fmt)
    expected = torch.empty(out_f, in_f)
    for i in range(in_f):
        gi = int(g_idx[i])
        for o in range(out_f):
            expected[o, i] = float(scales[gi, o]) * (int(codes[o, i]) - int(zeros[gi, o]))
    torch.testing.assert_close(dense, expected, rtol=0, atol=0)


def test_pack_gptq_validates_shapes():
    codes = torch.zeros(16, 32, dtype=torch.int64)
    with pytest.raises(ValueError, match="scales"):
        pack_gptq(codes, torch.ones(2, 8), torch.ones(2, 8), torch.zeros(32, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="g_idx"):
        pack_gptq(codes, torch.ones(1, 16), torch.ones(1, 16), torch.zeros(31, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="g_idx values"):
        pack_gptq(codes, torch.ones(1, 16), torch.ones(1, 16), torch.ones(32, dtype=torch.int32), 4)
