"""The interface every quantization method implements.

A :class:`QuantConfig` is chosen once per model (see ``registry.py``) and
hands each linear layer its :class:`QuantMethod`. The method decides which
parameters the layer has (``create_weights``), may repack them once loaded
(``process_weights_after_loading``) and multiplies (``apply``). Linear layers
never ask which method they hold.

Parameters a method creates describe how they are sliced for tensor
parallelism with attributes (see :func:`linear_param`):

- ``output_dim`` / ``input_dim``: the dims indexed by output / input
  features, or ``None`` when the tensor is not split along them (e.g. GPTQ
  ``scales`` kept whole in a row-parallel layer with act-order);
- ``output_pack`` / ``input_pack``: features per stored element along those
  dims (8 for int4 packed in int32, the group size for per-group scales; a
  ``Fraction`` where codes run across words, 32/3 for 3-bit).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from text_generation_server.kernels.config import KernelConfig
from text_generation_server.layers.loading import set_weight_attrs


@dataclass(frozen=True)
class LinearSpec:
    """The shapes a quantization method needs to create one rank's weights."""

    in_features: int  # input features this rank multiplies
    out_features: int  # output features this rank produces (all fused parts)
    full_in_features: int  # input features of the whole, unsplit layer
    full_out_features: int  # output features of the whole, unsplit layer
    input_start: int  # first input feature held by this rank (row-parallel split)
    input_is_sharded: bool  # row-parallel: the input dim is split across ranks
    dtype: torch.dtype  # serving dtype of activations and float parameters
    device: torch.device


def linear_param(
    data: torch.Tensor,
    *,
    output_dim: int | None,
    input_dim: int | None,
    output_pack: int = 1,
    input_pack: int = 1,
) -> torch.nn.Parameter:
    """A frozen parameter tagged with how it splits across ranks."""
    param = torch.nn.Parameter(data, requires_grad=False)
    set_weight_attrs(
        param,
        output_dim=output_dim,
        input_dim=input_dim,
        output_pack=output_pack,
        input_pack=input_pack,
    )
    return param


class QuantMethod(ABC):
    """How one linear layer stores its weights and multiplies."""

    @abstractmethod
    def create_weights(self, layer: torch.nn.Module, spec: LinearSpec) -> None:
        """Register this rank's (empty) weight parameters on ``layer`` with :func:`linear_param`."""

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Repack or quantize loaded weights once; default: nothing to do."""
        return None

    @abstractmethod
    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x @ W.T (+ bias)`` for this rank's weights; ``x`` is ``[T, in_features]``."""

    @abstractmethod
    def kernel_name(self, layer: torch.nn.Module) -> str:
        """Human-readable kernel name for start-up logs, e.g. ``dense-fp32``."""

    def native_linear(self, layer: torch.nn.Module) -> NativeLinear | None:
        """How the native CPU kernels multiply by this layer's weights, once loaded, or ``None``
        when they cannot (the layer then runs through :meth:`apply` only). Default: ``None``."""
        return None


@dataclass(frozen=True)
class NativeLinear:
    """A linear layer's weights in a form the native CPU decoder layers multiply
    (``tgs_cpu.Linear``, ``kernels/csrc/decoder.h``); the execution plan builds that from this.

    ``dense``: ``weight`` ``[N, K]``, float32, bfloat16 or float16 (16-bit weights are widened
    in registers and multiplied by float32 activations). ``int4``: ``qweight`` / ``meta`` as the native
    4-bit kernel packs them, its ``group_size``, ``in_features`` and the dtype of its
    products of many rows (``prefill_dtype``); where the kernel's columns are the input
    reordered (act-order) or padded, ``kernel_in`` columns, column j fed by input feature
    ``source[j]`` (``in_features``: a zero column), or without ``source`` the input then zeros.
    ``concat``: ``parts`` whose outputs lie side by side (parts with different act-order orders).
    """

    kind: str  # "dense", "int4" or "concat"
    weight: torch.Tensor | None = None
    qweight: torch.Tensor | None = None
    meta: torch.Tensor | None = None
    group_size: int = 0
    in_features: int = 0
    prefill_dtype: torch.dtype = torch.float32
    source: torch.Tensor | None = None
    kernel_in: int = 0
    parts: tuple[NativeLinear, ...] = ()  # "concat": these side by side

    @classmethod
    def concat(cls, parts: list[NativeLinear]) -> NativeLinear:
        return cls("concat", parts=tuple(parts), in_features=parts[0].in_features)

    @classmethod
    def dense(cls, weight: torch.Tensor) -> NativeLinear:
        return cls("dense", weight=weight, in_features=weight.shape[1])

    @classmethod
    def int4(
        cls, qweight: torch.Tensor, meta: torch.Tensor, group_size: int, in_features: int,
        prefill_dtype: torch.dtype, source: torch.Tensor | None = None,
    ) -> NativeLinear:
        return cls("int4", qweight=qweight, meta=meta, group_size=group_size, in_features=in_features,
                   prefill_dtype=prefill_dtype, source=source, kernel_in=qweight.shape[1] * 4)


class QuantConfig(ABC):
    """A model-wide quantization choice; calling it gives each layer its method."""

    # Value of the --quantize flag that selects this config.
    name: ClassVar[str]
    # ``quant_method`` values in a checkpoint's quantization config this loads.
    checkpoint_methods: ClassVar[tuple[str, ...]] = ()
    # Quantizes a float checkpoint while it loads (the resident weights are smaller than the
    # checkpoint's floats); False for methods that read an already quantized checkpoint.
    quantizes_at_load: ClassVar[bool] = False
    # Whether ``--dtype`` may choose the compute dtype; a method whose checkpoint fixes it says no.
    dtype_flag_allowed: ClassVar[bool] = True

    @classmethod
    @abstractmethod
    def from_checkpoint(
        cls, checkpoint_quant_config: dict[str, Any] | None, kernels: KernelConfig | None = None
    ) -> QuantConfig:
        """Build from the checkpoint's own quantization config (``None`` when it has none) and the
        shard's kernel switches (``None``: everything automatic)."""

    @classmethod
    def dtype_flag_refusal(cls, dtype_flag: str, what: str) -> str | None:
        """Why ``--dtype dtype_flag`` cannot be combined with this method (``what`` names the
        checkpoint or flag for the message), or ``None`` when it can."""
        if cls.dtype_flag_allowed:
            return None
        return (
            f"--dtype {dtype_flag} cannot be combined with {what}: a {cls.name.upper()} checkpoint "
            "fixes its own compute dtype; drop --dtype"
        )

    @abstractmethod
    def get_method(self, prefix: str) -> QuantMethod:
        """The method for the linear layer named ``prefix`` (e.g. ``model.layers.0.mlp.down_proj``)."""

    def input_alignment(self) -> int:
        """Row-parallel input splits must be multiples of this (e.g. a GPTQ group size)."""
        return 1

    def check_supported(self, dtype: torch.dtype, device: torch.device) -> None:
        """Raise ``ValueError`` naming what is allowed when this method cannot serve
        ``dtype`` on ``device``; called before any weight is read. Default: anything goes."""
        return None

    def lm_head_kernel(self) -> str:
        """The LM head kernel this method asks for (``layers/embedding.py``); the head itself
        is never quantized. Default: ``dense``, exact in the serving dtype."""
        return "dense"

    def __call__(self, prefix: str) -> QuantMethod:
        return self.get_method(prefix)
