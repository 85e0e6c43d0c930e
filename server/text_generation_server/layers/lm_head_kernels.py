"""LM head kernels: one class each, chosen once through one fallback chain.

The head is the largest single matmul of a decode step (vocabulary x hidden)
and, for a 4-bit model on the CPU, most of the step's weight bytes. A kernel
is built once from this rank's loaded weight rows and then only multiplies;
whether it can run is its own :meth:`LMHeadKernel.unsupported`, as for the
GPTQ kernels.

- ``dense``: the serving dtype's weight as it is (exact; the default): ``F.linear``,
  or for a 16-bit weight on the CPU where the native kernels run, their
  ``dense16_product`` (the weight widened in registers, float32 activations and
  logits; from ``dense16_dot_rows()`` rows on, bfloat16 weights through the CPU's
  bf16 dot products where it has them), the product the native layers take;
- ``half``: CPU only, for quantized models whose other layers already run in
  16 bits. Up to :data:`HALF_GEMV_MAX_ROWS` rows go through an fp16 copy of
  the weight (ATen's fp16 matrix-vector kernel accumulates in fp32 and reads
  half the bytes; fp16 logits keep 11 bits, ~0.005 at a logit of 20), more
  rows through a bf16 copy (native bf16 dot products). Either copy holds the
  checkpoint's own fp16 values exactly when the checkpoint is fp16, as GPTQ
  checkpoints are.
- ``int8``: CPU only, where the native CPU kernels run: a symmetric 8-bit
  copy of the weight with one scale per 64 (or 32) hidden features,
  multiplied by activations quantized the same way
  (``tgs_cpu.int8_linear``): a quarter of the fp32 bytes. Every 8-bit logit
  is within a bound computed from its row's scales and the activations
  (:func:`int8_error_bound`); each row's candidates for the largest logit
  (every token whose bound reaches the best lower bound) and its
  :data:`RESCORED_TOP` best scores are then recomputed exactly from the
  serving-dtype weight. So the largest logit, the greedy token and the top
  tokens' values are the dense head's own, and the rest are within their
  bound (about 0.5% of the largest logit's magnitude).
- ``int8-bf16``: CPU only, for quantized models where both of the above
  can run: up to :data:`INT8_MAX_ROWS` rows (decode steps) through ``int8``,
  more rows through the bf16 copy, as ``half`` does. Memory: the 8-bit and
  bf16 copies, 3 bytes per weight against ``half``'s 4.

A model's quantization asks for a kernel (:meth:`QuantConfig.lm_head_kernel`):
``dense`` is taken as is; ``half`` means "the fastest 16-bit-or-better head",
the chain ``int8-bf16 -> half -> int8 -> dense`` (:data:`FALLBACKS`).
``LM_HEAD_KERNEL`` (see ``kernels/config.py``) names one kernel instead, and
its refusal is then an error. Adding a kernel is one class here and its place
in :data:`FALLBACKS`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
import torch.nn.functional as F

# fp16 matrix-vector products win while the head is memory-bound; beyond this
# many rows bf16 matrix products do.
HALF_GEMV_MAX_ROWS = 4
# Up to this many rows the 8-bit kernel beats bf16 matrix products (int8-bf16 head).
INT8_MAX_ROWS = 4
# Each row's best scores of the 8-bit head that are recomputed exactly (top tokens' logprobs).
RESCORED_TOP = 8


def half_head_unsupported(device: torch.device) -> str | None:
    """Why the ``half`` LM head cannot run on ``device``, or None."""
    if device.type != "cpu":
        return f"runs on the CPU only, not {device.type}"
    if not torch.backends.mkldnn.is_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "this CPU has no native bf16 matrix products"
    return None


def int8_head_unsupported(device: torch.device, hidden_size: int) -> str | None:
    """Why the ``int8`` LM head cannot run, or None."""
    from text_generation_server.kernels import cpu_ops_status

    if device.type != "cpu":
        return f"runs on the CPU only, not {device.type}"
    if hidden_size % 32:
        return f"needs a hidden size that is a multiple of 32, not {hidden_size}"
    status = cpu_ops_status()
    if not status.available:
        return f"needs the native CPU kernels ({status.reason})"
    return None


def quantize_int8_rows(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric 8-bit codes ``[N, K]`` and float32 scales ``[N, K / group_size]`` of ``weight``."""
    n, k = weight.shape
    w = weight.detach().float().view(n, k // group_size, group_size)
    scales = w.abs().amax(-1) / 127.0
    codes = torch.round(w / scales.clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(-1))
    return codes.clamp(-127, 127).to(torch.int8).view(n, k).contiguous(), scales.contiguous()


def int8_error_bound(scales: torch.Tensor, x: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[M, N]``: how far ``tgs_cpu.int8_linear``'s logit of each row may be from the exact one.

    Weights carry at most half a step (``scale / 2``) of error each, and the
    activations, quantized per group to 16 bits, at most half of ``max|x_g| /
    32767``, against weights of at most ``127 * scale``; so the error of
    row ``n`` is below ``sum_g scale[n, g] * (|x_g|_1 / 2 + 0.125 max|x_g|)``
    (64 * 127 / 65534 < 0.125 covers the activation term and their product).
    A relative margin covers float rounding of both results.
    """
    xg = x.float().view(x.shape[0], -1, group_size).abs()
    per_group = xg.sum(-1) * 0.5 + xg.amax(-1) * 0.125
    return (per_group @ scales.t()) * 1.001 + 1e-6


def int8_kernel_layout(codes: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and scales as ``tgs_cpu.int8_linear`` reads them: rows padded to a multiple of 4
    (zero rows, cut from the output) and scales ``[N / 4, G, 4]``, four rows' side by side."""
    n, g = scales.shape
    pad = -n % 4
    if pad:
        codes = torch.cat([codes, codes.new_zeros(pad, codes.shape[1])])
        scales = torch.cat([scales, scales.new_zeros(pad, g)])
    tiles = scales.view(-1, 4, g).transpose(1, 2).contiguous()
    return codes.contiguous(), tiles


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


class LMHeadKernel(ABC):
    """``[N, hidden]`` activations -> ``[N, rows]`` float32 logits of this rank's vocabulary rows."""

    name: ClassVar[str]

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight  # the serving-dtype rows, shared with the embedding when tied

    @classmethod
    @abstractmethod
    def unsupported(cls, weight: torch.Tensor) -> str | None:
        """Why this kernel cannot take ``weight`` (on its device), or ``None`` when it can."""

    @abstractmethod
    def __call__(self, hidden: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def describe(self) -> str:
        """How it multiplies and the memory of its own copies, for the start-up log."""


class DenseHead(LMHeadKernel):
    name = "dense"

    @classmethod
    def unsupported(cls, weight: torch.Tensor) -> str | None:
        return None

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__(weight)
        self.native = None
        if weight.device.type == "cpu" and weight.dtype in (torch.bfloat16, torch.float16):
            from text_generation_server.kernels import cpu_ops

            self.native = cpu_ops()
        self.dot_rows = int(self.native.dense16_dot_rows()) if self.native and weight.dtype == torch.bfloat16 else 0

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.native is None:
            return F.linear(hidden.to(self.weight.dtype), self.weight).float()
        return self.native.dense16_product(hidden.float().contiguous(), self.weight)

    def describe(self) -> str:
        dtype = str(self.weight.dtype).removeprefix("torch.")
        if self.native is None:
            return dtype
        many = f", bf16 dot products from {self.dot_rows} rows" if self.dot_rows else ""
        return f"{dtype} weights times float32 activations (native){many}"


class HalfHead(LMHeadKernel):
    name = "half"

    @classmethod
    def unsupported(cls, weight: torch.Tensor) -> str | None:
        return half_head_unsupported(weight.device)

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__(weight)
        self.fp16 = weight.detach().to(torch.float16).contiguous()
        self.bf16 = weight.detach().to(torch.bfloat16).contiguous()

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.shape[0] <= HALF_GEMV_MAX_ROWS:
            return F.linear(hidden.to(torch.float16), self.fp16).float()
        return F.linear(hidden.to(torch.bfloat16), self.bf16).float()

    def describe(self) -> str:
        rows, hidden = self.weight.shape
        return f"fp16 up to {HALF_GEMV_MAX_ROWS} rows, bf16 above, {_mib(4 * rows * hidden)}"


class Int8Head(LMHeadKernel):
    name = "int8"

    @classmethod
    def unsupported(cls, weight: torch.Tensor) -> str | None:
        return int8_head_unsupported(weight.device, weight.shape[1])

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__(weight)
        self.group = 64 if weight.shape[1] % 64 == 0 else 32
        codes, self.scales = quantize_int8_rows(weight, self.group)  # scales [rows, groups]: the bound
        self.codes, self.tile_scales = int8_kernel_layout(codes, self.scales)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """8-bit logits with each row's candidates for the top (and its best scores) exact."""
        x = hidden.to(torch.float32).contiguous()
        rows = self.weight.shape[0]
        logits = torch.ops.tgs_cpu.int8_linear(x, self.codes, self.tile_scales, self.group)[:, :rows]
        bound = int8_error_bound(self.scales, x, self.group)
        floor = (logits - bound).amax(-1, keepdim=True)
        picked = logits + bound >= floor
        picked.scatter_(1, logits.topk(min(RESCORED_TOP, rows), dim=-1).indices, True)
        m, v = picked.nonzero(as_tuple=True)
        w = self.weight.index_select(0, v)
        exact = (w * x.to(w.dtype).index_select(0, m)).sum(-1)
        logits.index_put_((m, v), exact.float())
        return logits

    def describe(self) -> str:
        rows, hidden = self.weight.shape
        return f"8-bit, one scale per {self.group} features, candidates rescored exactly, {_mib(rows * hidden)}"


class Int8Bf16Head(Int8Head):
    name = "int8-bf16"

    @classmethod
    def unsupported(cls, weight: torch.Tensor) -> str | None:
        return HalfHead.unsupported(weight) or Int8Head.unsupported(weight)

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__(weight)
        self.bf16 = weight.detach().to(torch.bfloat16).contiguous()

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.shape[0] > INT8_MAX_ROWS:
            return F.linear(hidden.to(torch.bfloat16), self.bf16).float()
        return super().__call__(hidden)

    def describe(self) -> str:
        rows, hidden = self.weight.shape
        return (f"8-bit with candidates rescored exactly up to {INT8_MAX_ROWS} rows, bf16 above, "
                f"{_mib(3 * rows * hidden)}")


LM_HEAD_KERNELS: dict[str, type[LMHeadKernel]] = {
    k.name: k for k in (DenseHead, HalfHead, Int8Head, Int8Bf16Head)
}
# What a request for a kernel tries, in order; dense always runs, so every chain ends there.
FALLBACKS: dict[str, tuple[type[LMHeadKernel], ...]] = {
    "dense": (DenseHead,),
    "half": (Int8Bf16Head, HalfHead, Int8Head, DenseHead),
    "int8": (Int8Head, DenseHead),
    "int8-bf16": (Int8Bf16Head, DenseHead),
}


def build_lm_head_kernel(
    weight: torch.Tensor, requested: str, forced: str | None = None
) -> tuple[LMHeadKernel, list[str]]:
    """The first kernel of ``requested``'s chain that takes ``weight``, and why the ones
    before it did not; ``forced`` (``LM_HEAD_KERNEL``) is that kernel or a ``ValueError``."""
    if forced is not None:
        cls = LM_HEAD_KERNELS[forced]
        why = cls.unsupported(weight)
        if why is not None:
            raise ValueError(f"LM_HEAD_KERNEL={forced}: the {forced} LM head {why}")
        return cls(weight), []
    reasons = []
    for cls in FALLBACKS[requested]:
        why = cls.unsupported(weight)
        if why is None:
            return cls(weight), reasons
        reasons.append(f"the {cls.name} kernel {why}")
    raise AssertionError("the dense head runs everywhere")  # pragma: no cover
