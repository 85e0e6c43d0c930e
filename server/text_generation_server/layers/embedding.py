"""Vocabulary-parallel token embedding and LM head.

Each rank holds a contiguous range of vocabulary rows. The embedding looks up
the ids in its range, zeroes the rest and all-reduces; the LM head computes
the logits of its rows and all-gathers them, so every rank ends with the full
vocabulary. A tied LM head reuses the embedding's shard.

Its kernel (``layers/lm_head_kernels.py``) is chosen once loading is done,
by the execution plan (:meth:`ParallelLMHead.choose_kernel`).
"""

from __future__ import annotations

from collections.abc import Hashable

import torch
import torch.nn.functional as F
from loguru import logger

from text_generation_server.distributed import Distributed
from text_generation_server.kernels.config import KernelConfig
from text_generation_server.layers.lm_head_kernels import (
    FALLBACKS,
    DenseHead,
    LMHeadKernel,
    build_lm_head_kernel,
)
from text_generation_server.layers.loading import (
    check_checkpoint_tensor,
    copy_checked,
    set_weight_attrs,
)
from text_generation_server.weights import Weights, shard_range


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
        if kernel not in FALLBACKS:
            raise ValueError(f"unknown LM head kernel {kernel!r} (known: {', '.join(FALLBACKS)})")
        self.dist = dist
        self.vocab_size = vocab_size
        self.device = device
        self.preferred_kernel = kernel
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
        # Dense until the plan chooses (the weight is empty before loading).
        self.impl: LMHeadKernel = DenseHead(self.weight)

    def choose_kernel(self, kernels: KernelConfig) -> str:
        """Build the kernel once the weight is loaded (``LM_HEAD_KERNEL`` in ``kernels`` overrides
        the requested one); returns a line for the start-up log."""
        self.impl, reasons = build_lm_head_kernel(self.weight, self.preferred_kernel, kernels.lm_head_kernel)
        for why in reasons:
            logger.info(f"LM head: {why}")
        rows = self.weight.shape[0]
        return f"{self.kernel} ({self.impl.describe()}; {rows} vocabulary rows on this rank)"

    @property
    def kernel(self) -> str:
        return self.impl.name

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[N, hidden]`` -> ``[N, vocab_size]`` float32 logits, identical on every rank."""
        logits = self.impl(hidden)
        return self.dist.all_gather(logits, dim=-1, sizes=self.vocab_sizes)
