"""Run the Triton paged decode attention on random caches; print its error against the SDPA path.

Started by test_triton_attention.py in a fresh interpreter with ``TRITON_INTERPRET=1`` (it must
be set before Triton is imported), and by the CUDA tests on a GPU. Arguments: a JSON list of decode
cases ``[name, heads, kv_heads, head_dim, block_size, context_lens, window, softcap, dtype]``; the
device (default cpu); a JSON list of mixed-step cases ``[name, heads, kv_heads, head_dim, block_size,
[[new_tokens, context_len], ...], window, softcap, dtype]``. Prints ``{name: max abs error relative
to the output's max}``.
"""

from __future__ import annotations

import json
import sys

import torch
from text_generation_server.layers.attention import AttentionMetadata, TorchSDPABackend
from text_generation_server.layers.triton_attention import paged_attention_decode


def case(heads, kv_heads, head_dim, block_size, lens, window, softcap, dtype, device) -> float:
    gen = torch.Generator().manual_seed(len(lens) * 7 + head_dim)
    dtype = getattr(torch, dtype)
    batch = len(lens)
    max_blocks = max(-(-n // block_size) for n in lens)
    num_blocks = batch * max_blocks + 3
    # shuffled block ids, as the allocator hands them out
    ids = torch.randperm(num_blocks - 1, generator=gen)[: batch * max_blocks] + 1
    tables = ids.view(batch, max_blocks)
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    q = torch.randn(batch, heads, head_dim, generator=gen).to(dtype)
    lens_t = torch.tensor(lens)
    scale = head_dim ** -0.5
    attn = AttentionMetadata(slot_mapping=torch.zeros(batch, dtype=torch.long), block_tables=tables,
                             context_lens=lens_t, query_lens=[1] * batch)
    want = TorchSDPABackend()._decode(q.float(), k_cache.float(), v_cache.float(), attn, scale, rows=None,
                                      window=window, softcap=softcap)
    got = paged_attention_decode(q.to(device), k_cache.to(device), v_cache.to(device), tables.to(device),
                                 lens_t.to(device), scale, window, softcap).float().cpu()
    return float((got - want).abs().max() / want.abs().max())


def backend_step(device) -> float:
    """A whole decode step through the CUDA backend (cache write included) against the SDPA backend."""
    from text_generation_server.layers.attention import TritonPagedDecodeBackend

    gen = torch.Generator().manual_seed(3)
    heads, kv_heads, head_dim, block_size = 4, 2, 16, 4
    lens = [6, 1, 9]
    tables = torch.tensor([[1, 2, 0], [3, 0, 0], [4, 5, 6]])
    slots = torch.tensor([tables[b, (n - 1) // block_size] * block_size + (n - 1) % block_size
                          for b, n in enumerate(lens)])
    attn = AttentionMetadata(slot_mapping=slots, block_tables=tables, context_lens=torch.tensor(lens),
                             query_lens=[1, 1, 1])
    caches = [torch.randn(8, block_size, kv_heads, head_dim, generator=gen) for _ in range(2)]
    q = torch.randn(3, heads, head_dim, generator=gen)
    k = torch.randn(3, kv_heads, head_dim, generator=gen)
    v = torch.randn(3, kv_heads, head_dim, generator=gen)
    ref_caches = [c.clone() for c in caches]
    want = TorchSDPABackend().forward(q, k, v, *ref_caches, attn, 0.25)
    dev_caches = [c.to(device) for c in caches]
    dev_attn = AttentionMetadata(slot_mapping=slots.to(device), block_tables=tables.to(device),
                                 context_lens=torch.tensor(lens).to(device), query_lens=[1, 1, 1])
    got = TritonPagedDecodeBackend().forward(q.to(device), k.to(device), v.to(device), *dev_caches, dev_attn, 0.25)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(dev_caches, ref_caches, strict=True)), "cache writes differ"
    return float((got.cpu() - want).abs().max() / want.abs().max())


def varlen_case(heads, kv_heads, head_dim, block_size, seqs, window, softcap, dtype, device) -> float:
    """A mixed step (fresh prompts, chunks after earlier context, single tokens) through the Triton
    backend against the SDPA backend; ``seqs`` lists (new tokens, context length) per sequence."""
    from text_generation_server.layers.attention import TritonPagedDecodeBackend

    gen = torch.Generator().manual_seed(head_dim * 3 + len(seqs))
    dtype = getattr(torch, dtype)
    max_blocks = max(-(-ctx // block_size) for _, ctx in seqs)
    num_blocks = len(seqs) * max_blocks + 2
    ids = torch.randperm(num_blocks - 1, generator=gen)[: len(seqs) * max_blocks] + 1
    tables = ids.view(len(seqs), max_blocks)
    slots = []
    for b, (n, ctx) in enumerate(seqs):
        for p in range(ctx - n, ctx):
            slots.append(int(tables[b, p // block_size]) * block_size + p % block_size)
    tokens = sum(n for n, _ in seqs)
    caches = [torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype) for _ in range(2)]
    q = torch.randn(tokens, heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(tokens, kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(tokens, kv_heads, head_dim, generator=gen).to(dtype)
    meta = dict(block_tables=tables, context_lens=torch.tensor([c for _, c in seqs]),
                query_lens=[n for n, _ in seqs])
    ref = [c.float().clone() for c in caches]
    want = TorchSDPABackend().forward(q.float(), k.float(), v.float(), *ref,
                                      AttentionMetadata(slot_mapping=torch.tensor(slots), **meta),
                                      head_dim ** -0.5, window, softcap)
    dev = [c.to(device) for c in caches]
    attn = AttentionMetadata(slot_mapping=torch.tensor(slots).to(device),
                             **{k_: (v_.to(device) if isinstance(v_, torch.Tensor) else v_) for k_, v_ in meta.items()})
    got = TritonPagedDecodeBackend().forward(q.to(device), k.to(device), v.to(device), *dev, attn, head_dim ** -0.5,
                                             window, softcap).float().cpu()
    return float((got - want).abs().max() / want.abs().max())


def main() -> None:
    device = torch.device(sys.argv[2] if len(sys.argv) > 2 else "cpu")
    errors = {"backend_step": backend_step(device)}
    if len(sys.argv) > 3:
        for name, heads, kv_heads, head_dim, block_size, seqs, window, softcap, dtype in json.loads(sys.argv[3]):
            errors[name] = varlen_case(heads, kv_heads, head_dim, block_size, seqs, window, softcap, dtype, device)
    for name, heads, kv_heads, head_dim, block_size, lens, window, softcap, dtype in json.loads(sys.argv[1]):
        errors[name] = case(heads, kv_heads, head_dim, block_size, lens, window, softcap, dtype, device)
    print(json.dumps(errors))


if __name__ == "__main__":
    main()
