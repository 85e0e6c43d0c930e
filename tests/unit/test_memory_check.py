"""Refusing a model larger than memory: the estimate from safetensors headers, and the refusal's figures."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from text_generation_server.memory_check import ModelTooLargeError, check_model_fits, footprint

GIB = 2**30
MIB = 2**20
CPU = torch.device("cpu")

# name -> (safetensors dtype, shape, bytes per element as stored)
TENSORS = {
    "model.big.weight": ("F32", [1024, 1024, 768], 4),  # 3 GiB
    "model.half.weight": ("F16", [MIB], 2),  # 2 MiB stored, 4 MiB in float32
    "model.packed.qweight": ("I32", [256 * 1024], 4),  # 1 MiB, whatever the serving dtype
}


def write_header_only_checkpoint(directory: Path) -> Path:
    """A safetensors file holding only its header: the estimate must never need the data."""
    directory.mkdir()
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, (dtype, shape, size) in TENSORS.items():
        nbytes = size
        for dim in shape:
            nbytes *= dim
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    (directory / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    return directory


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    return write_header_only_checkpoint(tmp_path / "model")


# In float32: floating tensors at 4 bytes per element, the packed integers as stored.
TOTAL_FP32 = 3 * GIB + 4 * MIB + 1 * MIB
TOTAL_BF16 = 1536 * MIB + 2 * MIB + 1 * MIB


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def test_footprint_counts_floating_tensors_at_the_serving_dtype_and_integers_as_stored(checkpoint):
    assert footprint(checkpoint, torch.float32, 1).total_bytes == TOTAL_FP32
    assert footprint(checkpoint, torch.bfloat16, 1).total_bytes == TOTAL_BF16
    two = footprint(checkpoint, torch.float32, 2)
    assert two.per_shard_bytes == TOTAL_FP32 // 2
    three = footprint(checkpoint, torch.float32, 3)
    assert three.per_shard_bytes * 3 >= TOTAL_FP32 > (three.per_shard_bytes - 1) * 3  # rounded up


def test_a_model_that_does_not_fit_is_refused_with_required_and_available_gib(checkpoint):
    available = 2 * GIB  # 1 GiB for each of 2 shards; each needs about 1.5 GiB
    with pytest.raises(ModelTooLargeError) as err:
        check_model_fits(checkpoint, torch.float32, 2, CPU, available_bytes=available)
    message = str(err.value)
    assert message.startswith("model too large for memory: ")
    assert f"each shard needs {gib(TOTAL_FP32 / 2)} for its weights" in message
    assert f"({gib(TOTAL_FP32)} in float32 over 2 shards)" in message
    assert f"but only {gib(available / 2)} is available to it ({gib(available)} available on this host / 2 shards)" in message
    assert "--dtype" in message and "quantized checkpoint" in message  # what to do about it


def test_a_model_that_fits_passes_and_returns_the_estimate(checkpoint):
    fits = check_model_fits(checkpoint, torch.float32, 2, CPU, available_bytes=4 * GIB)
    assert fits is not None and fits.per_shard_bytes == TOTAL_FP32 // 2 and fits.total_bytes == TOTAL_FP32


def test_the_boundary_is_the_per_shard_share(checkpoint):
    exact = TOTAL_FP32  # two shards, each needing exactly half
    assert check_model_fits(checkpoint, torch.float32, 2, CPU, available_bytes=exact) is not None
    with pytest.raises(ModelTooLargeError):
        check_model_fits(checkpoint, torch.float32, 2, CPU, available_bytes=exact - 2)


def test_a_smaller_dtype_can_make_it_fit(checkpoint):
    available = 2 * GIB
    with pytest.raises(ModelTooLargeError):
        check_model_fits(checkpoint, torch.float32, 1, CPU, available_bytes=available)
    assert check_model_fits(checkpoint, torch.bfloat16, 1, CPU, available_bytes=available).total_bytes == TOTAL_BF16


@pytest.mark.parametrize("quantize", ["bitsandbytes", "bitsandbytes-nf4", "bitsandbytes-fp4"])
def test_weights_quantized_while_loading_are_not_estimated(checkpoint, quantize):
    assert check_model_fits(checkpoint, torch.float32, 1, CPU, quantize=quantize, available_bytes=1) is None


def test_a_gpu_shard_is_checked_against_its_gpus_free_memory_not_the_hosts(checkpoint):
    gpu = torch.device("cuda", 1)
    # Each of 2 shards needs about 1.5 GiB of its own GPU (not a share of one pool).
    assert check_model_fits(checkpoint, torch.float32, 2, gpu, available_bytes=2 * GIB) is not None
    with pytest.raises(ModelTooLargeError) as err:
        check_model_fits(checkpoint, torch.float32, 2, gpu, available_bytes=GIB)
    message = str(err.value)
    assert message.startswith("model too large for cuda:1: ")
    assert f"each shard needs {gib(TOTAL_FP32 / 2)} for its weights" in message
    assert f"but {gib(GIB)} of its memory is free" in message and "quantized checkpoint" in message
