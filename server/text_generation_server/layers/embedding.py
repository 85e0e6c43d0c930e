"""Vocabulary-parallel token embedding and LM head.

Each rank holds a contiguous range of vocabulary rows. The embedding looks up
the ids in its range, zeroes the rest and all-reduces; the LM head computes
the logits of its rows and all-gathers them, so every rank ends with the full
vocabulary. A tied LM head reuses the embedding's shard.

The head is the largest single matmul of a decode step (vocabulary x hidden)
and, for a 4-bit model on the CPU, most of the step's weight bytes. Its
kernel is chosen once loading is done (:meth:`ParallelLMHead.finish_loading`):

- ``dense``: ``F.linear`` on the serving dtype's weight (exact; the default);
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

A quantized model asks for ``half`` and gets ``int8-bf16`` where both kernels
run, else ``half``, else ``int8``. ``LM_HEAD_KERNEL`` names the kernel to use
instead of the automatic choice.
"""

from __future__ import annotations

import os
from collections.abc import Hashable

import torch
import torch.nn.functional as F
from loguru import logger

from text_generation_server.distributed import Distributed
from text_generation_server.layers.loading import (
    check_checkpoint_tensor,
    copy_checked,
    set_weight_attrs,
)
from text_generation_server.weights import Weights, shard_range

LM_HEAD_KERNELS = ("dense", "half", "int8", "int8-bf16")
LM_HEAD_KERNEL_ENV = "LM_HEAD_KERNEL"
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


