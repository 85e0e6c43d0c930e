"""Tensor-parallel linear layers.

Column-parallel layers hold a slice of the output features and need no
communication; fused variants (q/k/v, gate/up) hold one slice per checkpoint
part, laid out back to back. Row-parallel layers hold a slice of the input
features, all-reduce their partial products and add the bias once, after the
reduction. How weights are stored and multiplied is the layer's
:class:`~text_generation_server.layers.quant.base.QuantMethod`'s business.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from text_generation_server.distributed import Distributed
from text_generation_server.layers.loading import (
    check_checkpoint_tensor,
    copy_checked,
    set_weight_attrs,
)
from text_generation_server.layers.partition import HeadPartition
from text_generation_server.layers.quant.base import (
    LinearSpec,
    NativeLinear,
    QuantMethod,
    linear_param,
)
from text_generation_server.weights import CheckpointError, Weights, shard_range


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class OutputPart:
    """One checkpoint tensor's contribution to a (possibly fused) output."""

    shard_id: Hashable  # checkpoint part (None when the layer is not fused)
    full_size: int  # output features of the part in the checkpoint
    start: int  # first output feature of the part this rank holds
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


class ParallelLinear(torch.nn.Module):
    """A linear layer holding output ``parts`` and, optionally, an input slice."""

    def __init__(
        self,
        in_features: int,
        parts: Sequence[OutputPart],
        *,
        input_range: tuple[int, int] | None,
        bias: bool,
        quant_method: QuantMethod,
        dist: Distributed,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.dist = dist
        self.quant_method = quant_method
        self.full_in_features = in_features
        self.input_range = input_range
        self.parts = list(parts)
        self.output_sizes = [p.size for p in self.parts]
        self._part_offsets: dict[Hashable, tuple[OutputPart, int]] = {}
        offset = 0
        for part in self.parts:
            self._part_offsets[part.shard_id] = (part, offset)
            offset += part.size
        in_start, in_stop = input_range if input_range is not None else (0, in_features)
        self.in_features = in_stop - in_start
        self.out_features = offset
        spec = LinearSpec(
            in_features=self.in_features,
            out_features=self.out_features,
            full_in_features=in_features,
            full_out_features=sum(p.full_size for p in self.parts),
            input_start=in_start,
            input_is_sharded=input_range is not None,
            dtype=dtype,
            device=device,
        )
        self.spec = spec
        quant_method.create_weights(self, spec)
        if bias:
            data = torch.empty(self.out_features, dtype=dtype, device=device)
            self.bias = linear_param(data, output_dim=0, input_dim=None)
        else:
            self.register_parameter("bias", None)
        shard_ids = tuple(p.shard_id for p in self.parts)
        for param in self.parameters(recurse=False):
            set_weight_attrs(
                param,
                shard_ids=shard_ids,
                checkpoint_shapes={sid: self._checkpoint_shape(param, sid) for sid in shard_ids},
            )
            if not hasattr(param, "weight_loader"):
                set_weight_attrs(param, weight_loader=self.weight_loader)

    def native_linear(self) -> NativeLinear | None:
        """This rank's weights as the native CPU operators take them, or None (see QuantMethod)."""
        return self.quant_method.native_linear(self)

    def _checkpoint_shape(self, param: torch.Tensor, shard_id: Hashable) -> list[int]:
        shape = list(param.shape)
        out_dim = getattr(param, "output_dim", None)
        in_dim = getattr(param, "input_dim", None)
        if out_dim is not None:
            part, _ = self._part_offsets[shard_id]
            shape[out_dim] = _ceil_div(part.full_size, param.output_pack)
        if in_dim is not None:
            shape[in_dim] = _ceil_div(self.full_in_features, param.input_pack)
        return shape

    def weight_loader(
        self, param: torch.Tensor, weights: Weights, name: str, shard_id: Hashable = None
    ) -> None:
        """Copy this rank's block of checkpoint tensor ``name`` (part ``shard_id``) into ``param``."""
        if shard_id not in self._part_offsets:
            raise CheckpointError(
                f"tensor '{name}' maps to part {shard_id!r} of a layer with parts "
                f"{list(self._part_offsets)}"
            )
        check_checkpoint_tensor(param, weights, name, shard_id)
        ranges: dict[int, tuple[int, int]] = {}
        dest = param.data
        out_dim = getattr(param, "output_dim", None)
        if out_dim is not None:
            part, offset = self._part_offsets[shard_id]
            pack = param.output_pack
            if part.start % pack or offset % pack:
                raise ValueError(
                    f"cannot split '{name}': output features [{part.start}, {part.stop}) "
                    f"are not aligned to its packing of {pack}"
                )
            first, last = part.start // pack, _ceil_div(part.stop, pack)
            ranges[out_dim] = (first, last)
            dest = dest.narrow(out_dim, offset // pack, last - first)
        in_dim = getattr(param, "input_dim", None)
        if in_dim is not None and self.input_range is not None:
            start, stop = self.input_range
            pack = param.input_pack
            if start % pack:
                raise ValueError(
                    f"cannot split '{name}': input features [{start}, {stop}) "
                    f"are not aligned to its packing of {pack}"
                )
            ranges[in_dim] = (start // pack, _ceil_div(stop, pack))
        copy_checked(dest, weights.get_slices(name, ranges, cast=False), name)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}/{self.full_in_features}, out={self.output_sizes}, "
            f"bias={self.bias is not None}"
        )


class ColumnParallelLinear(ParallelLinear):
    """Output features split across ranks; the result stays split (no communication)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool,
        quant_method: QuantMethod,
        dist: Distributed,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        start, stop = shard_range(out_features, dist.world_size, dist.rank)
        super().__init__(
            in_features,
            [OutputPart(None, out_features, start, stop)],
            input_range=None,
            bias=bias,
            quant_method=quant_method,
            dist=dist,
            dtype=dtype,
            device=device,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input fused into one matmul.

    Checkpoint part ``i`` (e.g. 0 = gate_proj, 1 = up_proj) is split evenly
    on its own (in units of ``align``, to match the row-parallel layer that
    consumes it); the output is this rank's slice of part 0, then of part 1.
    """

    def __init__(
        self,
        in_features: int,
        out_sizes: Sequence[int],
        *,
        bias: bool,
        quant_method: QuantMethod,
        dist: Distributed,
        dtype: torch.dtype,
        device: torch.device,
        align: int = 1,
    ) -> None:
        parts = [
            OutputPart(i, size, *shard_range(size, dist.world_size, dist.rank, align))
            for i, size in enumerate(out_sizes)
        ]
        ParallelLinear.__init__(
            self,
            in_features,
            parts,
            input_range=None,
            bias=bias,
            quant_method=quant_method,
            dist=dist,
            dtype=dtype,
            device=device,
        )


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection holding the heads of one :class:`HeadPartition`.

    Output layout: this rank's q heads, then its k heads, then its v heads.
    """

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        partition: HeadPartition,
        *,
        bias: bool,
        quant_method: QuantMethod,
        dist: Distributed,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        hd = head_dim
        parts = [
            OutputPart("q", num_heads * hd, partition.q_start * hd, partition.q_stop * hd),
            OutputPart("k", num_kv_heads * hd, partition.kv_start * hd, partition.kv_stop * hd),
            OutputPart("v", num_kv_heads * hd, partition.kv_start * hd, partition.kv_stop * hd),
        ]
        self.head_dim = head_dim
        self.num_local_heads = partition.num_heads
        self.num_local_kv_heads = partition.num_kv_heads
        ParallelLinear.__init__(
            self,
            hidden_size,
            parts,
            input_range=None,
            bias=bias,
            quant_method=quant_method,
            dist=dist,
            dtype=dtype,
            device=device,
        )


class RowParallelLinear(ParallelLinear):
    """Input features split across ranks; partial outputs are all-reduced.

    ``input_range`` is the slice of input features this rank holds; it must
    match the output slice of the layer feeding it (e.g. o_proj takes the
    columns of this rank's attention heads). Defaults to an even split.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool,
        quant_method: QuantMethod,
        dist: Distributed,
        dtype: torch.dtype,
        device: torch.device,
        input_range: tuple[int, int] | None = None,
    ) -> None:
        if dist.world_size == 1:
            input_range = None
        elif input_range is None:
            input_range = shard_range(in_features, dist.world_size, dist.rank)
        super().__init__(
            in_features,
            [OutputPart(None, out_features, 0, out_features)],
            input_range=input_range,
            bias=bias,
            quant_method=quant_method,
            dist=dist,
            dtype=dtype,
            device=device,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dist.world_size == 1:
            return self.quant_method.apply(self, x, self.bias)
        # The bias joins after the reduction so it is counted once, not once per rank.
        out = self.dist.all_reduce(self.quant_method.apply(self, x, None))
        if self.bias is not None:
            out = out + self.bias
        return out
