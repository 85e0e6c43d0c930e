"""Model registry and loading: ``load_model(path, dtype=, device=, dist=)``.

The architecture comes from ``config.json``'s ``architectures[0]``;
transformers supplies the config object only, never the modeling code.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from loguru import logger

from text_generation_server.distributed import Distributed
from text_generation_server.execution import choose_plan
from text_generation_server.kernels.config import KernelConfig
from text_generation_server.layers.quant.registry import (
    checkpoint_quant_config,
    get_quant_method,
    read_json_object,
)
from text_generation_server.models.base import CausalLM, UnsupportedModelError
from text_generation_server.models.falcon import FalconForCausalLM
from text_generation_server.models.gemma import Gemma2ForCausalLM, Gemma3ForCausalLM
from text_generation_server.models.llama import (
    GraniteForCausalLM,
    LlamaForCausalLM,
    MistralForCausalLM,
    Phi3ForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)
from text_generation_server.models.loader import load_weights
from text_generation_server.models.mixtral import MixtralForCausalLM
from text_generation_server.utils.hugepages import move_to_huge_pages
from text_generation_server.weights import CheckpointError, Weights, checkpoint_files

__all__ = [
    "CausalLM",
    "CheckpointError",
    "UnsupportedModelError",
    "check_model_config",
    "load_model",
    "supported_architectures",
]

# config.json "architectures"[0] -> implementation. SmolLM checkpoints say LlamaForCausalLM.
_ARCHITECTURES: dict[str, type[CausalLM]] = {
    "FalconForCausalLM": FalconForCausalLM,
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "GraniteForCausalLM": GraniteForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}


def supported_architectures() -> list[str]:
    return sorted(_ARCHITECTURES)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return read_json_object(path)
    except ValueError as e:
        raise CheckpointError(str(e)) from e


def _checkpoint_quant_config(model_dir: Path, raw_config: dict[str, Any]) -> dict[str, Any] | None:
    try:
        return checkpoint_quant_config(model_dir, raw_config)
    except ValueError as e:
        raise CheckpointError(str(e)) from e


def _architecture(model_dir: Path, raw_config: dict[str, Any]) -> type[CausalLM]:
    archs = raw_config.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in _ARCHITECTURES:
        named = f"architecture '{arch}'" if arch else "a config.json without 'architectures'"
        raise UnsupportedModelError(
            f"{model_dir} has {named}, which is not supported; "
            f"supported architectures: {', '.join(supported_architectures())}"
        )
    return _ARCHITECTURES[arch]


def check_model_config(model_path: str | Path) -> type[CausalLM]:
    """The implementation for the model in ``model_path``, after checking that its config asks
    for nothing it does not serve (cheap: config.json only). Raises :class:`UnsupportedModelError`
    naming the architecture or the feature, or :class:`CheckpointError` for a missing config."""
    from transformers import AutoConfig

    model_dir = Path(model_path)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{model_dir} has no config.json; expected a model directory")
    cls = _architecture(model_dir, _read_json(config_path))
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except Exception as e:  # noqa: BLE001 - whatever a config class raises, name the file
        raise UnsupportedModelError(f"transformers cannot read {config_path}: {type(e).__name__}: {e}") from e
    why = cls.config_refusal(config)
    if why is not None:
        raise UnsupportedModelError(f"{model_dir.name} ({cls.__name__}): {why}")
    return cls


def load_model(
    model_path: str | Path,
    *,
    dtype: torch.dtype,
    device: torch.device,
    dist: Distributed,
    quantize: str | None = None,
    kernels: KernelConfig | None = None,
    plan: str | None = None,
) -> CausalLM:
    """Build this rank's shard of the model in ``model_path``, load its weights and choose
    its execution plan (``model.plan``).

    ``kernels``: the kernel switches (default: parsed from the environment once here);
    ``plan``: limit the plan choice to this one and the module plan (tests, benchmarks).

    Raises :class:`UnsupportedModelError` for an architecture without an
    implementation, :class:`CheckpointError` for a missing or misshapen
    tensor or unreadable files, and ``ValueError`` for an unsupported
    quantization (or one that cannot run with ``dtype`` on ``device``) or a
    head count the world size cannot split.
    """
    from transformers import AutoConfig

    started = time.perf_counter()
    model_dir = Path(model_path)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{model_dir} has no config.json; expected a model directory")
    raw_config = _read_json(config_path)
    cls = check_model_config(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    if kernels is None:
        kernels = KernelConfig.from_env()
    logger.info(f"Kernel switches: {kernels.describe()}")
    quant = get_quant_method(quantize, _checkpoint_quant_config(model_dir, raw_config), kernels)
    quant.check_supported(dtype, device)
    weights = Weights(checkpoint_files(model_dir), device=device, dtype=dtype, dist=dist)
    tie = bool(getattr(config, "tie_word_embeddings", False))
    if not tie and not weights.has("lm_head.weight"):
        logger.warning(
            "config.json says tie_word_embeddings=false but the checkpoint has no lm_head.weight; "
            "using the embedding table as the LM head"
        )
        tie = True
    logger.info(
        f"Building {cls.__name__} for rank {dist.rank}/{dist.world_size}: "
        f"dtype {str(dtype).removeprefix('torch.')}, device {device}, quantization {quant.name}"
    )
    try:
        with torch.no_grad():
            model = cls(
                config, dist=dist, dtype=dtype, device=device, quant=quant, tie_word_embeddings=tie
            )
            model.checkpoint_views(weights)
            load_weights(model, weights)
    finally:
        weights.close()
    model.eval()
    # The method in use, also when the checkpoint chose it (a GPTQ checkpoint without --quantize).
    model.quantize = "" if quant.name == "unquantized" else quant.name
    # Dense weights on the CPU stream faster from huge pages (quantized kernels keep their own copies).
    pages = move_to_huge_pages(model) if device.type == "cpu" and quant.name == "unquantized" else ""
    count = sum(p.numel() for p in model.parameters())
    logger.info(
        f"Loaded {model_dir.name} ({cls.__name__}, {model.num_layers} layers, "
        f"{count / 1e6:.1f}M parameters on this rank) in {time.perf_counter() - started:.1f}s; "
        f"kernel {model.kernel}; tp plan: {model.tp_plan}" + (f"; {pages}" if pages else "")
    )
    model.plan = choose_plan(model, kernels, prefer=plan)
    return model