class VocabParallelEmbedding(torch.nn.Module):
    """Embedding rows ``[vocab_start, vocab_end)`` of a ``[vocab_size, hidden]`` table."""

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        *,
        dist: Distributed,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.dist = dist
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.vocab_sizes = [
            stop - start
            for start, stop in (
                shard_range(vocab_size, dist.world_size, r) for r in range(dist.world_size)
            )
        ]
        self.vocab_start, self.vocab_end = shard_range(vocab_size, dist.world_size, dist.rank)
        if self.vocab_end == self.vocab_start:
            raise ValueError(
                f"vocabulary of {vocab_size} tokens is too small for {dist.world_size} shards"
            )
        weight = torch.empty(
            self.vocab_end - self.vocab_start, hidden_size, dtype=dtype, device=device
        )
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        set_weight_attrs(
            self.weight,
            weight_loader=self.weight_loader,
            shard_ids=(None,),
            checkpoint_shapes={None: [vocab_size, hidden_size]},
        )

    def weight_loader(
        self, param: torch.Tensor, weights: Weights, name: str, shard_id: Hashable = None
    ) -> None:
        """Copy this rank's vocabulary rows of ``name``."""
        check_checkpoint_tensor(param, weights, name, shard_id)
        rows = weights.get_range(name, 0, self.vocab_start, self.vocab_end, cast=False)
        copy_checked(param.data, rows, name)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.dist.world_size == 1:
            return F.embedding(input_ids, self.weight)
        outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)
        local_ids = (input_ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local_ids, self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return self.dist.all_reduce(out)

    def extra_repr(self) -> str:
        return f"vocab=[{self.vocab_start}, {self.vocab_end}) of {self.vocab_size}, hidden={self.hidden_size}"


class ParallelLMHead(torch.nn.Module):
    """Logits over the full vocabulary from this rank's vocabulary rows.

    With ``tied_to`` the head shares the embedding's parameter (same rows,
    same memory) and has no checkpoint tensor of its own.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        *,
        dist: Distributed,
        dtype: torch.dtype,
        device: torch.device,
        tied_to: VocabParallelEmbedding | None = None,
        kernel: str = "dense",
    ) -> None:
        super().__init__()
        if kernel not in LM_HEAD_KERNELS:
            raise ValueError(f"unknown LM head kernel {kernel!r} (known: {', '.join(LM_HEAD_KERNELS)})")
        self.dist = dist
        self.vocab_size = vocab_size
        self.device = device
        self.preferred_kernel = kernel
        self.kernel = "dense"
        # The ``half`` / ``int8`` kernels' copies of the weight, built by finish_loading.
        self._fp16: torch.Tensor | None = None
        self._bf16: torch.Tensor | None = None
        self._int8: tuple[torch.Tensor, torch.Tensor, int] | None = None
        self._int8_scales: torch.Tensor | None = None  # [rows, groups], for the error bound
        if tied_to is not None:
            if (tied_to.vocab_size, tied_to.hidden_size) != (vocab_size, hidden_size):
                raise ValueError(
                    f"cannot tie an LM head of {vocab_size}x{hidden_size} to an embedding of "
                    f"{tied_to.vocab_size}x{tied_to.hidden_size}"
                )
            self.vocab_sizes = tied_to.vocab_sizes
            self.weight = tied_to.weight
            self.tied = True
        else:
            table = VocabParallelEmbedding(
                vocab_size, hidden_size, dist=dist, dtype=dtype, device=device
            )
            self.vocab_sizes = table.vocab_sizes
            self.weight = table.weight
            self.tied = False

    def finish_loading(self) -> None:
        """Choose the kernel now that the weight is loaded (``LM_HEAD_KERNEL`` overrides); logs it."""
        forced = os.environ.get(LM_HEAD_KERNEL_ENV, "").strip().lower()
        if forced and forced not in LM_HEAD_KERNELS:
            raise ValueError(
                f"{LM_HEAD_KERNEL_ENV}={forced!r} is not an LM head kernel (known: {', '.join(LM_HEAD_KERNELS)})"
            )
        wanted = forced or self.preferred_kernel
        self.kernel, self._fp16, self._bf16, self._int8, self._int8_scales = "dense", None, None, None, None
        rows, hidden = self.weight.shape
        candidates = [wanted] if forced or wanted != "half" else ["int8-bf16", "half", "int8"]
        for kernel in candidates:
            if kernel == "dense":
                break
            why = self._unsupported(kernel, hidden)
            if why is None:
                self._build(kernel)
                break
            if forced:
                raise ValueError(f"{LM_HEAD_KERNEL_ENV}={kernel}: the {kernel} LM head {why}")
            logger.info(f"LM head: the {kernel} kernel {why}")
        if self.kernel == "half":
            how = f"fp16 up to {HALF_GEMV_MAX_ROWS} rows, bf16 above, {2 * rows * hidden * 2 / 2**20:.0f} MiB"
        elif self.kernel == "int8" and self._int8 is not None:
            how = (f"8-bit, one scale per {self._int8[2]} features, candidates rescored exactly, "
                   f"{rows * hidden / 2**20:.0f} MiB")
        elif self.kernel == "int8-bf16" and self._int8 is not None:
            how = (f"8-bit with candidates rescored exactly up to {INT8_MAX_ROWS} rows, bf16 above, "
                   f"{3 * rows * hidden / 2**20:.0f} MiB")
        else:
            how = str(self.weight.dtype).removeprefix("torch.")
        logger.info(f"LM head kernel: {self.kernel} ({how}; {rows} vocabulary rows on this rank)")

    def _unsupported(self, kernel: str, hidden: int) -> str | None:
        if kernel == "half":
            return half_head_unsupported(self.device)
        if kernel == "int8":
            return int8_head_unsupported(self.device, hidden)
        return half_head_unsupported(self.device) or int8_head_unsupported(self.device, hidden)

    def _build(self, kernel: str) -> None:
        if kernel == "half":
            self._fp16 = self.weight.detach().to(torch.float16).contiguous()
        if kernel in ("half", "int8-bf16"):
            self._bf16 = self.weight.detach().to(torch.bfloat16).contiguous()
        if kernel in ("int8", "int8-bf16"):
            group = 64 if self.weight.shape[1] % 64 == 0 else 32
            codes, plain_scales = quantize_int8_rows(self.weight, group)
            codes, scales = int8_kernel_layout(codes, plain_scales)
            self._int8 = (codes, scales, group)
            self._int8_scales = plain_scales
        self.kernel = kernel

    def _int8_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """8-bit logits with each row's candidates for the top (and its best scores) exact."""
        assert self._int8 is not None and self._int8_scales is not None
        codes, scales, group = self._int8
        x = hidden.to(torch.float32).contiguous()
        rows = self.weight.shape[0]
        logits = torch.ops.tgs_cpu.int8_linear(x, codes, scales, group)[:, :rows]
        bound = int8_error_bound(self._int8_scales, x, group)
        floor = (logits - bound).amax(-1, keepdim=True)
        picked = logits + bound >= floor
        picked.scatter_(1, logits.topk(min(RESCORED_TOP, rows), dim=-1).indices, True)
        m, v = picked.nonzero(as_tuple=True)
        w = self.weight.index_select(0, v)
        exact = (w * x.to(w.dtype).index_select(0, m)).sum(-1)
        logits.index_put_((m, v), exact.float())
        return logits

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[N, hidden]`` -> ``[N, vocab_size]`` float32 logits, identical on every rank."""
        if self.kernel == "int8-bf16" and self._bf16 is not None and hidden.shape[0] > INT8_MAX_ROWS:
            logits = F.linear(hidden.to(torch.bfloat16), self._bf16).float()
        elif self.kernel in ("int8", "int8-bf16") and self._int8 is not None:
            logits = self._int8_logits(hidden)
        elif self.kernel == "half" and self._fp16 is not None and self._bf16 is not None:
            if hidden.shape[0] <= HALF_GEMV_MAX_ROWS:
                logits = F.linear(hidden.to(torch.float16), self._fp16).float()
            else:
                logits = F.linear(hidden.to(torch.bfloat16), self._bf16).float()
        else:
            logits = F.linear(hidden, self.weight).float()
        return self.dist.all_gather(logits, dim=-1, sizes=self.vocab_sizes)
