"""bitsandbytes modes on two real gloo ranks against one rank.

Each rank quantizes only its own slice. Column splits hand each rank whole
output rows, so every mode equals the single-rank layer. Row splits hand
each rank half of every input row: 4-bit blocks (64 values) stay whole when
the half is a multiple of 64, so NF4/FP4 still equal one rank; LLM.int8's
ranks agree on each row's absmax (weights and activations), so it equals one
rank too, up to float summation order.
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

import bnb_tp_worker  # noqa: E402
from tiny_model import build_tiny_llama  # noqa: E402

FOUR_BIT = ("bitsandbytes-nf4", "bitsandbytes-fp4")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def layer_tensors(path: Path) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "col.weight": torch.randn(96, 128, generator=g) * 0.05,
        "col.bias": torch.randn(96, generator=g),
        "col.input": torch.randn(5, 128, generator=g),
        "row.weight": torch.randn(48, 256, generator=g) * 0.05,
        "row.bias": torch.randn(48, generator=g),
        "row.input": torch.randn(5, 256, generator=g),
    }
    tensors["row.input"][:, 7] *= 30  # an outlier feature on rank 0's half
    save_file(tensors, str(path))
    return tensors


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("bnb-tp")
    layer_file = tmp / "layers.safetensors"
    tensors = layer_tensors(layer_file)
    # head_dim 64, o_proj and down_proj inputs 256: every rank's row slice is 128 wide.
    model_dir = build_tiny_llama(
        tmp / "model", hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=256, num_hidden_layers=2,
    )  # fmt: skip
    mp.spawn(
        bnb_tp_worker.run_rank,
        args=(2, free_port(), str(layer_file), str(model_dir), str(tmp)),
        nprocs=2,
        join=True,
    )
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]

    from text_generation_server.distributed import init_distributed

    single = init_distributed(0, 1)
    one = {
        mode: {
            "layers": bnb_tp_worker.layer_outputs(single, layer_file, mode),
            "model": bnb_tp_worker.model_logits(single, model_dir, mode),
        }
        for mode in bnb_tp_worker.MODES
    }
    dense = bnb_tp_worker.model_logits(single, model_dir, None)
    return {"tensors": tensors, "ranks": ranks, "one": one, "dense_model": dense}


@pytest.mark.parametrize("mode", bnb_tp_worker.MODES)
def test_column_split_equals_one_rank(run, mode):
    expected = run["one"][mode]["layers"]["col"]
    for result in run["ranks"]:
        torch.testing.assert_close(result[mode]["layers"]["col"], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", FOUR_BIT)
def test_4bit_row_split_on_block_boundaries_equals_one_rank(run, mode):
    expected = run["one"][mode]["layers"]["row"]
    for result in run["ranks"]:
        torch.testing.assert_close(result[mode]["layers"]["row"], expected, atol=1e-5, rtol=0)


def test_int8_row_split_shares_row_scales_and_equals_one_rank(run):
    t = run["tensors"]
    dense = F.linear(t["row.input"], t["row.weight"], t["row.bias"])
    one = run["one"]["bitsandbytes"]["layers"]["row"]
    assert rel(one, dense) < 0.01
    for result in run["ranks"]:
        torch.testing.assert_close(result["bitsandbytes"]["layers"]["row"], one, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", FOUR_BIT)
def test_4bit_model_on_two_ranks_equals_one_rank(run, mode):
    expected = run["one"][mode]["model"]
    for result in run["ranks"]:
        torch.testing.assert_close(result[mode]["model"], expected, atol=1e-4, rtol=0)


def test_int8_model_on_two_ranks_equals_one_rank(run):
    expected = run["one"]["bitsandbytes"]["model"]
    dense = run["dense_model"]
    print(f"int8 logits vs dense: {rel(expected, dense):.4f}")
    for result in run["ranks"]:
        got = result["bitsandbytes"]["model"]
        print(f"int8 logits, two ranks vs one: {rel(got, expected):.2e}")
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode", bnb_tp_worker.MODES)
def test_every_rank_reports_a_bitsandbytes_kernel(run, mode):
    for result in run["ranks"]:
        layers = result[mode]["layers"]
        assert layers["col.kernel"].startswith("bnb-") and "-cpu[" in layers["col.kernel"]
