"""Weights reads exactly the requested slices of safetensors tensors."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from text_generation_server.distributed import Distributed
from text_generation_server.weights import CheckpointError, Weights, checkpoint_files, shard_range


def rank_of(rank: int, world_size: int) -> Distributed:
    # Weights only reads rank and world size; no process group is needed.
    return Distributed(rank, world_size, torch.device("cpu"), "none")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    g = torch.Generator().manual_seed(0)
    tensors = {
        "w": torch.randn(10, 7, generator=g),
        "half": torch.randn(6, 4, generator=g).half(),
        "ints": torch.arange(24, dtype=torch.int32).reshape(4, 6),
        "fused": torch.randn(3 + 5 + 5, 4, generator=g),
    }
    save_file(tensors, str(path / "model.safetensors"))
    return path


def test_shard_range_examples():
    assert [shard_range(5, 2, r) for r in range(2)] == [(0, 3), (3, 5)]
    assert [shard_range(9, 3, r) for r in range(3)] == [(0, 3), (3, 6), (6, 9)]
    # Alignment keeps whole units (e.g. quantization groups) on one rank.
    assert [shard_range(512, 3, r, align=128) for r in range(3)] == [
        (0, 256),
        (256, 384),
        (384, 512),
    ]


@given(size=st.integers(0, 300), world=st.integers(1, 8), align=st.sampled_from([1, 2, 8, 32]))
def test_shard_range_covers_everything_once_and_is_balanced(size, world, align):
    ranges = [shard_range(size, world, r, align) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == size
    for (_, stop), (start, _) in zip(ranges, ranges[1:], strict=False):
        assert stop == start
    units = [-(-(b - a) // align) for a, b in ranges]
    assert max(units) - min(units) <= 1
    assert all(a % align == 0 for a, b in ranges if b > a)


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("dim", [0, 1])
def test_get_sharded_returns_this_ranks_slice_of_the_full_tensor(checkpoint, world, dim):
    full = load_file(str(checkpoint / "model.safetensors"))["w"]
    pieces = []
    for rank in range(world):
        weights = Weights(
            checkpoint_files(checkpoint),
            device=torch.device("cpu"),
            dtype=torch.float32,
            dist=rank_of(rank, world),
        )
        piece = weights.get_sharded("w", dim)
        start, stop = shard_range(full.shape[dim], world, rank)
        torch.testing.assert_close(piece, full.narrow(dim, start, stop - start), rtol=0, atol=0)
        pieces.append(piece)
    torch.testing.assert_close(torch.cat(pieces, dim=dim), full, rtol=0, atol=0)


def test_get_range_and_get_slices_take_arbitrary_blocks(checkpoint):
    full = load_file(str(checkpoint / "model.safetensors"))["w"]
    weights = Weights(
        checkpoint_files(checkpoint),
        device=torch.device("cpu"),
        dtype=torch.float32,
        dist=rank_of(0, 1),
    )
    torch.testing.assert_close(weights.get_range("w", 0, 2, 9), full[2:9], rtol=0, atol=0)
    torch.testing.assert_close(weights.get_range("w", -1, 3, 4), full[:, 3:4], rtol=0, atol=0)
    torch.testing.assert_close(
        weights.get_slices("w", {0: (1, 4), 1: (2, 6)}), full[1:4, 2:6], rtol=0, atol=0
    )
    assert weights.get_range("w", 0, 5, 5).shape == (0, 7)


def test_get_packed_splits_each_part_on_its_own(checkpoint):
    full = load_file(str(checkpoint / "model.safetensors"))["fused"]
    parts = full.split([3, 5, 5])
    weights = Weights(
        checkpoint_files(checkpoint),
        device=torch.device("cpu"),
        dtype=torch.float32,
        dist=rank_of(1, 2),
    )
    expected = torch.cat([parts[0][2:3], parts[1][3:5], parts[2][3:5]])
    torch.testing.assert_close(weights.get_packed("fused", 0, [3, 5, 5]), expected, rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="fused"):
        weights.get_packed("fused", 0, [3, 5])


def test_floats_are_cast_to_the_serving_dtype_and_integers_kept(checkpoint):
    weights = Weights(
        checkpoint_files(checkpoint),
        device=torch.device("cpu"),
        dtype=torch.bfloat16,
        dist=rank_of(0, 1),
    )
    assert weights.get_tensor("half").dtype == torch.bfloat16
    assert weights.get_range("w", 0, 0, 2).dtype == torch.bfloat16
    assert weights.get_tensor("ints").dtype == torch.int32
    assert weights.get_tensor("half", cast=False).dtype == torch.float16
    torch.testing.assert_close(
        weights.get_range("ints", 1, 2, 4),
        torch.arange(24, dtype=torch.int32).reshape(4, 6)[:, 2:4],
    )


def test_missing_tensor_and_bad_range_name_the_tensor(checkpoint):
    weights = Weights(
        checkpoint_files(checkpoint),
        device=torch.device("cpu"),
        dtype=torch.float32,
        dist=rank_of(0, 1),
    )
    assert weights.has("w") and not weights.has("nope")
    assert weights.get_shape("w") == [10, 7]
    with pytest.raises(CheckpointError, match="tensor 'nope' not found.*model.safetensors"):
        weights.get_tensor("nope")
    with pytest.raises(CheckpointError, match=r"'w' in model.safetensors has shape \[10, 7\]"):
        weights.get_range("w", 0, 8, 12)


def test_sharded_index_routes_each_tensor_to_its_file(tmp_path):
    a, b = torch.randn(4, 3), torch.randn(2)
    save_file({"a": a}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": b}, str(tmp_path / "model-00002-of-00002.safetensors"))
    # A stray file that the index does not list must not be read.
    save_file({"a": torch.zeros(4, 3)}, str(tmp_path / "stale.safetensors"))
    index = {
        "metadata": {},
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
        },
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    files = checkpoint_files(tmp_path)
    assert [f.name for f in files] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    weights = Weights(files, device=torch.device("cpu"), dtype=torch.float32, dist=rank_of(0, 1))
    torch.testing.assert_close(weights.get_tensor("a"), a)
    torch.testing.assert_close(weights.get_tensor("b"), b)
    assert weights.file_of("b").name == "model-00002-of-00002.safetensors"


def test_directory_without_safetensors_is_a_clear_error(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no .safetensors files"):
        checkpoint_files(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "missing.safetensors"}})
    )
    with pytest.raises(CheckpointError, match="missing.safetensors"):
        checkpoint_files(tmp_path)


@given(start=st.integers(0, 13), length=st.integers(0, 13))
def test_a_regrouped_view_reads_any_block_of_its_gathered_rows(checkpoint, start, length):
    """Falcon's fused [q q k v | q q k v | ...] rows read as q, k and v parts: any block of a
    part equals the same block of the gathered rows."""
    stop = min(start + length, 13)
    weights = Weights(checkpoint_files(checkpoint), device=torch.device("cpu"), dtype=torch.float32,
                      dist=rank_of(0, 1))  # fmt: skip
    full = load_file(str(checkpoint / "model.safetensors"))["fused"]
    # Rows 0..12 as 3 groups of [q, q, k, v] plus one trailing q row.
    parts = {"q": [(0, 2), (4, 6), (8, 10), (12, 13)], "k": [(2, 3), (6, 7), (10, 11)], "v": [(3, 4), (7, 8), (11, 12)]}
    weights.regroup("fused", 0, list(parts.items()))
    assert weights.names()[weights.names().index("q") : weights.names().index("q") + 3] == ["q", "k", "v"]
    for part, segments in parts.items():
        gathered = torch.cat([full[a:b] for a, b in segments])
        assert weights.get_shape(part) == list(gathered.shape)
        lo, hi = min(start, len(gathered)), min(stop, len(gathered))
        torch.testing.assert_close(weights.get_range(part, 0, lo, max(lo, hi)), gathered[lo : max(lo, hi)])
        torch.testing.assert_close(weights.get_range(part, 1, 1, 3), gathered[:, 1:3])


def test_regroup_refuses_parts_that_do_not_cover_the_tensor_once(checkpoint):
    weights = Weights(checkpoint_files(checkpoint), device=torch.device("cpu"), dtype=torch.float32,
                      dist=rank_of(0, 1))  # fmt: skip
    with pytest.raises(CheckpointError, match="do not cover dim 0"):
        weights.regroup("fused", 0, [("a", [(0, 5)]), ("b", [(4, 13)])])
    with pytest.raises(CheckpointError, match="has size 13 along dim 0, its parts cover 12"):
        weights.regroup("fused", 0, [("a", [(0, 5)]), ("b", [(5, 12)])])
