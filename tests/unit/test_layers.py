"""Tensor-parallel layers against dense references, one rank at a time.

Ranks are simulated in-process with a group whose collectives do nothing:
each rank's partial result is computed separately and the test combines them
(sum for all-reduce, concatenation for all-gather) before comparing with the
dense computation. Real multi-process collectives are covered in
tests/distributed/.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file
from text_generation_server.distributed import Distributed
from text_generation_server.layers.attention import (
    AttentionMetadata,
    TorchSDPABackend,
    write_kv,
)
from text_generation_server.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from text_generation_server.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from text_generation_server.layers.norm import RMSNorm
from text_generation_server.layers.partition import describe_partition, partition_heads
from text_generation_server.layers.quant.registry import get_quant_method
from text_generation_server.layers.quant.unquantized import UnquantizedLinearMethod
from text_generation_server.layers.rotary import RotaryEmbedding
from text_generation_server.weights import CheckpointError, Weights

CPU = torch.device("cpu")


class NoCommDistributed(Distributed):
    """A rank of a larger world whose collectives return their input unchanged."""

    def __init__(self, rank: int, world_size: int) -> None:
        super().__init__(rank, world_size, CPU, "none")

    def all_reduce(self, t):
        return t

    def all_gather(self, t, dim=-1, sizes=None):
        return t


def make_weights(tmp_path, tensors: dict[str, torch.Tensor], dist: Distributed) -> Weights:
    path = tmp_path / "w.safetensors"
    if not path.exists():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return Weights([path], device=CPU, dtype=torch.float32, dist=dist)


def load(layer, weights: Weights, prefix: str, shard_map: dict[str, object] | None = None):
    """Load every parameter of ``layer`` from ``{prefix}.{name}`` (or per part for fused layers)."""
    for pname, param in layer.named_parameters(recurse=False):
        if shard_map is None:
            param.weight_loader(param, weights, f"{prefix}.{pname}", None)
        else:
            for ckpt_prefix, shard_id in shard_map.items():
                param.weight_loader(param, weights, f"{ckpt_prefix}.{pname}", shard_id)


def dense():
    return UnquantizedLinearMethod()


# ---------------------------------------------------------------- head partition


def test_gqa_heads_split_unevenly_by_kv_group():
    parts = partition_heads(9, 3, 2)
    assert [(p.num_heads, p.num_kv_heads) for p in parts] == [(6, 2), (3, 1)]
    assert describe_partition(parts) == "q heads 6/3, kv heads 2/1 (uneven GQA split)"
    assert [(p.num_heads, p.num_kv_heads) for p in partition_heads(6, 3, 2)] == [(4, 2), (2, 1)]


def test_kv_heads_are_replicated_when_ranks_outnumber_them():
    parts = partition_heads(8, 2, 4)
    assert [(p.q_start, p.q_stop, p.kv_start) for p in parts] == [
        (0, 2, 0),
        (2, 4, 0),
        (4, 6, 1),
        (6, 8, 1),
    ]
    assert "KV heads replicated" in describe_partition(parts)


def test_impossible_head_split_names_all_three_numbers():
    with pytest.raises(ValueError) as e:
        partition_heads(4, 2, 8)
    text = str(e.value)
    assert "num_attention_heads=4" in text and "num_key_value_heads=2" in text
    assert "world_size=8" in text


@given(kv=st.integers(1, 8), group=st.integers(1, 6), world=st.integers(1, 12))
def test_every_query_head_is_on_exactly_one_rank_with_its_kv_head(kv, group, world):
    heads = kv * group
    try:
        parts = partition_heads(heads, kv, world)
    except ValueError:
        assert world > kv  # only replication can run out of query heads
        return
    assert len(parts) == world
    owned = [h for p in parts for h in range(p.q_start, p.q_stop)]
    assert owned == list(range(heads))
    for p in parts:
        assert p.num_heads >= 1 and p.num_kv_heads >= 1
        for h in range(p.q_start, p.q_stop):
            assert p.kv_start <= h // group < p.kv_stop


# ---------------------------------------------------------------- linear layers


@pytest.mark.parametrize("world", [1, 2, 3])
def test_column_parallel_outputs_concatenate_to_the_dense_matmul(tmp_path, world):
    g = torch.Generator().manual_seed(1)
    w, b, x = (
        torch.randn(7, 5, generator=g),
        torch.randn(7, generator=g),
        torch.randn(4, 5, generator=g),
    )
    outs = []
    for rank in range(world):
        dist = NoCommDistributed(rank, world)
        layer = ColumnParallelLinear(
            5, 7, bias=True, quant_method=dense(), dist=dist, dtype=torch.float32, device=CPU
        )
        load(layer, make_weights(tmp_path, {"p.weight": w, "p.bias": b}, dist), "p")
        outs.append(layer(x))
    torch.testing.assert_close(torch.cat(outs, dim=-1), F.linear(x, w, b))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_row_parallel_partial_outputs_sum_to_the_dense_matmul(tmp_path, world):
    g = torch.Generator().manual_seed(2)
    w, x = torch.randn(6, 11, generator=g), torch.randn(3, 11, generator=g)
    total = torch.zeros(3, 6)
    for rank in range(world):
        dist = NoCommDistributed(rank, world)
        layer = RowParallelLinear(
            11, 6, bias=False, quant_method=dense(), dist=dist, dtype=torch.float32, device=CPU
        )
        load(layer, make_weights(tmp_path, {"p.weight": w}, dist), "p")
        start, stop = layer.input_range or (0, 11)
        total += layer(x[:, start:stop])
    torch.testing.assert_close(total, F.linear(x, w))


def test_row_parallel_with_one_rank_adds_its_bias(tmp_path):
    g = torch.Generator().manual_seed(3)
    w, b, x = (
        torch.randn(6, 4, generator=g),
        torch.randn(6, generator=g),
        torch.randn(2, 4, generator=g),
    )
    dist = NoCommDistributed(0, 1)
    layer = RowParallelLinear(
        4, 6, bias=True, quant_method=dense(), dist=dist, dtype=torch.float32, device=CPU
    )
    load(layer, make_weights(tmp_path, {"p.weight": w, "p.bias": b}, dist), "p")
    torch.testing.assert_close(layer(x), F.linear(x, w, b))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_qkv_layer_holds_each_ranks_q_then_k_then_v_heads(tmp_path, world):
    heads, kv_heads, hd, hidden = 6, 3, 4, 8
    g = torch.Generator().manual_seed(4)
    wq, wk, wv = (torch.randn(n * hd, hidden, generator=g) for n in (heads, kv_heads, kv_heads))
    bq, bk, bv = (torch.randn(n * hd, generator=g) for n in (heads, kv_heads, kv_heads))
    x = torch.randn(5, hidden, generator=g)
    tensors = {
        "q.weight": wq,
        "k.weight": wk,
        "v.weight": wv,
        "q.bias": bq,
        "k.bias": bk,
        "v.bias": bv,
    }
    for rank, part in enumerate(partition_heads(heads, kv_heads, world)):
        dist = NoCommDistributed(rank, world)
        layer = QKVParallelLinear(
            hidden,
            hd,
            heads,
            kv_heads,
            part,
            bias=True,
            quant_method=dense(),
            dist=dist,
            dtype=torch.float32,
            device=CPU,
        )
        load(layer, make_weights(tmp_path, tensors, dist), "", {"q": "q", "k": "k", "v": "v"})
        q_rows = slice(part.q_start * hd, part.q_stop * hd)
        kv_rows = slice(part.kv_start * hd, part.kv_stop * hd)
        expected = torch.cat(
            [
                F.linear(x, wq[q_rows], bq[q_rows]),
                F.linear(x, wk[kv_rows], bk[kv_rows]),
                F.linear(x, wv[kv_rows], bv[kv_rows]),
            ],
            dim=-1,
        )
        torch.testing.assert_close(layer(x), expected)


def test_merged_gate_up_holds_matching_slices_of_both_parts(tmp_path):
    g = torch.Generator().manual_seed(5)
    wg, wu, x = (
        torch.randn(9, 4, generator=g),
        torch.randn(9, 4, generator=g),
        torch.randn(3, 4, generator=g),
    )
    gates, ups = [], []
    for rank in range(2):
        dist = NoCommDistributed(rank, 2)
        layer = MergedColumnParallelLinear(
            4, [9, 9], bias=False, quant_method=dense(), dist=dist, dtype=torch.float32, device=CPU
        )
        load(
            layer,
            make_weights(tmp_path, {"gate.weight": wg, "up.weight": wu}, dist),
            "",
            {"gate": 0, "up": 1},
        )
        gate, up = layer(x).split(layer.output_sizes, dim=-1)
        gates.append(gate)
        ups.append(up)
    torch.testing.assert_close(torch.cat(gates, -1), F.linear(x, wg))
    torch.testing.assert_close(torch.cat(ups, -1), F.linear(x, wu))


def test_linear_loader_rejects_a_tensor_of_the_wrong_shape(tmp_path):
    dist = NoCommDistributed(0, 2)
    layer = ColumnParallelLinear(
        5, 8, bias=False, quant_method=dense(), dist=dist, dtype=torch.float32, device=CPU
    )
    weights = make_weights(tmp_path, {"p.weight": torch.randn(8, 6)}, dist)
    with pytest.raises(
        CheckpointError, match=r"'p.weight' in w.safetensors has shape \[8, 6\], expected \[8, 5\]"
    ):
        load(layer, weights, "p")


# ---------------------------------------------------------------- vocabulary


@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel_embedding_masks_ids_outside_each_ranks_range(tmp_path, world):
    vocab, hidden = 11, 4  # 11 does not divide by 2 or 3
    table = torch.randn(vocab, hidden, generator=torch.Generator().manual_seed(6))
    ids = torch.tensor([0, 3, 10, 5, 4, 7, 10, 1])
    total = torch.zeros(len(ids), hidden)
    for rank in range(world):
        dist = NoCommDistributed(rank, world)
        emb = VocabParallelEmbedding(vocab, hidden, dist=dist, dtype=torch.float32, device=CPU)
        emb.weight.weight_loader(emb.weight, make_weights(tmp_path, {"e": table}, dist), "e")
        part = emb(ids)
        outside = (ids < emb.vocab_start) | (ids >= emb.vocab_end)
        assert torch.all(part[outside] == 0)
        total += part
    torch.testing.assert_close(total, F.embedding(ids, table))


@pytest.mark.parametrize("tied", [False, True])
def test_lm_head_shards_concatenate_to_full_logits(tmp_path, tied):
    vocab, hidden = 11, 4
    g = torch.Generator().manual_seed(7)
    table, h = torch.randn(vocab, hidden, generator=g), torch.randn(3, hidden, generator=g)
    pieces = []
    for rank in range(3):
        dist = NoCommDistributed(rank, 3)
        weights = make_weights(tmp_path, {"e": table}, dist)
        emb = VocabParallelEmbedding(vocab, hidden, dist=dist, dtype=torch.float32, device=CPU)
        head = ParallelLMHead(
            vocab, hidden, dist=dist, dtype=torch.float32, device=CPU, tied_to=emb if tied else None
        )
        emb.weight.weight_loader(emb.weight, weights, "e")
        if tied:
            assert head.weight.data_ptr() == emb.weight.data_ptr()
        else:
            head.weight.weight_loader(head.weight, weights, "e")
        logits = head(h)
        assert logits.dtype == torch.float32
        pieces.append(logits)
    assert [p.shape[-1] for p in pieces] == [4, 4, 3]
    torch.testing.assert_close(torch.cat(pieces, -1), h @ table.T)


# ---------------------------------------------------------------- norm and rotary


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_equals_transformers(dtype, cpu_kernels):
    """Bit for bit on the torch path; the native float32 kernel sums squares in another order
    (within an ulp or two)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = torch.Generator().manual_seed(8)
    weight, x = torch.randn(16, generator=g), torch.randn(5, 16, generator=g) * 3
    ref = LlamaRMSNorm(16, eps=1e-5)
    ref.weight.data.copy_(weight)
    ref = ref.to(dtype)
    ours = RMSNorm(16, 1e-5, dtype=dtype, device=CPU)
    ours.weight.data.copy_(weight)
    native = cpu_kernels == "native" and dtype == torch.float32
    tol = {"rtol": 1e-6, "atol": 1e-6} if native else {"rtol": 0, "atol": 0}
    torch.testing.assert_close(ours(x.to(dtype)), ref(x.to(dtype)), **tol)
    residual = x.to(dtype).clone()
    added = torch.randn(5, 16, generator=g).to(dtype)
    torch.testing.assert_close(ours(added, residual), ref(x.to(dtype) + added), **tol)
    torch.testing.assert_close(residual, x.to(dtype) + added, rtol=0, atol=0)


