"""The GPTQ solver (Frantar et al., 2022) for one linear layer, plus the
round-to-nearest baseline it is measured against.

A weight ``W [out, in]`` is quantized column by column in the order given by
the inverse Hessian's upper Cholesky factor; each column's rounding error is
spread over the columns not yet quantized so that ``||W X - Q X||`` on the
calibration inputs ``X`` stays small. Rows are independent given the Hessian,
so linears that read the same input (q/k/v, gate/up) can be quantized in one
call on their stacked weights: the result is identical and the per-column
Python loop runs once instead of three times.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from loguru import logger

from text_generation_server.quantize.packing import SUPPORTED_BITS, group_index, num_groups

MAX_PERCDAMP = 1.0


class CholeskyError(RuntimeError):
    """The Hessian stayed not positive definite even at the largest dampening."""


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize: bits, grouping and the GPTQ options of the checkpoint.

    ``group_aware_order`` (without ``act_order``) visits whole groups in
    order of their most active column, and the columns inside each group by
    activity: most of act-order's benefit while every group stays a natural
    column range, so ``g_idx`` is the plain monotonic one.
    ``min_zero=1`` keeps every zero point representable in the v1 "gptq"
    format, which stores ``zero - 1`` (asymmetric groups that would get a zero
    point of 0 are re-fitted with zero 1 instead).
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    act_order: bool = False
    static_groups: bool = False
    group_aware_order: bool = False
    percdamp: float = 0.01
    block_size: int = 128
    min_zero: int = 1

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={self.bits} is not supported; supported: {', '.join(map(str, SUPPORTED_BITS))}")
        if self.group_size != -1 and self.group_size < 1:
            raise ValueError(f"group_size={self.group_size} must be a positive integer or -1 (one group per row)")
        if not 0.0 <= self.percdamp <= MAX_PERCDAMP:
            raise ValueError(f"percdamp={self.percdamp} must lie in [0, {MAX_PERCDAMP}]")

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1


@dataclass
class QuantResult:
    """One quantized weight: integer codes ``[out, in]``, per-group ``scales``
    and integer ``zeros`` ``[G, out]``, ``g_idx [in]``, the dequantized weight
    ``dequant [out, in]`` (float32), the GPTQ objective ``loss`` and the
    dampening fraction actually used."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    dequant: torch.Tensor
    loss: float = 0.0
    percdamp: float = 0.0

    def split_rows(self, sizes: list[int]) -> list[QuantResult]:
        """Split a result for stacked weights back into one result per weight."""
        parts = []
        for codes, scales, zeros, dequant in zip(
            self.codes.split(sizes, 0), self.scales.split(sizes, 1),
            self.zeros.split(sizes, 1), self.dequant.split(sizes, 0), strict=True,
        ):
            parts.append(QuantResult(codes, scales.contiguous(), zeros.contiguous(), self.g_idx,
                                     dequant, float("nan"), self.percdamp))
        return parts


