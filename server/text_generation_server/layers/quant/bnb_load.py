"""Quantize a layer's float weight as it loads, so no rank ever holds its float model.

The layer's ``weight`` starts as a placeholder without storage (on the meta
device) that carries the usual slicing attributes, so the model loader finds
it and checks shapes as for a dense layer. The first checkpoint part that
arrives allocates a float staging tensor of this rank's slice; when every
part (q, k and v of a fused projection, say) is in, the method quantizes the
staging tensor, registers the quantized tensors on the layer and drops the
float copy. At most the layers whose parts are still arriving are float at
any moment.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Hashable

import torch

from text_generation_server.layers.loading import set_weight_attrs
from text_generation_server.layers.quant.base import LinearSpec, QuantMethod, linear_param
from text_generation_server.utils import glibc
from text_generation_server.weights import CheckpointError, Weights

# Attributes the layer's weight loader reads to slice a checkpoint tensor.
_SLICING_ATTRS = ("output_dim", "input_dim", "output_pack", "input_pack", "checkpoint_shapes")


def _return_freed_memory() -> None:
    """Give the freed float slice back to the OS. glibc otherwise keeps it in a heap
    that the small quantized tensors allocated after it fragment, and the resident
    size creeps up layer after layer by about what quantizing was meant to save."""
    glibc.trim()


class QuantizeOnLoadMethod(QuantMethod):
    """Base for methods that quantize a float checkpoint per layer while loading."""

    def __init__(self) -> None:
        self.device: torch.device | None = None
        self.dtype: torch.dtype | None = None
        self._staging: torch.nn.Parameter | None = None
        self._parts: set[Hashable] = set()
        self.quantized = False

    def create_weights(self, layer: torch.nn.Module, spec: LinearSpec) -> None:
        self.device, self.dtype = spec.device, spec.dtype
        placeholder = torch.empty(
            spec.out_features, spec.in_features, dtype=spec.dtype, device="meta"
        )
        weight = linear_param(placeholder, output_dim=0, input_dim=1)

        def load(
            param: torch.Tensor, weights: Weights, name: str, shard_id: Hashable = None
        ) -> None:
            self._load_part(layer, param, weights, name, shard_id)

        set_weight_attrs(weight, weight_loader=load)
        layer.register_parameter("weight", weight)

    def _load_part(
        self,
        layer: torch.nn.Module,
        param: torch.Tensor,
        weights: Weights,
        name: str,
        shard_id: Hashable,
    ) -> None:
        if self.quantized:
            raise CheckpointError(f"tensor '{name}' arrived after its layer was already quantized")
        if self._staging is None:
            data = torch.empty(param.shape, dtype=self.dtype, device=self.device)
            self._staging = torch.nn.Parameter(data, requires_grad=False)
            set_weight_attrs(self._staging, **{a: getattr(param, a) for a in _SLICING_ATTRS})
        # The layer's own loader slices this rank's block exactly as for a dense weight.
        layer.weight_loader(self._staging, weights, name, shard_id)
        self._parts.add(shard_id)
        if self._parts.issuperset(getattr(param, "shard_ids", (None,))):
            weight = self._staging.data
            self._staging = None
            del layer.weight
            self.quantize(layer, weight)
            del weight
            self.quantized = True
            _return_freed_memory()

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if not self.quantized:
            raise CheckpointError(
                f"layer {layer.extra_repr()} was never quantized: parts {sorted(map(str, self._parts))} "
                "of its weight were loaded, not all of them"
            )

    @abstractmethod
    def quantize(self, layer: torch.nn.Module, weight: torch.Tensor) -> None:
        """Register the quantized form of ``weight [out, in]`` (this rank's slice) on ``layer``."""

    @staticmethod
    def register(layer: torch.nn.Module, name: str, data: torch.Tensor) -> None:
        """A frozen, already-loaded tensor of the quantized layer."""
        layer.register_parameter(name, torch.nn.Parameter(data, requires_grad=False))
