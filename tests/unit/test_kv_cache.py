"""Block allocation and KV cache sizing."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from text_generation_server.engine.kv_cache import (
    CPU_MAX_CACHE_TOKENS,
    BlockAllocator,
    CacheFullError,
    KVCache,
    blocks_for_memory,
    bytes_per_block,
    host_available_bytes,
)


def test_allocator_never_hands_out_the_padding_block_or_a_block_twice():
    alloc = BlockAllocator(9)
    blocks = alloc.allocate(3) + alloc.allocate(5)
    assert sorted(blocks) == list(range(1, 9))
    assert alloc.num_free == 0


def test_allocator_raises_cache_full_and_allocates_nothing_when_short():
    alloc = BlockAllocator(5)
    held = alloc.allocate(2)
    with pytest.raises(CacheFullError, match="3 blocks needed, 2 of 4 free"):
        alloc.allocate(3)
    assert alloc.num_free == 2
    alloc.free(held)
    assert alloc.num_free == 4


def test_allocator_refuses_to_free_blocks_it_did_not_hand_out():
    alloc = BlockAllocator(5)
    blocks = alloc.allocate(2)
    alloc.free(blocks)
    with pytest.raises(ValueError, match="not allocated"):
        alloc.free(blocks)
    with pytest.raises(ValueError, match="not allocated"):
        alloc.free([0])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 6)), max_size=40))
def test_allocator_holds_each_block_once_under_any_allocate_free_sequence(ops):
    alloc = BlockAllocator(12)
    held: list[list[int]] = []
    for is_alloc, n in ops:
        if is_alloc:
            if n > alloc.num_free:
                with pytest.raises(CacheFullError):
                    alloc.allocate(n)
            else:
                held.append(alloc.allocate(n))
        elif held:
            alloc.free(held.pop(n % len(held)))
        flat = [b for blocks in held for b in blocks]
        assert len(flat) == len(set(flat))
        assert 0 not in flat
        assert alloc.num_free + len(flat) == 11


def test_kv_cache_layout_and_zero_init():
    cache = KVCache(3, 5, 16, 2, 8, torch.float32, torch.device("cpu"))
    assert len(cache.layers) == 3
    for k, v in cache.layers:
        assert k.shape == v.shape == (5, 16, 2, 8)
        assert not k.any() and not v.any()
    assert cache.capacity_tokens == 4 * 16
    assert cache.nbytes == 5 * bytes_per_block(3, 16, 2, 8, torch.float32)


SIZES = dict(
    num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float32, device=torch.device("cpu")
)
PER_BLOCK = bytes_per_block(2, 16, 2, 16, torch.float32)  # 8 KiB


def test_explicit_token_budget_sets_the_block_count():
    n = blocks_for_memory(**SIZES, max_batch_total_tokens=1000, available_bytes=2**30)
    assert n == 63 + 1  # ceil(1000 / 16) usable blocks + padding


def test_explicit_budget_is_raised_to_what_a_maximal_prefill_needs():
    n = blocks_for_memory(**SIZES, max_batch_total_tokens=64, min_tokens=256, available_bytes=2**30)
    assert n == 16 + 1


def test_explicit_budget_beyond_memory_names_the_numbers():
    with pytest.raises(CacheFullError, match="lower --max-batch-total-tokens"):
        blocks_for_memory(**SIZES, max_batch_total_tokens=10**6, available_bytes=PER_BLOCK * 100)


def test_memory_sizing_uses_a_share_of_available_memory():
    available = PER_BLOCK * 1000
    n = blocks_for_memory(**SIZES, available_bytes=available)
    # The whole cache (padding block included) fits in the 30 % share.
    assert n * PER_BLOCK <= available * 0.3 < (n + 1) * PER_BLOCK


def test_memory_sizing_on_cpu_stops_at_the_cpu_token_cap_however_much_memory_is_free():
    n = blocks_for_memory(**SIZES, max_total_tokens=32, available_bytes=2**40)
    assert (n - 1) * 16 == CPU_MAX_CACHE_TOKENS


def test_cpu_cap_still_holds_two_full_length_sequences():
    n = blocks_for_memory(**SIZES, max_total_tokens=3 * CPU_MAX_CACHE_TOKENS, available_bytes=2**40)
    assert (n - 1) * 16 == 2 * 3 * CPU_MAX_CACHE_TOKENS


def test_memory_too_small_for_a_maximal_prefill_is_a_clear_error():
    with pytest.raises(CacheFullError, match="not enough memory for the KV cache"):
        blocks_for_memory(**SIZES, min_tokens=10_000, available_bytes=PER_BLOCK * 10)


def test_host_available_memory_reads_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  100 kB\nMemAvailable:   2048 kB\n")
    assert 0 < host_available_bytes(meminfo) <= 2048 * 1024
    meminfo.write_text("MemTotal:  100 kB\n")
    with pytest.raises(CacheFullError, match="MemAvailable"):
        host_available_bytes(meminfo)


def test_a_gpu_cache_takes_what_is_left_under_the_fraction_after_the_prefill_peak():
    from text_generation_server.engine.kv_cache import cuda_cache_budget

    gib = 2**30
    # 80 GiB GPU, 14 GiB held by the weights, 70 GiB free (a CUDA context and another process
    # hold the rest), a maximal prefill peaked 6 GiB above the weights: min(70, 80 - 14) - 6.
    assert cuda_cache_budget(total=80 * gib, free=70 * gib, reserved=14 * gib, activations=6 * gib,
                             fraction=1.0) == 60 * gib  # fmt: skip
    # --cuda-memory-fraction 0.5: 40 GiB in all for this shard: min(70, 40 - 14) - 6.
    assert cuda_cache_budget(total=80 * gib, free=70 * gib, reserved=14 * gib, activations=6 * gib,
                             fraction=0.5) == 20 * gib  # fmt: skip
    # Nothing left: zero, not negative.
    assert cuda_cache_budget(total=16 * gib, free=1 * gib, reserved=14 * gib, activations=2 * gib,
                             fraction=1.0) == 0  # fmt: skip


@pytest.mark.parametrize("raw,want", [("", 1.0), ("0.9", 0.9), ("1", 1.0)])
def test_cuda_memory_fraction_reads_the_launchers_variable(raw, want):
    from text_generation_server.engine.kv_cache import cuda_memory_fraction

    assert cuda_memory_fraction({"CUDA_MEMORY_FRACTION": raw}) == want


@pytest.mark.parametrize("raw", ["0", "1.5", "half"])
def test_a_cuda_memory_fraction_outside_0_1_is_refused_naming_it(raw):
    from text_generation_server.engine.kv_cache import cuda_memory_fraction

    with pytest.raises(ValueError, match=rf"CUDA_MEMORY_FRACTION='{raw}' must be a number in \(0, 1\]"):
        cuda_memory_fraction({"CUDA_MEMORY_FRACTION": raw})