def find_params(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and integer zero point for the columns in ``w [rows, cols]``.

    Symmetric: the grid is centred on zero ``(maxq + 1) / 2`` and spans the
    row's largest magnitude. Asymmetric: the grid spans ``[min(w, 0), max(w, 0)]``.
    A row of zeros gets the grid of ``[-1, 1]`` so its scale is never 0.
    """
    maxq = spec.maxq
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    if spec.sym:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    scale = _storable((xmax - xmin) / maxq)
    if spec.sym:
        zero = torch.full_like(scale, float((maxq + 1) // 2))
    else:
        zero = torch.round(-xmin / scale)
        low = zero < spec.min_zero
        if bool(low.any()):
            # Fit the grid with the smallest storable zero point instead: keep
            # the top of the range, give up the unused negative steps.
            shifted = xmax / (maxq - spec.min_zero)
            scale = _storable(torch.where(low, torch.maximum(shifted, -xmin / spec.min_zero), scale))
            zero = torch.where(low, torch.full_like(zero, float(spec.min_zero)), zero)
    return scale, zero


def _storable(scale: torch.Tensor) -> torch.Tensor:
    """Round scales to what the checkpoint stores (float16), so the solver
    propagates exactly the error the saved weights will have."""
    tiny = 2.0**-24  # smallest positive float16
    return scale.clamp(tiny, torch.finfo(torch.float16).max).to(torch.float16).to(torch.float32)


def _quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def quantize_rtn(weight: torch.Tensor, spec: QuantSpec) -> QuantResult:
    """Round-to-nearest with the same grid and groups as GPTQ (the baseline)."""
    w = weight.detach().to(torch.float32)
    out_f, in_f = w.shape
    size = in_f if spec.group_size == -1 else spec.group_size
    groups = num_groups(in_f, spec.group_size)
    codes = torch.empty_like(w)
    scales = torch.empty(groups, out_f)
    zeros = torch.empty(groups, out_f)
    for g in range(groups):
        cols = slice(g * size, min((g + 1) * size, in_f))
        scale, zero = find_params(w[:, cols], spec)
        codes[:, cols] = _quantize(w[:, cols], scale.unsqueeze(1), zero.unsqueeze(1), spec.maxq)
        scales[g], zeros[g] = scale, zero
    g_idx = group_index(in_f, spec.group_size)
    dequant = scales[g_idx.long()].t() * (codes - zeros[g_idx.long()].t())
    return QuantResult(codes.to(torch.int32), scales, zeros.to(torch.int32), g_idx, dequant)


# The dtype of the calibration matmuls (``--calibration-dtype``): float32, or bfloat16 where its
# matrix units make them several times faster; set for a run by ``calibration_precision``.
_CALIBRATION_DTYPE: torch.dtype = torch.float32


@contextlib.contextmanager
def calibration_precision(dtype: torch.dtype, device: torch.device) -> Iterator[None]:
    """Run the calibration forwards (autocast) and the Hessian products in ``dtype`` (bfloat16 or
    float32); the GPTQ solve itself always runs in float32 (see :func:`exact_precision`)."""
    global _CALIBRATION_DTYPE
    previous = _CALIBRATION_DTYPE
    _CALIBRATION_DTYPE = dtype
    try:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            yield
    finally:
        _CALIBRATION_DTYPE = previous


def exact_precision(device: torch.device):
    """Autocast off: the solve, the error report and the packing see float32 whatever the forwards use."""
    return torch.autocast(device.type, enabled=False)


class HessianAccumulator:
    """Running ``H = 2/N * sum(x x^T)`` over the ``N`` input rows seen by one linear.

    With bfloat16 calibration each batch's product is computed in bfloat16 (accumulated in float32
    inside the matrix unit, rounded once per batch) and summed in float32."""

    def __init__(self, in_features: int) -> None:
        self.in_features = in_features
        self._sum: torch.Tensor | None = None  # on the device of the first inputs
        self.rows = 0
        self.dtype = _CALIBRATION_DTYPE

    def add(self, x: torch.Tensor) -> None:
        """Add a batch of inputs ``[..., in_features]``."""
        x = x.detach().reshape(-1, self.in_features)
        if self._sum is None:
            self._sum = torch.zeros(self.in_features, self.in_features, dtype=torch.float32, device=x.device)
        if self.dtype == torch.float32:
            with exact_precision(x.device):
                x = x.to(torch.float32)
                self._sum.addmm_(x.t(), x)
        else:
            x = x.to(self.dtype)
            self._sum += torch.mm(x.t(), x).to(torch.float32)
        self.rows += x.shape[0]

    @property
    def device(self) -> torch.device:
        return self._sum.device if self._sum is not None else torch.device("cpu")

    def hessian(self) -> torch.Tensor:
        if self.rows == 0:
            raise ValueError("no calibration inputs reached this layer")
        return self._sum * (2.0 / self.rows)


def inverse_hessian_factor(hessian: torch.Tensor, percdamp: float, name: str = "layer") -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + damp I)^-1`` with ``damp = percdamp * mean(diag H)``.

    When a factorisation fails, the dampening is doubled (from at least
    0.25%) and retried up to ``MAX_PERCDAMP``; each retry is logged. Returns the
    factor and the fraction used. Raises :class:`CholeskyError` if even the
    largest dampening fails and ``ValueError`` for a non-finite Hessian.
    """
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError(f"{name}: the calibration Hessian has non-finite values (inf/NaN activations)")
    mean_diag = float(hessian.diagonal().mean())
    pct = percdamp
    while True:
        damped = hessian.clone()
        damped.diagonal().add_(pct * mean_diag)
        factor, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            factor, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0 and bool(torch.isfinite(factor).all()):
                return factor, pct
        nxt = max(pct * 2.0, 0.0025)
        if nxt > MAX_PERCDAMP:
            raise CholeskyError(
                f"{name}: Cholesky factorisation of the Hessian failed even with percdamp={pct:g}; "
                "the calibration inputs are degenerate (try more or different calibration samples)"
            )
        logger.warning(f"{name}: Cholesky failed at percdamp={pct:g}; retrying with percdamp={nxt:g}")
        pct = nxt


