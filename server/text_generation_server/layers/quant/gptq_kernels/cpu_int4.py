"""4-bit GPTQ on the CPU through torch's packed int4 matmul.

``torch.ops.aten._weight_int4pack_mm_for_cpu`` multiplies bf16 activations
by weights packed two per byte with one (scale, offset) pair per group of
32/64/128/256 consecutive input features: ``w = (q - 8) * scale + offset``.
GPTQ's ``w = scale * (q - zero)`` maps onto it with ``offset = scale * (8 -
zero)``. Its fp32 and fp16 paths are not vectorised (tens of times slower
than a dense matmul), so activations go through it in bf16, as GPTQModel's
CPU kernel does.

Any GPTQ group layout is laid out for it once at load: input features are
sorted by group (undoing act-order's permutation), each group is cut into
kernel groups of one supported size and a group's last kernel group is
padded with zero columns (a ragged last group, a row-parallel shard holding
part of each act-order group). Per call the activations are permuted and
padded to match, unless the layout is the checkpoint's own order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from text_generation_server.layers.quant.gptq_kernels.base import GPTQKernel, GPTQWeights

KERNEL_GROUP_SIZES = (256, 128, 64, 32)
# Padding beyond this fraction of the real input features costs more than it saves.
MAX_PADDING = 1.0
_N_MULTIPLE = 16


def _ops_available() -> bool:
    aten = torch.ops.aten
    return hasattr(aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        aten, "_convert_weight_to_int4pack_for_cpu"
    )


def _padded_size(counts: torch.Tensor, kg: int) -> int:
    return int(((counts + kg - 1) // kg * kg).sum())


def choose_kernel_group(
    counts: torch.Tensor, sizes: tuple[int, ...] = KERNEL_GROUP_SIZES
) -> tuple[int, int]:
    """The kernel group size needing the fewest padded features (larger wins ties), and that count."""
    best = min(sizes, key=lambda kg: (_padded_size(counts, kg), -kg))
    return best, _padded_size(counts, best)


@dataclass
class SortedLayout:
    """A layer's 4-bit codes with input features sorted by group and groups padded to one size.

    ``codes [N, K_pad]`` holds the codes of feature ``source[j]`` in column ``j``
    (``source == K``: a zero-activation padding column, code 8 = 0 after
    ``(q - 8)``); kernel group ``j`` covers columns ``[j * group_size, (j+1) *
    group_size)`` and takes scale/zero row ``groups[j]`` of the checkpoint.
    """

    codes: torch.Tensor  # int32 [N, K_pad]
    zeros: torch.Tensor  # int32 [G, N]
    scales: torch.Tensor  # float32 [G, N]
    groups: torch.Tensor  # int64 [K_pad / group_size]
    source: torch.Tensor | None  # int32 [K_pad] gather building the input, None: checkpoint order
    group_size: int
    in_features: int
    out_features: int
    padded_in: int

    @property
    def pad(self) -> int:
        return self.padded_in - self.in_features

    @classmethod
    def build(cls, weights: GPTQWeights, sizes: tuple[int, ...] = KERNEL_GROUP_SIZES) -> SortedLayout:
        codes, zeros = weights.unpack()  # [N, K], [G, N]
        n, k = codes.shape
        g_idx = weights.g_idx.to(torch.int64)
        counts = torch.bincount(g_idx, minlength=weights.num_groups)
        kg, k_pad = choose_kernel_group(counts, sizes)
        order = torch.argsort(g_idx, stable=True)
        source = torch.full((k_pad,), k, dtype=torch.int64)
        kernel_group_of: list[int] = []
        pos, start = 0, 0
        for group, count in enumerate(counts.tolist()):
            if count == 0:
                continue
            source[pos : pos + count] = order[start : start + count]
            blocks = -(-count // kg)
            kernel_group_of += [group] * blocks
            pos += blocks * kg
            start += count
        with_zero_column = torch.cat([codes, torch.full((n, 1), 8, dtype=torch.int32)], 1)
        identity = torch.equal(source[:k], torch.arange(k))
        return cls(
            codes=with_zero_column[:, source],
            zeros=zeros,
            scales=weights.scales.to(torch.float32),
            groups=torch.tensor(kernel_group_of, dtype=torch.int64),
            source=None if identity else source.to(torch.int32),
            group_size=kg,
            in_features=k,
            out_features=n,
            padded_in=k_pad,
        )

    def pad_to(self, multiple: int) -> None:
        """Append zero-activation columns (one more kernel group each time) until ``padded_in``
        is a multiple of ``multiple``."""
        while self.padded_in % multiple:
            n, kg = self.out_features, self.group_size
            self.codes = torch.cat([self.codes, torch.full((n, kg), 8, dtype=self.codes.dtype)], 1)
            self.groups = torch.cat([self.groups, self.groups[-1:]])
            if self.source is not None:
                extra = torch.full((kg,), self.in_features, dtype=self.source.dtype)
                self.source = torch.cat([self.source, extra])
            self.padded_in += kg

    def kernel_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x [T, K]`` permuted and padded to the sorted ``[T, K_pad]`` layout."""
        if self.source is not None:
            return F.pad(x, (0, 1)).index_select(-1, self.source)
        if self.pad:
            return F.pad(x, (0, self.pad))
        return x


