"""Fill a model's parameters from a checkpoint, one tensor at a time.

Walks the checkpoint's tensor names, maps names of projections the model
fuses (``q_proj`` -> ``qkv_proj`` part ``"q"``) through the model's
``packed_modules_mapping`` and calls the parameter's ``weight_loader``, which
reads only this rank's slice. Knows nothing about particular architectures.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable
from typing import Any

import torch
from loguru import logger

from text_generation_server.layers.loading import (
    expected_checkpoint_shape,
    replicated_weight_loader,
)
from text_generation_server.models.base import CausalLM
from text_generation_server.weights import CheckpointError, Weights


def map_checkpoint_name(name: str, mapping: dict[str, tuple[str, Any]]) -> tuple[str, Hashable]:
    """Parameter name and part id for checkpoint tensor ``name``."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in mapping:
            fused, shard_id = mapping[part]
            parts[i] = fused
            return ".".join(parts), shard_id
    return name, None


def checkpoint_name(
    param_name: str, shard_id: Hashable, mapping: dict[str, tuple[str, Any]]
) -> str:
    """The checkpoint tensor that fills part ``shard_id`` of ``param_name``."""
    if shard_id is None:
        return param_name
    parts = param_name.split(".")
    for source, (fused, sid) in mapping.items():
        if sid == shard_id and fused in parts:
            parts[parts.index(fused)] = source
            return ".".join(parts)
    return f"{param_name} (part {shard_id!r})"


def load_weights(model: CausalLM, weights: Weights) -> None:
    """Load every parameter of ``model`` and prepare quantized layers.

    Raises :class:`CheckpointError` naming each missing tensor with its
    expected shape; checkpoint tensors the model has no use for are logged.
    """
    mapping = model.packed_modules_mapping
    params = dict(model.named_parameters())
    loaded: dict[str, set[Hashable]] = defaultdict(set)
    unused = []
    for name in weights.names():
        if model.skip_checkpoint_tensor(name):
            continue
        param_name, shard_id = map_checkpoint_name(name, mapping)
        param = params.get(param_name)
        if param is None:
            unused.append(name)
            continue
        loader = getattr(param, "weight_loader", replicated_weight_loader)
        loader(param, weights, name, shard_id)
        loaded[param_name].add(shard_id)

    filled = []
    for param_name, param in params.items():
        fill = getattr(param, "fill_missing", None)
        if fill is not None and not loaded[param_name]:
            # A tensor the checkpoint may leave out, with a known value (GPTQ's plain g_idx).
            param.data.copy_(fill())
            loaded[param_name].update(getattr(param, "shard_ids", (None,)))
            filled.append(param_name)
    if filled:
        logger.info(
            f"Checkpoint has no {filled[0].rsplit('.', 1)[-1]} for {len(filled)} layer(s); "
            f"using the value its settings imply"
        )

    missing = []
    for param_name, param in params.items():
        for shard_id in getattr(param, "shard_ids", (None,)):
            if shard_id not in loaded[param_name]:
                missing.append(
                    f"'{checkpoint_name(param_name, shard_id, mapping)}' "
                    f"(shape {expected_checkpoint_shape(param, shard_id)})"
                )
    if missing:
        files = ", ".join(f.name for f in weights.files)
        shown = "; ".join(missing[:5]) + (
            f"; and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise CheckpointError(
            f"checkpoint {weights.files[0].parent} ({files}) is missing {len(missing)} "
            f"tensor(s) the model needs: {shown}"
        )
    if unused:
        shown = ", ".join(unused[:5]) + (" ..." if len(unused) > 5 else "")
        logger.warning(
            f"Ignored {len(unused)} checkpoint tensor(s) the model does not use: {shown}"
        )

    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(module)
    model.kernel = describe_kernels(model)


def describe_kernels(model: torch.nn.Module) -> str:
    """The distinct linear kernels in use, e.g. ``dense-fp32``."""
    names: dict[str, None] = {}
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is not None:
            names.setdefault(method.kernel_name(module), None)
    return ", ".join(names) or "none"
