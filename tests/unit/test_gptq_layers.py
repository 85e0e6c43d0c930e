"""GPTQ row- and column-parallel layers: each rank's slice, summed or concatenated, equals the dense matmul.

Ranks run one after another in this process with collectives that return
their input, so the test adds the row-parallel partial products itself.
"""

from __future__ import annotations

import pytest
import torch
from gptq_random import activations, cpu_int4_kernels, random_gptq
from safetensors.torch import save_file
from text_generation_server.distributed import Distributed
from text_generation_server.kernels.config import KernelConfig
from text_generation_server.layers.linear import ColumnParallelLinear, RowParallelLinear
from text_generation_server.layers.quant.gptq import GPTQConfig
from text_generation_server.weights import CheckpointError, Weights, shard_range

CPU = torch.device("cpu")


class NoCommDistributed(Distributed):
    def __init__(self, rank: int, world_size: int) -> None:
        super().__init__(rank, world_size, CPU, "none")

    def all_reduce(self, t):
        return t


def checkpoint(tmp_path, k: int, n: int, **layout) -> tuple[Weights, torch.Tensor, GPTQConfig]:
    weights, dense = random_gptq(k, n, **layout)
    path = tmp_path / "layer.safetensors"
    save_file({f"lin.{f}": getattr(weights, f).contiguous()
               for f in ("qweight", "qzeros", "scales", "g_idx")}, str(path))
    config = GPTQConfig(
        bits=layout.get("bits", 4), group_size=layout.get("group_size", 64),
        desc_act=layout.get("desc_act", False), sym=layout.get("sym", True),
        checkpoint_format=layout.get("fmt", "gptq"), kernels=KernelConfig(gptq_kernel="gptq-reference"),
    )
    return Weights([path], device=CPU, dtype=torch.float32, dist=NoCommDistributed(0, 1)), dense, config


def load(layer, weights: Weights) -> None:
    for name in ("qweight", "qzeros", "scales", "g_idx"):
        param = getattr(layer, name)
        param.weight_loader(param, weights, f"lin.{name}")
    layer.quant_method.process_weights_after_loading(layer)


ROW_CASES = [
    # (layout, k, world, input ranges or None for an even split, groups split on every rank)
    pytest.param(dict(group_size=32), 128, 2, None, True, id="g32-aligned"),
    pytest.param(dict(group_size=64, sym=False, fmt="gptq_v2"), 128, 2, [(0, 32), (32, 128)], False,
                 id="g64-straddling"),
    pytest.param(dict(group_size=64, desc_act=True, sym=False), 128, 2, None, False, id="act-order"),
    pytest.param(dict(group_size=-1), 128, 2, None, False, id="per-row"),
    pytest.param(dict(group_size=64), 160, 2, [(0, 128), (128, 160)], True, id="g64-ragged-last"),
    pytest.param(dict(group_size=32, desc_act=True), 96, 3, None, False, id="act-order-3-ranks"),
]
# 3-bit codes cross word boundaries: slices move in whole 32-feature (3-word) units, and the
# output features (qzeros) fill whole 3-word units too, so these layers have 64 outputs.
THREE_BIT_ROW_CASES = [
    pytest.param(dict(bits=3, group_size=32), 128, 2, None, True, id="3-bit-g32"),
    pytest.param(dict(bits=3, group_size=-1, sym=False), 96, 2, None, False, id="3-bit-per-row-uneven"),
    pytest.param(dict(bits=3, group_size=48), 192, 2, None, True, id="3-bit-g48"),
    pytest.param(dict(bits=3, group_size=64, desc_act=True, sym=False), 128, 2, None, False,
                 id="3-bit-act-order"),
    pytest.param(dict(bits=3, group_size=64), 160, 2, [(0, 128), (128, 160)], True, id="3-bit-g64-ragged-last"),
]


def row_parallel_sum(tmp_path, kernel, layout, k, n, world, ranges, split) -> None:
    weights, dense, config = checkpoint(tmp_path, k, n, **layout)
    config.kernel = kernel
    x = activations(3, k)
    total = torch.zeros(3, n)
    for rank in range(world):
        start, stop = ranges[rank] if ranges else shard_range(k, world, rank, config.input_alignment())
        layer = RowParallelLinear(k, n, bias=False, quant_method=config(f"lin{rank}"),
                                  dist=NoCommDistributed(rank, world), dtype=torch.float32, device=CPU,
                                  input_range=(start, stop))
        load(layer, weights)
        assert (layer.quant_method.group_offset > 0) == (split and start > 0)
        total += layer(x[:, start:stop])
    want = x @ dense.t()
    if layer.quant_method.kernel_name(layer) == "gptq-reference":
        torch.testing.assert_close(total, want, atol=1e-4, rtol=0)
    else:
        assert float((total - want).norm() / want.norm()) < 1e-2