def _common_unsupported(weights: GPTQWeights, device: torch.device, sizes: tuple[int, ...]) -> str | None:
    if device.type != "cpu":
        return f"runs on the CPU only, not {device.type}"
    if weights.bits != 4:
        return f"packs 4-bit weights only, not {weights.bits}-bit"
    if weights.in_features == 0 or weights.out_features == 0:
        return "the layer is empty on this rank"
    counts = torch.bincount(weights.g_idx.to(torch.int64), minlength=weights.num_groups)
    _, padded = choose_kernel_group(counts, sizes)
    k = weights.in_features
    if padded > k * (1 + MAX_PADDING):
        return (
            f"its group layout would need {padded} padded input features for {k} "
            f"(limit {int(k * (1 + MAX_PADDING))})"
        )
    return None


class CpuInt4Kernel(GPTQKernel):
    name = "cpu-int4pack-bf16"

    @classmethod
    def unsupported(cls, weights: GPTQWeights, device: torch.device) -> str | None:
        if not _ops_available():
            return f"torch {torch.__version__} lacks _weight_int4pack_mm_for_cpu"
        return _common_unsupported(weights, device, KERNEL_GROUP_SIZES)

    def __init__(self, weights: GPTQWeights) -> None:
        layout = SortedLayout.build(weights)
        self.layout = layout
        n, k_pad = layout.out_features, layout.padded_in
        self.group_size = layout.group_size
        self.in_features, self.out_features = layout.in_features, n
        self.padded_in, self.pad = layout.padded_in, layout.pad
        n_pad = -(-n // _N_MULTIPLE) * _N_MULTIPLE
        # Padded rows get zero scales and offsets; padded columns meet zero activations.
        padded_codes = torch.full((n_pad, k_pad), 8, dtype=torch.int32)
        padded_codes[:n] = layout.codes
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(padded_codes, 1)
        scales = layout.scales[layout.groups]  # [K_pad / kg, N]
        offsets = scales * (8 - layout.zeros.to(torch.float32)[layout.groups])
        scales_and_offsets = torch.zeros(len(layout.groups), n_pad, 2)
        scales_and_offsets[:, :n, 0] = scales
        scales_and_offsets[:, :n, 1] = offsets
        self.scales_and_offsets = scales_and_offsets.to(torch.bfloat16).contiguous()
        self.source = layout.source
        layout.codes = layout.zeros = layout.scales = torch.empty(0)  # only the packed copy stays

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            self.layout.kernel_input(x).to(torch.bfloat16).contiguous(),
            self.packed,
            self.group_size,
            self.scales_and_offsets,
        )
        if y.shape[-1] != self.out_features:
            y = y[..., : self.out_features].contiguous()
        return y.to(x.dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        held = {"packed": self.packed, "scales_and_offsets": self.scales_and_offsets}
        if self.source is not None:
            held["source"] = self.source
        return held
