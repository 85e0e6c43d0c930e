"""Checks on the resolved checkpoint that must fail before any shard starts.

A ``--quantize`` flag that does not fit the checkpoint (GPTQ on a float
checkpoint, another method on a GPTQ one, ``--dtype`` with GPTQ) would
otherwise surface as N identical shard failures after each one loaded its
slice. The decision is the server's own quantization registry's, so every
method's checks apply here unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loguru import logger

from .args import LauncherArgs


class PreflightError(ValueError):
    """The flags cannot serve this checkpoint; the message says what to change."""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise PreflightError(f"cannot read {path}: {err}") from err
    if not isinstance(data, dict):
        raise PreflightError(f"{path} does not hold a JSON object")
    return data


def checkpoint_quant_config(model_dir: Path) -> dict[str, Any] | None:
    """The checkpoint's quantization settings: config.json's ``quantization_config``, else quantize_config.json."""
    config_path = model_dir / "config.json"
    if config_path.is_file():
        quant = _read_json(config_path).get("quantization_config")
        if quant:
            return dict(quant)
    legacy = model_dir / "quantize_config.json"
    if legacy.is_file():
        data = _read_json(legacy)
        # AutoGPTQ wrote this file without naming the method.
        data.setdefault("quant_method", "gptq")
        return data
    return None


def check_quantization(args: LauncherArgs, model_dir: Path) -> str:
    """The quantization the shards will serve ``model_dir`` with (``unquantized`` for none).

    Raises :class:`PreflightError` when the flags and the checkpoint disagree.
    Logs when a quantized checkpoint is detected without ``--quantize``.
    """
    from text_generation_server.layers.quant.registry import get_quant_method

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        # Not a model directory; the shard names what is missing.
        return args.quantize or "unquantized"
    checkpoint = checkpoint_quant_config(model_dir)
    try:
        method = get_quant_method(args.quantize, checkpoint).name
    except ValueError as err:
        raise PreflightError(f"{model_dir}: {err}") from err
    if args.quantize is None and checkpoint:
        logger.info(
            f"Checkpoint {model_dir.name} is quantized with quant_method "
            f"'{checkpoint.get('quant_method')}': serving it as --quantize {method}"
        )
    if method == "gptq" and args.dtype is not None:
        raise PreflightError(
            f"--dtype {args.dtype} cannot be combined with a GPTQ checkpoint ({model_dir.name}): "
            "it fixes its own compute dtype; drop --dtype"
        )
    return method