ROPE_CASES = {
    "default": {},
    "linear": {"rope_scaling": {"type": "linear", "factor": 4.0}},
    "llama3": {
        "rope_parameters": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        }
    },
}


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rotary_embedding_equals_transformers(case):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = LlamaConfig(
        hidden_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        rope_theta=500000.0,
        max_position_embeddings=512,
        **ROPE_CASES[case],
    )
    head_dim = 32
    positions = torch.tensor([0, 1, 2, 7, 100, 301, 511])
    g = torch.Generator().manual_seed(9)
    q, k = (
        torch.randn(len(positions), 2, head_dim, generator=g),
        torch.randn(len(positions), 1, head_dim, generator=g),
    )

    ref_rope = LlamaRotaryEmbedding(config)
    cos_ref, sin_ref = ref_rope(q, positions[None])
    q_ref, k_ref = apply_rotary_pos_emb(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos_ref, sin_ref
    )

    rope = RotaryEmbedding.from_config(config, head_dim, CPU)
    torch.testing.assert_close(rope.inv_freq, ref_rope.inv_freq)
    cos, sin = rope.cos_sin(positions, torch.float32)
    torch.testing.assert_close(RotaryEmbedding.apply(q, cos, sin), q_ref[0].transpose(0, 1))
    torch.testing.assert_close(RotaryEmbedding.apply(k, cos, sin), k_ref[0].transpose(0, 1))


