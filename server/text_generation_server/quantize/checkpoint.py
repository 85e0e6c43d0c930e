"""Reading a source checkpoint one module at a time.

The quantizer and the perplexity tool build the transformers model skeleton on
the meta device (no memory) and fill in only the modules they are about to
run, straight from the safetensors files, so memory stays near one decoder
layer plus activations whatever the model size.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

SUPPORTED_ARCHITECTURES = (
    "FalconForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "GraniteForCausalLM", "LlamaForCausalLM",
    "MistralForCausalLM", "MixtralForCausalLM", "Phi3ForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
)


class UnsupportedArchitectureError(ValueError):
    """The model's architecture has no quantization recipe."""


class CheckpointReadError(ValueError):
    """The checkpoint lacks a tensor the model needs, or is not a safetensors checkpoint."""


class SafetensorsCheckpoint:
    """Name -> tensor access over a directory of safetensors files (single or indexed)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointReadError(f"no *.safetensors files in {self.path}")
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({self.path / f for f in weight_map.values()})
        self._where: dict[str, Path] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as handle:
                for key in handle.keys():
                    self._where[key] = f

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise CheckpointReadError(f"tensor {name!r} is missing from the checkpoint in {self.path}")
        with safe_open(str(self._where[name]), framework="pt") as handle:
            return handle.get_tensor(name)

    def shape(self, name: str) -> list[int]:
        """The tensor's shape, read from the file's header (nothing is loaded)."""
        with safe_open(str(self._where[name]), framework="pt") as handle:
            return handle.get_slice(name).get_shape()

    def dtype(self, name: str) -> torch.dtype:
        with safe_open(str(self._where[name]), framework="pt") as handle:
            return _TORCH_DTYPES[handle.get_slice(name).get_dtype()]

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in set(self._where.values()))


_TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_config_json(path: Path) -> dict:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise CheckpointReadError(f"{path} has no config.json")
    return json.loads(config_file.read_text())


def load_config(path: Path, trust_remote_code: bool = False):
    """The transformers config of the checkpoint, checked against the supported architectures."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    archs = list(getattr(config, "architectures", None) or [])
    arch = archs[0] if archs else f"model_type={config.model_type!r}"
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"architecture {arch} has no quantization recipe; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return config


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside put their parameters on the meta device as they register them (each
    made as an untouched ``torch.empty``, no memory written); their buffers stay real. Buffers the
    checkpoint does not hold are computed at construction (rotary tables, Gemma's embedding scale:
    non-persistent buffers), and on the meta device they would have no value at all."""
    register = torch.nn.Module.register_parameter

    def to_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = to_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register  # type: ignore[method-assign]


def meta_model(config, trust_remote_code: bool = False) -> torch.nn.Module:
    """The float32 transformers model for ``config`` with every parameter and every buffer the
    checkpoint holds on the meta device (buffers computed at construction are real)."""
    from transformers import AutoModelForCausalLM

    config = _plain_config(config)
    # SDPA where transformers has it for the architecture; eager where it does not (Gemma 2's
    # soft-capped scores).
    attention = "sdpa" if _supports_sdpa(config, trust_remote_code) else "eager"
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(
            config, trust_remote_code=trust_remote_code, dtype=torch.float32, attn_implementation=attention
        )
    model.eval()
    _persistent_buffers_to_meta(model)  # they come from the checkpoint like the parameters
    # The rotary tables are computed, never loaded, whatever their buffers are declared as.
    inner = decoder_parts(model).inner
    if hasattr(inner, "rotary_emb"):
        inner.rotary_emb = type(inner.rotary_emb)(config=inner.config)
    return model


@dataclass(frozen=True)
class DecoderParts:
    """Where a transformers causal LM keeps its decoder: ``model.model.layers`` (Llama family) or
    ``transformer.h`` (Falcon), with the checkpoint prefixes of the embeddings and the layers."""

    inner: torch.nn.Module
    embed: torch.nn.Module
    embed_prefix: str  # e.g. "model.embed_tokens."
    layers: torch.nn.ModuleList
    layer_prefix: str  # e.g. "model.layers."


def decoder_parts(model: torch.nn.Module) -> DecoderParts:
    base = model.base_model_prefix
    inner = getattr(model, base)
    embed = inner.get_input_embeddings()
    embed_name = next(name for name, child in inner.named_children() if child is embed)
    layers_name = "layers" if hasattr(inner, "layers") else "h"
    return DecoderParts(inner, embed, f"{base}.{embed_name}.", getattr(inner, layers_name), f"{base}.{layers_name}.")


def _supports_sdpa(config, trust_remote_code: bool) -> bool:
    from transformers import AutoModelForCausalLM

    cls = AutoModelForCausalLM._model_mapping.get(type(config), None) if not trust_remote_code else None
    return cls is None or bool(getattr(cls, "_supports_sdpa", True))


def _plain_config(config):
    """A copy of ``config`` without quantization settings, so transformers builds plain Linear layers."""
    config = type(config).from_dict(config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def materialize(module: torch.nn.Module, prefix: str, state: dict[str, torch.Tensor]) -> None:
    """Give ``module``'s meta parameters and persistent buffers CPU float32 copies of ``state``'s
    tensors (names without ``prefix``); buffers computed at construction keep their values.

    Every parameter and persistent buffer must be present; a missing one raises
    :class:`CheckpointReadError` naming the full tensor name.
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointReadError(
            f"checkpoint lacks {', '.join(prefix + k for k in missing[:4])}"
            + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        )
    for key, target in expected.items():
        value = state[key]
        if value.shape != target.shape:
            raise CheckpointReadError(
                f"tensor {prefix + key} has shape {tuple(value.shape)}, the config implies {tuple(target.shape)}"
            )
    module.load_state_dict({k: state[k].to(torch.float32, copy=True) for k in expected}, strict=True, assign=True)


def load_module(module: torch.nn.Module, prefix: str, checkpoint: SafetensorsCheckpoint) -> None:
    """Materialize ``module`` (qualified name ``prefix``) from a plain checkpoint."""
    names = module.state_dict().keys()
    state = {k: checkpoint.get(prefix + k) for k in names if prefix + k in checkpoint}
    materialize(module, prefix, state)


def release(module: torch.nn.Module) -> None:
    """Drop a module's weights: its parameters and persistent buffers back to the meta device
    (buffers computed at construction stay, for the next :func:`materialize`)."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None:
                sub._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
    _persistent_buffers_to_meta(module)


def _persistent_buffers_to_meta(module: torch.nn.Module) -> None:
    """Every buffer of ``module`` and its children that a checkpoint holds, on the meta device;
    non-persistent ones (computed at construction) keep their values."""
    for sub in module.modules():
        for name, buf in list(sub._buffers.items()):
            if buf is not None and name not in sub._non_persistent_buffers_set:
                sub._buffers[name] = buf.to("meta")
