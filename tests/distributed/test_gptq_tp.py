"""GPTQ checkpoints split over 2 gloo ranks equal one rank and transformers on the dequantized weights.

The tiny model (hidden 64, 4 heads of 16, intermediate 128) splits o_proj's
input at feature 32 and down_proj's at 64, so a group size of 32 splits
scales/qzeros with the rows, 64 leaves o_proj's groups straddling the ranks
(each rank keeps them whole and indexes them through g_idx), and act-order
always keeps them whole. The test checkpoints give q/k/v (and gate/up)
different act-order permutations, which real tools do not, so per-part
kernels are exercised too.
"""

from __future__ import annotations

import functools
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gptq_tp_worker  # noqa: E402
from gptq_checkpoint import write_gptq_checkpoint  # noqa: E402

pytestmark = pytest.mark.slow

LAYOUTS = {
    "g32-sym-v1": dict(group_size=32),
    "g64-asym-v2": dict(group_size=64, sym=False, fmt="gptq_v2"),
    "g32-act-order-asym": dict(group_size=32, desc_act=True, sym=False),
    "per-row": dict(group_size=-1),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(world_size: int, out: Path, checkpoints: list[str]) -> list[dict]:
    mp.spawn(
        gptq_tp_worker.run_rank,
        args=(world_size, free_port(), checkpoints, str(out)),
        nprocs=world_size,
        join=True,
    )
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_llama) -> dict[str, tuple[str, str]]:
    root = tmp_path_factory.mktemp("gptq-tp")
    return {
        name: tuple(map(str, write_gptq_checkpoint(tiny_llama, root / name, **layout)))
        for name, layout in LAYOUTS.items()
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory, checkpoints) -> dict[int, list[dict]]:
    paths = [q for q, _ in checkpoints.values()]
    return {
        world: spawn(world, tmp_path_factory.mktemp(f"gptq-tp{world}"), paths)
        for world in (1, 2)
    }


@functools.cache
def transformers_logits(path: str) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([gptq_tp_worker.IDS])).logits[0]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_two_ranks_with_the_reference_kernel_equal_the_dequantized_model(runs, checkpoints, layout):
    quantized, dense = checkpoints[layout]
    want = transformers_logits(dense)
    ranks = [r[(quantized, "gptq-reference")] for r in runs[2]]
    assert ranks[0]["tp_plan"].startswith("2 shards")
    for result in ranks:
        assert result["kernel"] == "gptq-reference"
        torch.testing.assert_close(result["logits"], want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kernel", ["cpu-int4pack-bf16", "cpu-int4-avx2"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_two_ranks_with_each_cpu_int4_kernel_match_one_rank(runs, checkpoints, layout, kernel):
    quantized, dense = checkpoints[layout]
    if runs[1][0][(quantized, kernel)]["kernel"] == "unavailable":
        pytest.skip(f"{kernel} does not run here")
    one = runs[1][0][(quantized, kernel)]["logits"]
    want = transformers_logits(dense)
    for rank in runs[2]:
        result = rank[(quantized, kernel)]
        assert result["kernel"] == kernel
        assert float((result["logits"] - want).norm() / want.norm()) < 2e-2
        assert float((result["logits"] - one).norm() / one.norm()) < 2e-2
        assert torch.equal(result["logits"].argmax(-1), one.argmax(-1))


def test_group_aligned_row_splits_slice_scales_and_unaligned_ones_keep_them_whole(runs, checkpoints):
    aligned = checkpoints["g32-sym-v1"][0]
    straddling = checkpoints["g64-asym-v2"][0]
    rank1 = runs[2][1]
    # o_proj on rank 1 starts at input feature 32: group 1 of 32-wide groups, mid-group of 64.
    assert rank1[(aligned, "gptq-reference")]["o_proj_groups_split"] == 1
    assert rank1[(straddling, "gptq-reference")]["o_proj_groups_split"] == 0


def test_each_rank_holds_about_half_the_4_bit_weights(runs, checkpoints):
    quantized = checkpoints["g32-sym-v1"][0]
    whole = runs[1][0][(quantized, "cpu-int4pack-bf16")]
    for rank in runs[2]:
        part = rank[(quantized, "cpu-int4pack-bf16")]
        assert part["fp16_bytes"] == whole["fp16_bytes"] // 2
        assert part["weight_bytes"] / part["fp16_bytes"] == pytest.approx(0.3125, rel=0.02)