def test_unsupported_rope_type_is_named():
    from types import SimpleNamespace

    config = SimpleNamespace(
        rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}
    )
    with pytest.raises(ValueError, match=r"rope type 'yarn' is not built \(supported: default, linear, llama3\)"):
        RotaryEmbedding.from_config(config, 16, CPU)


# ---------------------------------------------------------------- paged attention


def dense_attention(q, keys, values, context_len):
    """Reference: new queries (the last len(q) positions) over all keys, causal, GQA by repetition."""
    n, heads, hd = q.shape
    group = heads // keys.shape[1]
    k = keys.repeat_interleave(group, dim=1)
    v = values.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / hd**0.5
    q_pos = torch.arange(context_len - n, context_len)[:, None]
    scores = scores.masked_fill(torch.arange(context_len)[None, :] > q_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def run_paged(seqs, block_size, heads=6, kv_heads=3, hd=8, seed=0):
    """seqs: list of (prior_len, new_len). Returns (paged output, dense outputs per seq, cache, meta)."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = 64
    k_cache = torch.zeros(num_blocks, block_size, kv_heads, hd)
    v_cache = torch.zeros_like(k_cache)
    free = torch.randperm(num_blocks - 1, generator=g).add(1).tolist()  # shuffled, block 0 unused
    tables, slots, qs, ks, vs, full = [], [], [], [], [], []
    for prior, new in seqs:
        total = prior + new
        blocks = [free.pop() for _ in range(-(-total // block_size))]
        seq_slots = torch.tensor(
            [blocks[p // block_size] * block_size + p % block_size for p in range(total)]
        )
        keys, values = (
            torch.randn(total, kv_heads, hd, generator=g),
            torch.randn(total, kv_heads, hd, generator=g),
        )
        q = torch.randn(new, heads, hd, generator=g)
        if prior:
            write_kv(keys[:prior], values[:prior], k_cache, v_cache, seq_slots[:prior])
        tables.append(blocks)
        slots.append(seq_slots[prior:])
        qs.append(q)
        ks.append(keys[prior:])
        vs.append(values[prior:])
        full.append((q, keys, values, total))
    width = max(len(t) for t in tables)
    meta = AttentionMetadata(
        slot_mapping=torch.cat(slots),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
        context_lens=torch.tensor([p + n for p, n in seqs]),
        query_lens=[n for _, n in seqs],
    )
    out = TorchSDPABackend().forward(
        torch.cat(qs), torch.cat(ks), torch.cat(vs), k_cache, v_cache, meta, hd**-0.5
    )
    expected = [dense_attention(*f) for f in full]
    return out, expected, (k_cache, v_cache), meta, full


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize(
    "seqs",
    [
        [(0, 5), (0, 1), (0, 9)],  # prefill only
        [(4, 1), (9, 1), (1, 1), (16, 1)],  # decode only, different context lengths
        [(7, 1), (5, 3), (0, 6), (12, 1), (3, 4)],  # mixed: decode, chunk with context, prefill
        [(40, 23), (17, 9)],  # long chunks after context: the unmasked pass and the causal one, merged
    ],
    ids=["prefill", "decode", "mixed", "chunks"],
)
@pytest.mark.parametrize("group", [1, 3])
def test_paged_attention_equals_dense_causal_attention(seqs, block_size, group):
    out, expected, _, _, _ = run_paged(seqs, block_size, heads=3 * group)
    torch.testing.assert_close(out, torch.cat(expected), atol=1e-5, rtol=1e-5)


def test_paged_attention_writes_new_keys_and_values_to_their_slots():
    seqs = [(3, 2), (0, 4)]
    _, _, (k_cache, v_cache), meta, full = run_paged(seqs, 4)
    for b, (_, keys, values, total) in enumerate(full):
        blocks = meta.block_tables[b]
        slots = torch.tensor([int(blocks[p // 4]) * 4 + p % 4 for p in range(total)])
        torch.testing.assert_close(k_cache.view(-1, 3, 8)[slots], keys)
        torch.testing.assert_close(v_cache.view(-1, 3, 8)[slots], values)


def test_attention_metadata_helpers():
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(6, dtype=torch.int64),
        block_tables=torch.zeros(3, 2, dtype=torch.int64),
        context_lens=torch.tensor([3, 2, 9]),
        query_lens=[3, 2, 1],
    )
    assert meta.query_start_loc == [0, 3, 5, 6]
    assert meta.max_context_len == 9
    assert not meta.is_decode and not meta.is_prefill


# ---------------------------------------------------------------- quantization registry


def test_no_quantization_selects_dense_linear_layers():
    config = get_quant_method(None, None)
    assert config.name == "unquantized"
    assert isinstance(config("model.layers.0.mlp.down_proj"), UnquantizedLinearMethod)


def test_unknown_quantization_flag_lists_supported_methods():
    with pytest.raises(ValueError, match="unsupported quantization 'awq'; supported:"):
        get_quant_method("awq", None)


def test_checkpoint_with_unsupported_quant_method_is_refused():
    with pytest.raises(ValueError, match="quant_method 'fp8'"):
        get_quant_method(None, {"quant_method": "fp8"})


# ---------------------------------------------------------------- a packed quantization method


class ToyInt4Method(UnquantizedLinearMethod):
    """Int4 codes packed 8 per int32 along the input dim (as GPTQ's qweight) with per-output
    scales: exercises packed input slicing and integer tensors through the generic loader."""

    def create_weights(self, layer, spec):
        from text_generation_server.layers.quant.base import linear_param

        qweight = torch.empty(spec.in_features // 8, spec.out_features, dtype=torch.int32)
        layer.register_parameter(
            "qweight", linear_param(qweight, output_dim=1, input_dim=0, input_pack=8)
        )
        scales = torch.empty(spec.out_features, dtype=spec.dtype)
        layer.register_parameter("scales", linear_param(scales, output_dim=0, input_dim=None))

    def apply(self, layer, x, bias=None):
        shifts = torch.arange(0, 32, 4, dtype=torch.int32)
        codes = (layer.qweight.unsqueeze(1) >> shifts[None, :, None]) & 0xF
        weight = (codes.reshape(-1, codes.shape[-1]).float() - 8) * layer.scales
        out = x @ weight
        return out if bias is None else out + bias

    def kernel_name(self, layer):
        return "toy-int4"


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """codes [in, out] in [0, 16) -> int32 [in / 8, out], lowest bits first."""
    grouped = codes.long().view(codes.shape[0] // 8, 8, codes.shape[1])
    words = sum(grouped[:, j, :] << (4 * j) for j in range(8))
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_packed_quantized_weights_load_through_the_same_parallel_layers(tmp_path, world):
    g = torch.Generator().manual_seed(11)
    in_features, out_features = 48, 10
    codes = torch.randint(0, 16, (in_features, out_features), generator=g)
    scales = torch.rand(out_features, generator=g) + 0.5
    dense_weight = (codes.float() - 8) * scales  # [in, out]
    x = torch.randn(3, in_features, generator=g)
    tensors = {"p.qweight": pack_int4(codes), "p.scales": scales}
    columns, row_total = [], torch.zeros(3, out_features)
    for rank in range(world):
        dist = NoCommDistributed(rank, world)
        weights = make_weights(tmp_path, tensors, dist)
        col = ColumnParallelLinear(
            in_features,
            out_features,
            bias=False,
            quant_method=ToyInt4Method(),
            dist=dist,
            dtype=torch.float32,
            device=CPU,
        )
        row = RowParallelLinear(
            in_features,
            out_features,
            bias=False,
            quant_method=ToyInt4Method(),
            dist=dist,
            dtype=torch.float32,
            device=CPU,
        )
        load(col, weights, "p")
        load(row, weights, "p")
        assert col.qweight.dtype == torch.int32
        columns.append(col(x))
        start, stop = row.input_range or (0, in_features)
        row_total += row(x[:, start:stop])
    torch.testing.assert_close(torch.cat(columns, -1), x @ dense_weight)
    torch.testing.assert_close(row_total, x @ dense_weight)
