"""Refuse a model that cannot fit in host memory before any shard starts loading it.

The estimate reads only the safetensors headers: every floating tensor at the
serving dtype's size, every integer tensor (packed quantized weights) at its
stored size, divided between the shards. Loading would otherwise run the host
out of memory halfway, and the kernel's OOM killer ends a shard with no
message at all.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from loguru import logger

from text_generation_server.weights import CheckpointError, checkpoint_files

# safetensors dtype codes -> bytes per element, and whether the tensor is floating point.
_DTYPES: dict[str, tuple[int, bool]] = {
    "F64": (8, True), "F32": (4, True), "F16": (2, True), "BF16": (2, True),
    "F8_E4M3": (1, True), "F8_E5M2": (1, True),
    "I64": (8, False), "I32": (4, False), "I16": (2, False), "I8": (1, False),
    "U64": (8, False), "U32": (4, False), "U16": (2, False), "U8": (1, False), "BOOL": (1, False),
}


class ModelTooLargeError(RuntimeError):
    """The model's weights for this shard exceed the memory available to it."""


@dataclass(frozen=True)
class Footprint:
    total_bytes: int  # the whole model at the serving dtype
    per_shard_bytes: int


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def read_header(path: Path) -> dict:
    """The JSON header of one safetensors file (reads a few kilobytes, maps nothing)."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100 * 2**20:
                raise CheckpointError(f"{path}: safetensors header claims {length} bytes; the file is corrupt")
            header = json.loads(f.read(length))
    except (OSError, struct.error, ValueError) as e:
        raise CheckpointError(f"cannot read safetensors file {path}: {e}") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"cannot read safetensors file {path}: the header is not a JSON object")
    return header


def footprint(model_dir: Path, dtype: torch.dtype, world_size: int) -> Footprint:
    """Bytes the weights take at ``dtype``, in all and per shard."""
    element = torch.empty((), dtype=dtype).element_size()
    total = 0
    for path in checkpoint_files(model_dir):
        for name, info in read_header(path).items():
            if name == "__metadata__" or not isinstance(info, dict):
                continue
            size, floating = _DTYPES.get(str(info.get("dtype")), (4, True))
            numel = 1
            for dim in info.get("shape", []):
                numel *= int(dim)
            total += numel * (element if floating else size)
    return Footprint(total, -(-total // world_size))


def check_model_fits(
    model_dir: Path,
    dtype: torch.dtype,
    world_size: int,
    device: torch.device,
    quantize: str | None = None,
    available_bytes: int | None = None,
) -> Footprint | None:
    """Raise :class:`ModelTooLargeError` naming the required and available figures when the weights cannot fit.

    A CPU shard's share is the host's available memory divided by the ``world_size`` shards
    starting on it; a GPU shard's is its own GPU's free memory. Returns the estimate, or None
    when it does not apply (weights quantized while loading).
    """
    from text_generation_server.layers.quant.registry import quantizes_at_load

    # Quantization applied while loading makes the resident weights smaller than this estimate.
    if quantizes_at_load(quantize):
        return None
    if device.type == "cuda":
        return _check_gpu(model_dir, dtype, world_size, device, available_bytes)
    if device.type != "cpu":
        return None
    from text_generation_server.engine.kv_cache import host_available_bytes

    need = footprint(model_dir, dtype, world_size)
    host = host_available_bytes() if available_bytes is None else available_bytes
    share = host // world_size
    dtype_name = str(dtype).removeprefix("torch.")
    shards = f"{world_size} shard{'s' if world_size > 1 else ''}"
    if need.per_shard_bytes > share:
        raise ModelTooLargeError(
            f"model too large for memory: each shard needs {_gib(need.per_shard_bytes)} for its weights "
            f"({_gib(need.total_bytes)} in {dtype_name} over {shards}) but only {_gib(share)} is available "
            f"to it ({_gib(host)} available on this host / {shards}); use a host with more memory, "
            f"a smaller --dtype, or a quantized checkpoint"
        )
    logger.info(
        f"Weights need {_gib(need.per_shard_bytes)} per shard ({_gib(need.total_bytes)} in {dtype_name}); "
        f"{_gib(share)} available to each of {shards}"
    )
    return need


def _check_gpu(
    model_dir: Path, dtype: torch.dtype, world_size: int, device: torch.device, available_bytes: int | None
) -> Footprint:
    """The shard's weights against its GPU's free memory (before the KV cache, which is sized after)."""
    import torch

    need = footprint(model_dir, dtype, world_size)
    free = torch.cuda.mem_get_info(device)[0] if available_bytes is None else available_bytes
    dtype_name = str(dtype).removeprefix("torch.")
    shards = f"{world_size} shard{'s' if world_size > 1 else ''}"
    if need.per_shard_bytes > free:
        raise ModelTooLargeError(
            f"model too large for {device}: each shard needs {_gib(need.per_shard_bytes)} for its weights "
            f"({_gib(need.total_bytes)} in {dtype_name} over {shards}) but {_gib(free)} of its memory is free; "
            f"use more shards (one GPU each), a quantized checkpoint, or a GPU with more memory"
        )
    logger.info(f"Weights need {_gib(need.per_shard_bytes)} per shard on {device}; {_gib(free)} free there")
    return need
