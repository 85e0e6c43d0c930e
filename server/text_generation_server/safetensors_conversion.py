"""Convert PyTorch ``.bin`` checkpoints to safetensors, as TGI's download-weights does.

Shards read safetensors only (they memory-map and slice tensors without
unpickling anything). Repositories that publish only ``pytorch_model*.bin``
are converted once, next to the original files, by the explicit
``download-weights`` step, and only with ``--trust-remote-code``: a ``.bin``
file is a pickle, and even ``torch.load(weights_only=True)`` unpickles it,
so the user must consent (the caller checks; this module converts).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from loguru import logger

BIN_INDEX = "pytorch_model.bin.index.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"


def bin_weight_files(directory: Path) -> list[Path]:
    """The ``pytorch_model*.bin`` weight files in ``directory``, sorted."""
    return sorted(directory.glob("pytorch_model*.bin"))


def safetensors_name(bin_name: str) -> str:
    """``pytorch_model-00001-of-00002.bin`` -> ``model-00001-of-00002.safetensors``."""
    stem = bin_name[: -len(".bin")] if bin_name.endswith(".bin") else bin_name
    if stem.startswith("pytorch_model"):
        stem = "model" + stem[len("pytorch_model"):]
    return stem + ".safetensors"


def convert_bin_checkpoint(directory: Path) -> list[Path]:
    """Write a ``.safetensors`` file beside every ``pytorch_model*.bin`` in ``directory``.

    Tensors that share storage (tied embeddings) are stored as separate
    copies so every original name stays loadable. Each written file is read
    back and compared with the original before it is moved into place. An
    index file is translated too. Returns the written files.
    """
    import torch
    from safetensors.torch import load_file, save_file

    written = []
    bins = bin_weight_files(directory)
    for index, source in enumerate(bins, start=1):
        target = directory / safetensors_name(source.name)
        logger.info(f"Converting {source.name} to {target.name} ({index}/{len(bins)})")
        state = torch.load(source, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
            raise ValueError(f"{source} is not a plain state dict of tensors; cannot convert it to safetensors")
        tensors = _unshare(state)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
            reloaded = load_file(str(tmp))
            for name, tensor in tensors.items():
                if not torch.equal(reloaded[name], tensor):
                    raise ValueError(f"tensor {name} changed while converting {source}")
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        written.append(target)

    bin_index = directory / BIN_INDEX
    if bin_index.is_file():
        data = json.loads(bin_index.read_text())
        data["weight_map"] = {name: safetensors_name(file) for name, file in data.get("weight_map", {}).items()}
        out = directory / SAFETENSORS_INDEX
        out.write_text(json.dumps(data, indent=2) + "\n")
        written.append(out)
    return written


def _unshare(state: dict) -> dict:
    """Contiguous tensors, each owning its storage (safetensors refuses shared memory)."""
    seen: set[int] = set()
    out = {}
    for name, tensor in state.items():
        ptr = tensor.untyped_storage().data_ptr()
        tensor = tensor.contiguous()
        if ptr in seen and tensor.numel() > 0:
            tensor = tensor.clone()
        seen.add(ptr)
        out[name] = tensor
    return out