@pytest.mark.parametrize("kernel", ["gptq-reference", *cpu_int4_kernels()])
@pytest.mark.parametrize("layout,k,world,ranges,split", ROW_CASES)
def test_row_parallel_partial_products_sum_to_the_dense_matmul(tmp_path, kernel, layout, k, world, ranges, split):
    row_parallel_sum(tmp_path, kernel, layout, k, 48, world, ranges, split)


@pytest.mark.parametrize("layout,k,world,ranges,split", THREE_BIT_ROW_CASES)
def test_3_bit_row_parallel_partial_products_sum_to_the_dense_matmul(tmp_path, layout, k, world, ranges, split):
    # A 4-bit CPU kernel is asked for first and declines: the reference takes the layer.
    row_parallel_sum(tmp_path, cpu_int4_kernels()[0], layout, k, 64, world, ranges, split)


@pytest.mark.parametrize("layout", [dict(group_size=32), dict(group_size=32, desc_act=True, sym=False)])
def test_column_parallel_slices_concatenate_to_the_dense_matmul(tmp_path, layout):
    weights, dense, config = checkpoint(tmp_path, 64, 96, **layout)
    x = activations(2, 64)
    pieces = []
    for rank in range(2):
        layer = ColumnParallelLinear(64, 96, bias=False, quant_method=config(f"lin{rank}"),
                                     dist=NoCommDistributed(rank, 2), dtype=torch.float32, device=CPU)
        load(layer, weights)
        pieces.append(layer(x))
    torch.testing.assert_close(torch.cat(pieces, -1), x @ dense.t(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("layout", [dict(bits=3, group_size=32), dict(bits=3, group_size=32, desc_act=True)])
def test_3_bit_column_parallel_slices_concatenate_to_the_dense_matmul(tmp_path, layout):
    weights, dense, config = checkpoint(tmp_path, 64, 64, **layout)
    x = activations(2, 64)
    pieces = []
    for rank in range(2):
        layer = ColumnParallelLinear(64, 64, bias=False, quant_method=config(f"lin{rank}"),
                                     dist=NoCommDistributed(rank, 2), dtype=torch.float32, device=CPU)
        load(layer, weights)
        pieces.append(layer(x))
    torch.testing.assert_close(torch.cat(pieces, -1), x @ dense.t(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("start,stop", [(0, 48), (48, 96), (0, 80)])
def test_a_3_bit_row_parallel_split_inside_a_word_is_refused_naming_the_alignment(tmp_path, start, stop):
    _, _, config = checkpoint(tmp_path, 96, 32, bits=3, group_size=-1)
    with pytest.raises(ValueError, match=rf"input features \[{start}, {stop}\) of 96 on this rank do not start "
                                         r"and end on whole 3-bit words of qweight \(32 features per 3 words\); "
                                         r"3-bit layers split their inputs only at multiples of 32"):
        RowParallelLinear(96, 32, bias=False, quant_method=config("lin"), dist=NoCommDistributed(1, 2),
                          dtype=torch.float32, device=CPU, input_range=(start, stop))


def test_a_3_bit_column_parallel_split_inside_a_word_is_refused_naming_the_alignment(tmp_path):
    _, _, config = checkpoint(tmp_path, 64, 96, bits=3, group_size=32)
    with pytest.raises(ValueError, match=r"output features \[48, 96\) of 96 on this rank do not start and end on "
                                         r"whole 3-bit words of qzeros \(32 features per 3 words\)"):
        ColumnParallelLinear(64, 96, bias=False, quant_method=config("lin"), dist=NoCommDistributed(1, 2),
                             dtype=torch.float32, device=CPU)


def test_a_scrambled_g_idx_with_desc_act_false_is_refused_where_groups_are_split(tmp_path):
    weights, _, _ = checkpoint(tmp_path, 128, 32, group_size=32, desc_act=True)
    config = GPTQConfig(bits=4, group_size=32, desc_act=False)
    layer = RowParallelLinear(128, 32, bias=False, quant_method=config("lin"),
                              dist=NoCommDistributed(1, 2), dtype=torch.float32, device=CPU)
    with pytest.raises(CheckpointError, match="desc_act"):
        load(layer, weights)
