"""Writing a GPTQ checkpoint in the AutoGPTQ "v1" layout.

The checkpoint is assembled in a temporary directory beside the output and
renamed into place only once complete, so a failed or interrupted run never
leaves something that looks like a valid checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import torch
from loguru import logger
from safetensors.torch import save_file

from text_generation_server.quantize.checkpoint import SafetensorsCheckpoint
from text_generation_server.quantize.gptq import QuantSpec

MAX_SHARD_BYTES = 4 << 30
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack", ".onnx")
_REWRITTEN = {"config.json", "quantize_config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"}
_FP16_MAX = torch.finfo(torch.float16).max


class OutputDirError(ValueError):
    """OUTPUT_DIR cannot be written as asked."""


def _version() -> str:
    try:
        return metadata.version("text-generation-server")
    except metadata.PackageNotFoundError:
        return "unknown"


def quantization_config(spec: QuantSpec, true_sequential: bool, calibration: dict | None = None) -> dict:
    """The ``quantization_config`` / ``quantize_config.json`` content for a v1 checkpoint."""
    config = {
        "bits": spec.bits,
        "group_size": spec.group_size,
        "damp_percent": spec.percdamp,
        "desc_act": spec.act_order,
        "static_groups": spec.static_groups,
        "sym": spec.sym,
        "true_sequential": true_sequential,
        "act_group_aware": spec.group_aware_order and not spec.act_order,
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
    }
    meta = {"quantizer": [f"text-generation-server:{_version()}"]}
    if calibration:
        meta["calibration"] = calibration
    config["meta"] = meta
    return config


def check_output_dir(output_dir: Path, overwrite: bool, source_dir: Path | None = None) -> None:
    """Fail before any work when OUTPUT_DIR cannot be used."""
    output_dir = Path(output_dir)
    if source_dir is not None and output_dir.resolve() == Path(source_dir).resolve():
        raise OutputDirError(f"OUTPUT_DIR {output_dir} is the model's own directory; choose another directory")
    if output_dir.exists():
        if not output_dir.is_dir():
            raise OutputDirError(f"OUTPUT_DIR {output_dir} exists and is not a directory")
        if any(output_dir.iterdir()) and not overwrite:
            raise OutputDirError(
                f"OUTPUT_DIR {output_dir} exists and is not empty; pass --overwrite to replace it"
            )
    parent = output_dir.resolve().parent
    if not parent.is_dir():
        raise OutputDirError(f"the parent directory of OUTPUT_DIR ({parent}) does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputDirError(f"the parent directory of OUTPUT_DIR ({parent}) is not writable")


@contextmanager
def atomic_output_dir(output_dir: Path) -> Iterator[Path]:
    """Yield a fresh temp directory beside ``output_dir``; move it into place on success.

    On any exception (including KeyboardInterrupt) the temp directory is
    removed and ``output_dir`` is left as it was.
    """
    output_dir = Path(output_dir).resolve()
    tmp = output_dir.parent / f".{output_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if output_dir.exists():
        old = output_dir.parent / f".{output_dir.name}.old-{os.getpid()}"
        output_dir.rename(old)
    tmp.rename(output_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _to_fp16(name: str, tensor: torch.Tensor) -> torch.Tensor:
    if not tensor.is_floating_point():
        return tensor
    big = tensor.abs().max() > _FP16_MAX if tensor.numel() else False
    if big:
        logger.warning(f"{name} has values beyond the float16 range; they are clamped to ±{_FP16_MAX:g}")
        tensor = tensor.clamp(-_FP16_MAX, _FP16_MAX)
    return tensor.to(torch.float16).contiguous()


def _shard(names: list[str], sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    current = 0
    for name in names:
        if shards[-1] and current + sizes[name] > max_bytes:
            shards.append([])
            current = 0
        shards[-1].append(name)
        current += sizes[name]
    return shards


def write_checkpoint(
    out_dir: Path,
    source_dir: Path,
    quantized: dict[str, torch.Tensor],
    replaced: set[str],
    quant_config: dict,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> list[Path]:
    """Write weights, config.json (with ``quantization_config``), quantize_config.json
    and the source's tokenizer/generation files into ``out_dir``.

    ``quantized`` holds the packed tensors; every source tensor not named in
    ``replaced`` is copied in float16 (embeddings, norms, LM head).
    """
    out_dir = Path(out_dir)
    source_dir = Path(source_dir)
    source = SafetensorsCheckpoint(source_dir)
    tensors: dict[str, torch.Tensor] = dict(quantized)
    for name in source.keys():
        if name not in replaced:
            tensors[name] = _to_fp16(name, source.get(name))
    names = sorted(tensors)
    sizes = {n: tensors[n].numel() * tensors[n].element_size() for n in names}
    shards = _shard(names, sizes, max_shard_bytes)
    written: list[Path] = []
    if len(shards) == 1:
        files = ["model.safetensors"]
    else:
        files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file, shard in zip(files, shards, strict=True):
        save_file({n: tensors[n] for n in shard}, str(out_dir / file), metadata={"format": "pt"})
        written.append(out_dir / file)
        weight_map.update(dict.fromkeys(shard, file))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        written.append(out_dir / "model.safetensors.index.json")

    config = json.loads((source_dir / "config.json").read_text())
    config["quantization_config"] = quant_config
    if "dtype" in config or "torch_dtype" not in config:
        config["dtype"] = "float16"
    if "torch_dtype" in config:
        config["torch_dtype"] = "float16"
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out_dir / "quantize_config.json").write_text(json.dumps(quant_config, indent=2) + "\n")
    written += [out_dir / "config.json", out_dir / "quantize_config.json"]

    for f in sorted(source_dir.iterdir()):
        if not f.is_file() or f.name.startswith(".") or f.name in _REWRITTEN or f.suffix in _WEIGHT_SUFFIXES:
            continue
        shutil.copy(f, out_dir / f.name)
        written.append(out_dir / f.name)
    # safetensors creates owner-only files; a checkpoint is meant to be shared
    umask = os.umask(0)
    os.umask(umask)
    for f in written:
        f.chmod(0o666 & ~umask)
    return written
