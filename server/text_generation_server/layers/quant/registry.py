"""The one place that maps a quantization name to its implementation.

Adding a method is one new file in this package plus one entry in
``_QUANT_CONFIGS``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from text_generation_server.kernels.config import KernelConfig
from text_generation_server.layers.quant.base import QuantConfig
from text_generation_server.layers.quant.bitsandbytes import BITSANDBYTES_CONFIGS
from text_generation_server.layers.quant.gptq import GPTQConfig
from text_generation_server.layers.quant.unquantized import UnquantizedConfig

# --quantize value -> config class. Unquantized is what no flag means.
_QUANT_CONFIGS: dict[str, type[QuantConfig]] = {}
_QUANT_CONFIGS.update((cls.name, cls) for cls in BITSANDBYTES_CONFIGS)
_QUANT_CONFIGS[GPTQConfig.name] = GPTQConfig


def supported_quantizations() -> list[str]:
    """Values accepted by ``--quantize`` (besides none)."""
    return sorted(_QUANT_CONFIGS)


def _supported_text() -> str:
    names = supported_quantizations()
    return ", ".join(names) if names else "none yet; serve unquantized weights (no --quantize)"


def quant_config_class(quantize: str) -> type[QuantConfig]:
    """The config class behind a ``--quantize`` value; ``ValueError`` listing the supported ones."""
    cls = _QUANT_CONFIGS.get(quantize)
    if cls is None:
        raise ValueError(f"unsupported quantization '{quantize}'; supported: {_supported_text()}")
    return cls


def quantizes_at_load(quantize: str | None) -> bool:
    """Whether ``--quantize quantize`` quantizes a float checkpoint while loading it."""
    return quantize is not None and quantize in _QUANT_CONFIGS and _QUANT_CONFIGS[quantize].quantizes_at_load


def dtype_flag_refusal(quantize: str | None, dtype_flag: str | None, what: str) -> str | None:
    """Why ``--dtype`` cannot go with this quantization (``what`` names it in the message), or None."""
    if quantize is None or dtype_flag is None or quantize not in _QUANT_CONFIGS:
        return None
    return _QUANT_CONFIGS[quantize].dtype_flag_refusal(dtype_flag, what)


def get_quant_method(
    quantize: str | None,
    checkpoint_quant_config: dict[str, Any] | None,
    kernels: KernelConfig | None = None,
) -> QuantConfig:
    """The model-wide quantization config, callable as ``config(prefix) -> QuantMethod``.

    ``quantize`` is the user's flag; ``checkpoint_quant_config`` the
    checkpoint's own quantization config (``config.json``'s
    ``quantization_config`` or ``quantize_config.json``); ``kernels`` the
    shard's kernel switches. Without a flag a
    quantized checkpoint selects its method itself. Unknown or conflicting
    values raise ``ValueError`` listing what is supported.
    """
    checkpoint_method = None
    if checkpoint_quant_config:
        checkpoint_method = checkpoint_quant_config.get("quant_method")
    if quantize is None:
        if checkpoint_method is None:
            return UnquantizedConfig.from_checkpoint(None, kernels)
        for cls in _QUANT_CONFIGS.values():
            if checkpoint_method in cls.checkpoint_methods:
                return cls.from_checkpoint(checkpoint_quant_config, kernels)
        raise ValueError(
            f"the checkpoint is quantized with quant_method '{checkpoint_method}', which this "
            f"server cannot load; supported quantizations: {_supported_text()}"
        )
    cls = quant_config_class(quantize)
    if checkpoint_method is not None and not cls.checkpoint_methods:
        raise ValueError(_already_quantized(quantize, checkpoint_method))
    if checkpoint_method is not None and checkpoint_method not in cls.checkpoint_methods:
        raise ValueError(
            f"--quantize {quantize} does not match the checkpoint, which is quantized with "
            f"quant_method '{checkpoint_method}'"
        )
    return cls.from_checkpoint(checkpoint_quant_config, kernels)


def _already_quantized(quantize: str, checkpoint_method: str) -> str:
    """Why a quantize-at-load method cannot take an already quantized checkpoint."""
    own = [n for n, c in _QUANT_CONFIGS.items() if checkpoint_method in c.checkpoint_methods]
    alternative = f" or with --quantize {own[0]}" if own else ""
    return (
        f"--quantize {quantize} quantizes a float checkpoint while it loads, but this checkpoint "
        f"is already quantized (quant_method '{checkpoint_method}'): its weights are stored as "
        f"integers with their own scales, so there are no float weights to quantize, and "
        f"quantizing them again would only lose accuracy; serve it without --quantize{alternative}"
    )


def read_json_object(path: Path) -> dict[str, Any]:
    """A checkpoint's JSON file, which must hold an object; ``ValueError`` naming the file otherwise."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {path}: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


def checkpoint_quant_config(
    model_dir: Path, raw_config: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """A checkpoint's own quantization settings: config.json's ``quantization_config``,
    else ``quantize_config.json`` (AutoGPTQ's file); ``None`` for a float checkpoint.

    ``raw_config`` is config.json when the caller has read it already.
    Raises ``ValueError`` naming a file that cannot be read as a JSON object.
    """
    model_dir = Path(model_dir)
    if raw_config is None:
        config_path = model_dir / "config.json"
        raw_config = read_json_object(config_path) if config_path.is_file() else {}
    if raw_config.get("quantization_config"):
        return dict(raw_config["quantization_config"])
    legacy = model_dir / "quantize_config.json"
    if legacy.is_file():
        data = read_json_object(legacy)
        # AutoGPTQ wrote this file without naming the method.
        data.setdefault("quant_method", "gptq")
        return data
    return None
