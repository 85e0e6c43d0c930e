"""Writing a GPTQ checkpoint in the AutoGPTQ "v1" layout.

The checkpoint is assembled in a temporary directory beside the output and
renamed into place only once complete, so a failed or interrupted run never
leaves something that looks like a valid checkpoint.

Tensors are streamed into the safetensors files one at a time (the header is
computed from shapes and dtypes first): the packed layers are read back from
the run's progress files and the copied source tensors from the memory-mapped
checkpoint, so writing needs the memory of the largest single tensor, not of
the model or of an output shard.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from loguru import logger

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


_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass(frozen=True)
class PendingTensor:
    """A tensor to write: its dtype and shape now, its values when ``load`` is called."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def save_streaming(path: Path, tensors: Mapping[str, PendingTensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file holding one tensor in memory at a time (same format as save_file:
    an 8-byte header length, the JSON header padded to 8 bytes, the tensors' bytes in name order)."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    names = sorted(tensors)
    for name in names:
        t = tensors[name]
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name in names:
            t = tensors[name]
            value = t.load()
            if value.dtype != t.dtype or tuple(value.shape) != t.shape:
                raise ValueError(f"{name}: expected {t.dtype} {t.shape}, got {value.dtype} {tuple(value.shape)}")
            if value.numel():
                f.write(value.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del value


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


def _pending(tensor: torch.Tensor) -> PendingTensor:
    return PendingTensor(tensor.dtype, tuple(tensor.shape), lambda: tensor)


def write_checkpoint(
    out_dir: Path,
    source_dir: Path,
    quantized: Mapping[str, torch.Tensor | PendingTensor],
    replaced: set[str],
    quant_config: dict,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> list[Path]:
    """Write weights, config.json (with ``quantization_config``), quantize_config.json
    and the source's tokenizer/generation files into ``out_dir``.

    ``quantized`` holds the packed tensors (or how to load them); every source tensor not named
    in ``replaced`` is copied in float16 (embeddings, norms, LM head), read when it is written.
    """
    out_dir = Path(out_dir)
    source_dir = Path(source_dir)
    source = SafetensorsCheckpoint(source_dir)
    tensors: dict[str, PendingTensor] = {
        n: t if isinstance(t, PendingTensor) else _pending(t) for n, t in quantized.items()
    }
    for name in source.keys():
        if name not in replaced:
            shape = tuple(source.shape(name))
            dtype = torch.float16 if source.dtype(name).is_floating_point else source.dtype(name)
            tensors[name] = PendingTensor(dtype, shape, lambda name=name: _to_fp16(name, source.get(name)))
    names = sorted(tensors)
    sizes = {n: tensors[n].nbytes for n in names}
    shards = _shard(names, sizes, max_shard_bytes)
    written: list[Path] = []
    if len(shards) == 1:
        files = ["model.safetensors"]
    else:
        files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file, shard in zip(files, shards, strict=True):
        save_streaming(out_dir / file, {n: tensors[n] for n in shard}, metadata={"format": "pt"})
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
