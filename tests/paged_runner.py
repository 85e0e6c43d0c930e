"""A minimal paged-KV driver for model tests: allocates blocks out of order,
builds AttentionMetadata for prefill, decode and chunked steps, and returns
logits per sequence. Independent of the engine package on purpose. Runs the
model's execution plan as the engine does (``plan``: another one to compare)."""

from __future__ import annotations

import random

import torch
from text_generation_server.layers.attention import AttentionMetadata


class PagedRunner:
    def __init__(self, model, *, num_blocks: int = 64, block_size: int = 4, seed: int = 0, plan=None,
                 kv_dtype=None):
        self.model = model
        self.forward = (plan or getattr(model, "plan", None) or model).forward
        self.block_size = block_size
        shape = (num_blocks, block_size, model.num_kv_heads, model.head_dim)
        self.kv_caches = [
            (
                torch.zeros(shape, dtype=kv_dtype or model.dtype, device=model.device),
                torch.zeros(shape, dtype=kv_dtype or model.dtype, device=model.device),
            )
            for _ in range(model.num_layers)
        ]
        # Block 0 is padding; hand out the others in a shuffled, non-contiguous order.
        self.free = list(range(1, num_blocks))
        random.Random(seed).shuffle(self.free)
        self.blocks: dict[object, list[int]] = {}
        self.lengths: dict[object, int] = {}

    def step(self, batch: list[tuple[object, list[int]]]) -> list[torch.Tensor]:
        """Run one forward over ``(seq_id, new_token_ids)`` pairs; logits [n_new, vocab] per seq."""
        bs = self.block_size
        ids, positions, slots, query_lens, context_lens, tables = [], [], [], [], [], []
        for seq_id, tokens in batch:
            start = self.lengths.get(seq_id, 0)
            end = start + len(tokens)
            blocks = self.blocks.setdefault(seq_id, [])
            while len(blocks) * bs < end:
                blocks.append(self.free.pop())
            ids.extend(tokens)
            positions.extend(range(start, end))
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, end))
            query_lens.append(len(tokens))
            context_lens.append(end)
            tables.append(list(blocks))
            self.lengths[seq_id] = end
        width = max(len(t) for t in tables)
        device = self.model.device  # the step's tensors where the model is (a GPU model too)
        block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int64, device=device)
        attn = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            block_tables=block_tables,
            context_lens=torch.tensor(context_lens, dtype=torch.int64, device=device),
            query_lens=query_lens,
        )
        with torch.inference_mode():
            hidden = self.forward(
                torch.tensor(ids, dtype=torch.int64, device=device),
                torch.tensor(positions, dtype=torch.int64, device=device),
                self.kv_caches,
                attn,
            )
            logits = self.model.compute_logits(hidden)
        return list(logits.split(query_lens))