def group_aware_permutation(diag: torch.Tensor, group_size: int) -> torch.Tensor:
    """Processing order that keeps each group of ``group_size`` columns contiguous:
    groups by descending largest Hessian diagonal, columns within a group by
    descending diagonal. A width ``group_size`` does not divide ends in a
    shorter last group, which takes its place by activity like any other."""
    n = diag.numel()
    groups = -(-n // group_size)
    # Pad the short last group with -inf: its padding sorts after its real
    # columns and never wins the group's maximum, and is dropped below.
    padded = torch.full((groups * group_size,), float("-inf"), dtype=diag.dtype, device=diag.device)
    padded[:n] = diag
    d = padded.view(groups, group_size)
    local = torch.argsort(d, dim=1, descending=True, stable=True)
    order = torch.argsort(d.max(dim=1).values, descending=True, stable=True)
    starts = (order * group_size).unsqueeze(1)
    perm = (starts + local[order]).reshape(-1)
    return perm[perm < n]


@contextmanager
def _one_thread() -> Iterator[None]:
    """The column loop is thousands of tiny ops: intra-op threads only add
    synchronisation (and stall badly on a busy host), so run it on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, name: str = "layer") -> QuantResult:
    """Quantize ``weight [out, in]`` with GPTQ given the input Hessian ``[in, in]``.

    Columns whose Hessian diagonal is 0 (inputs never active) are "dead": they
    are quantized as zeros and take no part in error propagation. Groups hold
    ``group_size`` columns, ``G = ceil(in / group_size)`` of them; when the
    size does not divide ``in`` the last group is shorter (without act-order
    ``g_idx[i] = i // group_size``). With ``act_order`` columns are processed
    by descending Hessian diagonal, groups are formed in that order and
    ``g_idx`` records each column's group; with ``static_groups`` the group
    grids are fitted on the original weight in natural column order, so
    ``g_idx`` stays ``i // group_size`` even with ``act_order``.
    """
    with _one_thread():
        return _gptq_quantize(weight, hessian, spec, name)


def _gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, name: str) -> QuantResult:
    w = weight.detach().to(torch.float32).clone()
    out_f, in_f = w.shape
    if hessian.shape != (in_f, in_f):
        raise ValueError(f"{name}: Hessian shape {tuple(hessian.shape)} does not match in_features={in_f}")
    maxq = spec.maxq
    grouped = spec.group_size != -1 and spec.group_size < in_f
    size = spec.group_size if grouped else in_f
    groups = num_groups(in_f, size)

    h = hessian.detach().to(torch.float32).clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    dev = w.device
    scales = torch.empty(groups, out_f, device=dev)
    zeros = torch.empty(groups, out_f, device=dev)
    if not grouped or spec.static_groups:
        for g in range(groups):
            cols = slice(g * size, min((g + 1) * size, in_f))
            scales[g], zeros[g] = find_params(w[:, cols], spec)

    perm = None
    if spec.act_order:
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
    elif spec.group_aware_order and grouped and not spec.static_groups:
        perm = group_aware_permutation(h.diagonal(), size)
    if perm is not None:
        w = w[:, perm]
        h = h[perm][:, perm]

    # Group of each processed column. Full act-order forms groups in
    # processing order (g_idx becomes non-monotonic); otherwise groups are
    # the natural column ranges, whichever order their columns are visited in.
    # Either way group g has min(size, in_f - g * size) columns: when size
    # does not divide in_f the last group is shorter (AutoGPTQ's layout).
    if spec.act_order and grouped and not spec.static_groups:
        col_group = torch.arange(in_f, device=dev) // size
    else:
        natural = torch.arange(in_f, device=dev) if perm is None else perm
        col_group = natural // size
    col_group_list = col_group.tolist()
    group_len = [min(size, in_f - g * size) for g in range(groups)]

    u, used_pct = inverse_hessian_factor(h, spec.percdamp, name)

    fit_groups = grouped and not spec.static_groups
    if fit_groups:
        # Groups fitted during the solve are contiguous in processing order.
        # Blocks hold whole groups, so a group's grid is fitted on columns that
        # already carry every earlier column's error update.
        group_starts = [k for k in range(in_f) if k == 0 or col_group_list[k] != col_group_list[k - 1]]
        bounds = group_starts[::max(1, spec.block_size // size)] + [in_f]
    else:
        bounds = [*range(0, in_f, spec.block_size), in_f]

    codes = torch.empty(out_f, in_f, device=dev)
    losses = torch.zeros(out_f, device=dev)
    scale_col = zero_col = None
    last_group = -1
    for i1, i2 in itertools.pairwise(bounds):
        w1 = w[:, i1:i2]
        u1 = u[i1:i2, i1:i2]
        err1 = torch.empty(out_f, i2 - i1, device=dev)
        for i in range(i2 - i1):
            col = i1 + i
            g = col_group_list[col]
            if g != last_group:
                if fit_groups:
                    scales[g], zeros[g] = find_params(w1[:, i:i + group_len[g]], spec)
                scale_col, zero_col = scales[g], zeros[g]
                last_group = g
            x = w1[:, i]
            q = _quantize(x, scale_col, zero_col, maxq)
            codes[:, col] = q
            d = u1[i, i]
            e = (x - scale_col * (q - zero_col)) / d
            losses.add_(e * e)
            if i + 1 < i2 - i1:
                w1[:, i + 1:].addr_(e, u1[i, i + 1:], alpha=-1.0)
            err1[:, i] = e
        if i2 < in_f:
            w[:, i2:].addmm_(err1, u[i1:i2, i2:], alpha=-1.0)

    if perm is not None:
        inv = torch.argsort(perm)
        codes = codes[:, inv]
        g_idx = torch.empty(in_f, dtype=torch.int32, device=dev)
        g_idx[perm] = col_group.to(torch.int32)
    else:
        g_idx = col_group.to(torch.int32)
    gi = g_idx.long()
    dequant = scales[gi].t() * (codes - zeros[gi].t())
    return QuantResult(codes.to(torch.int32), scales, zeros.to(torch.int32), g_idx, dequant,
                       float(losses.sum()) / 2.0, used_pct)


def relative_output_error(weight: torch.Tensor, dequant: torch.Tensor, hessian: torch.Tensor) -> float:
    """``||W X - Q X||_F / ||W X||_F`` over the calibration inputs, from their Hessian.

    Uses ``||A X||^2 = tr(A (X X^T) A^T)``, so no activations are needed.
    """
    w = weight.detach().to(torch.float32)
    delta = w - dequant.to(torch.float32)
    h = hessian.to(torch.float32)
    num = float(((delta @ h) * delta).sum())
    den = float(((w @ h) * w).sum())
    if den <= 0.0:
        return 0.0 if num <= 0.0 else float("inf")
    return max(num, 0.0) ** 0.5 / den ** 0.5
