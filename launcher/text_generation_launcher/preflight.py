"""Checks on the resolved checkpoint that must fail before any shard starts.

A ``--quantize`` flag that does not fit the checkpoint (GPTQ on a float
checkpoint, another method on a GPTQ one, ``--dtype`` with GPTQ) would
otherwise surface as N identical shard failures after each one loaded its
slice. The decision is the server's own quantization registry's, so every
method's checks apply here unchanged.
"""

from __future__ import annotations

from pathlib import Path

from loguru import logger

from .args import LauncherArgs


class PreflightError(ValueError):
    """The flags cannot serve this checkpoint; the message says what to change."""


def check_quantization(args: LauncherArgs, model_dir: Path) -> str:
    """The quantization the shards will serve ``model_dir`` with (``unquantized`` for none).

    Raises :class:`PreflightError` when the flags and the checkpoint disagree.
    Logs when a quantized checkpoint is detected without ``--quantize``.
    """
    from text_generation_server.layers.quant.registry import (
        checkpoint_quant_config,
        dtype_flag_refusal,
        get_quant_method,
    )

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        # Not a model directory; the shard names what is missing.
        return args.quantize or "unquantized"
    try:
        checkpoint = checkpoint_quant_config(model_dir)
        method = get_quant_method(args.quantize, checkpoint).name
    except ValueError as err:
        raise PreflightError(f"{model_dir}: {err}") from err
    if args.quantize is None and checkpoint:
        logger.info(
            f"Checkpoint {model_dir.name} is quantized with quant_method "
            f"'{checkpoint.get('quant_method')}': serving it as --quantize {method}"
        )
    refusal = dtype_flag_refusal(method, args.dtype, f"a {method.upper()} checkpoint ({model_dir.name})")
    if refusal is not None:
        raise PreflightError(refusal)
    return method


# Files from which the router can build a tokenizer (fast, SentencePiece, or BPE vocab).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def check_model(model_dir: Path) -> None:
    """Refuse an architecture, or a feature of its config, that the shards do not serve (the
    server's own check, on config.json only), before the shards spend minutes loading."""
    from text_generation_server.models import UnsupportedModelError, check_model_config

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        return  # not a model directory; the shard names what is missing
    try:
        check_model_config(model_dir)
    except UnsupportedModelError as err:
        raise PreflightError(str(err)) from err


def check_tokenizer(model_dir: Path) -> None:
    """Refuse a model directory with no tokenizer before the shards spend minutes loading.

    Only the presence of a tokenizer file is checked here; the router loads it
    and names anything else wrong with it.
    """
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        return  # not a model directory; the shard names what is missing
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise PreflightError(
            f"{model_dir} has no tokenizer: expected one of {', '.join(TOKENIZER_FILES)} "
            f"beside config.json"
        )
