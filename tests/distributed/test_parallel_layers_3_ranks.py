"""Every tensor-parallel layer on a real gloo group of three processes, against the dense layer.

Sizes are chosen so three never divides them evenly (10 outputs, 11
intermediate features, 13 vocabulary rows, 9/3 and 6/2 heads), and the 6/2
head layout replicates a KV head on two ranks. One spawn runs every layer
(layers3_worker.py); each test pins one layer's result.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

import layers3_worker as worker  # noqa: E402

WORLD = 3
ATOL = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dense_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    h, hd, inter = worker.HIDDEN, worker.HEAD_DIM, worker.INTERMEDIATE
    t = {
        "x": rand(5, h),
        "col.weight": rand(10, h),
        "col.bias": rand(10),
        "gate.weight": rand(inter, h),
        "up.weight": rand(inter, h),
        "down.weight": rand(h, inter),
        "down.bias": rand(h),
        "embed.weight": rand(13, h),
        "head.weight": rand(13, h),
        "ids": torch.tensor([0, 12, 4, 5, 8, 9, 3, 1]),
    }
    for key, (heads, kv_heads) in worker.HEAD_LAYOUTS.items():
        t[f"{key}.q.weight"], t[f"{key}.q.bias"] = rand(heads * hd, h), rand(heads * hd)
        for name in ("k", "v"):
            t[f"{key}.{name}.weight"], t[f"{key}.{name}.bias"] = rand(kv_heads * hd, h), rand(kv_heads * hd)
        t[f"{key}.o.weight"] = rand(h, heads * hd)
    return t


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("layers3")
    tensors = dense_tensors()
    save_file(tensors, str(tmp / "dense.safetensors"))
    mp.spawn(
        worker.run_rank,
        args=(WORLD, free_port(), str(tmp / "dense.safetensors"), str(tmp)),
        nprocs=WORLD,
        join=True,
    )
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return {"t": tensors, "ranks": ranks}


def test_column_parallel_holds_a_slice_and_the_gathered_output_equals_the_dense_linear(world):
    t = world["t"]
    dense = F.linear(t["x"], t["col.weight"], t["col.bias"])
    assert [r["column_local"].shape[-1] for r in world["ranks"]] == [4, 3, 3]
    for r in world["ranks"]:
        torch.testing.assert_close(r["column_gathered"], dense, atol=ATOL, rtol=0)


def test_merged_gate_up_splits_each_part_on_its_own(world):
    t = world["t"]
    for r in world["ranks"]:
        torch.testing.assert_close(r["gate_gathered"], F.linear(t["x"], t["gate.weight"]), atol=ATOL, rtol=0)
        torch.testing.assert_close(r["up_gathered"], F.linear(t["x"], t["up.weight"]), atol=ATOL, rtol=0)


def test_mlp_with_row_parallel_down_projection_equals_the_dense_mlp_with_bias_once(world):
    t = world["t"]
    x = t["x"]
    dense = F.linear(F.silu(F.linear(x, t["gate.weight"])) * F.linear(x, t["up.weight"]), t["down.weight"], t["down.bias"])
    for r in world["ranks"]:
        torch.testing.assert_close(r["mlp"], dense, atol=ATOL, rtol=0)


@pytest.mark.parametrize("key", list(worker.HEAD_LAYOUTS))
def test_qkv_rank_slices_are_the_dense_projections_of_its_heads(world, key):
    t = world["t"]
    hd = worker.HEAD_DIM
    q = F.linear(t["x"], t[f"{key}.q.weight"], t[f"{key}.q.bias"])
    k = F.linear(t["x"], t[f"{key}.k.weight"], t[f"{key}.k.bias"])
    v = F.linear(t["x"], t[f"{key}.v.weight"], t[f"{key}.v.bias"])
    heads, kv_heads = worker.HEAD_LAYOUTS[key]
    covered = []
    for r in world["ranks"]:
        q0, q1, k0, k1 = r[f"{key}.partition"]
        # Every query head of this rank uses a KV head this rank holds.
        group = heads // kv_heads
        assert k0 <= q0 // group and (q1 - 1) // group < k1
        covered += range(q0, q1)
        torch.testing.assert_close(r[f"{key}.q"], q[:, q0 * hd : q1 * hd], atol=ATOL, rtol=0)
        torch.testing.assert_close(r[f"{key}.k"], k[:, k0 * hd : k1 * hd], atol=ATOL, rtol=0)
        torch.testing.assert_close(r[f"{key}.v"], v[:, k0 * hd : k1 * hd], atol=ATOL, rtol=0)
    assert covered == list(range(heads))


def test_two_kv_heads_on_three_ranks_replicate_one_of_them(world):
    kv_ranges = [r["6q2kv.partition"][2:] for r in world["ranks"]]
    assert kv_ranges == [(0, 1), (0, 1), (1, 2)]


@pytest.mark.parametrize("key", list(worker.HEAD_LAYOUTS))
def test_attention_with_row_parallel_o_proj_equals_dense_attention(world, key):
    t = world["t"]
    hd = worker.HEAD_DIM
    heads, kv_heads = worker.HEAD_LAYOUTS[key]
    tokens = t["x"].shape[0]
    q = F.linear(t["x"], t[f"{key}.q.weight"], t[f"{key}.q.bias"]).view(tokens, heads, hd)
    k = F.linear(t["x"], t[f"{key}.k.weight"], t[f"{key}.k.bias"]).view(tokens, kv_heads, hd)
    v = F.linear(t["x"], t[f"{key}.v.weight"], t[f"{key}.v.bias"]).view(tokens, kv_heads, hd)
    dense = F.linear(worker.attention(q, k, v), t[f"{key}.o.weight"])
    for r in world["ranks"]:
        torch.testing.assert_close(r[f"{key}.attention"], dense, atol=ATOL, rtol=0)


def test_vocab_parallel_embedding_with_uneven_rows_equals_the_dense_lookup(world):
    t = world["t"]
    assert [r["embedding_rows"] for r in world["ranks"]] == [5, 4, 4]
    for r in world["ranks"]:
        torch.testing.assert_close(r["embedding"], F.embedding(t["ids"], t["embed.weight"]), atol=0, rtol=0)


def test_untied_and_tied_lm_heads_gather_the_full_vocabulary_logits(world):
    t = world["t"]
    assert [r["lm_head_rows"] for r in world["ranks"]] == [5, 4, 4]
    for r in world["ranks"]:
        torch.testing.assert_close(r["lm_head_untied"], t["x"] @ t["head.weight"].T, atol=ATOL, rtol=0)
        torch.testing.assert_close(r["lm_head_tied"], t["x"] @ t["embed.weight"].T, atol=ATOL, rtol=0)
        assert r["lm_head_untied"].dtype == torch.float32
    # All-gathered logits are bit-identical on every rank (sampling must not diverge).
    first = world["ranks"][0]["lm_head_untied"]
    for r in world["ranks"][1:]:
        assert torch.equal(r["lm_head_untied"], first)
