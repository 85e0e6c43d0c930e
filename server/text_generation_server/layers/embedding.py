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

``LM_HEAD_KERNEL`` names the kernel to use instead of the automatic choice.
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

LM_HEAD_KERNELS = ("dense", "half")
LM_HEAD_KERNEL_ENV = "LM_HEAD_KERNEL"
# fp16 matrix-vector products win while the head is memory-bound; beyond this
# many rows bf16 matrix products do.
HALF_GEMV_MAX_ROWS = 4


def half_head_unsupported(device: torch.device) -> str | None:
    """Why the ``half`` LM head cannot run on ``device``, or None."""
    if device.type != "cpu":
        return f"runs on the CPU only, not {device.type}"
    if not torch.backends.mkldnn.is_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "this CPU has no native bf16 matrix products"
    return None


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
        # The ``half`` kernel's copies of the weight, built by finish_loading.
        self._fp16: torch.Tensor | None = None
        self._bf16: torch.Tensor | None = None
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
        self.kernel, self._fp16, self._bf16 = "dense", None, None
        if wanted == "half":
            why = half_head_unsupported(self.device)
            if why is None:
                self._fp16 = self.weight.detach().to(torch.float16).contiguous()
                self._bf16 = self.weight.detach().to(torch.bfloat16).contiguous()
                self.kernel = "half"
            elif forced:
                raise ValueError(f"{LM_HEAD_KERNEL_ENV}=half: the half LM head {why}")
            else:
                logger.info(f"LM head stays dense: the half kernel {why}")
        rows = self.weight.shape[0]
        how = (
            f"fp16 up to {HALF_GEMV_MAX_ROWS} rows, bf16 above, {2 * rows * self.weight.shape[1] * 2 / 2**20:.0f} MiB"
            if self.kernel == "half"
            else str(self.weight.dtype).removeprefix("torch.")
        )
        logger.info(f"LM head kernel: {self.kernel} ({how}; {rows} vocabulary rows on this rank)")

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[N, hidden]`` -> ``[N, vocab_size]`` float32 logits, identical on every rank."""
        if self.kernel == "half" and self._fp16 is not None and self._bf16 is not None:
            if hidden.shape[0] <= HALF_GEMV_MAX_ROWS:
                logits = F.linear(hidden.to(torch.float16), self._fp16).float()
            else:
                logits = F.linear(hidden.to(torch.bfloat16), self._bf16).float()
        else:
            logits = F.linear(hidden, self.weight).float()
        return self.dist.all_gather(logits, dim=-1, sizes=self.vocab_sizes)
