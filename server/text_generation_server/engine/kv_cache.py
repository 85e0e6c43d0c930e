"""The paged KV cache: fixed-size blocks of token slots, handed out per sequence.

Block 0 is never handed out: block tables are padded with 0, so its slots are
only ever read under an attention mask and must stay finite (the cache is
zero-initialised for that reason).
"""

from __future__ import annotations

import hashlib
import math
from array import array
from collections import OrderedDict
from pathlib import Path

import torch
from loguru import logger

DEFAULT_BLOCK_SIZE = 16
PADDING_BLOCK = 0

# Share of the host's available memory a CPU shard may give its KV cache (all
# shards of a CPU host share it, so it is divided by the world size).
CPU_MEMORY_FRACTION = 0.3
# Share of the free device memory a CUDA shard gives its KV cache; the rest is
# headroom for activations and the allocator.
CUDA_MEMORY_FRACTION = 0.85
# On CPU the cores, not memory, limit how many tokens a batch can usefully
# attend over: a 16k-token cache already holds 64 concurrent requests of 256
# tokens, more than a CPU decodes at a useful rate. So by default the cache
# stops there (about 0.7 GiB for a 135M Llama in float32) instead of taking a
# share of host memory it would never fill; --max-batch-total-tokens asks
# for more.
CPU_MAX_CACHE_TOKENS = 16384
# ...but it always holds this many sequences of max_total_tokens, so one long
# request never stalls the rest.
CPU_MIN_FULL_SEQUENCES = 2


class CacheFullError(RuntimeError):
    """Not enough free KV blocks (or memory) for what was asked; nothing was changed."""


class BlockAllocator:
    """Hands out block ids ``1 .. num_blocks - 1``; block 0 is the padding block.

    Blocks are reference-counted: a block holding a prompt prefix that another
    request shares (:meth:`match`) is in use until every holder freed it. A
    full block whose keys and values were registered under a prefix key
    (:meth:`register`) stays in the cache when its last holder frees it, so a
    later request with the same prefix can :meth:`match` it; such unheld
    blocks count as free and are evicted least recently used first when
    :meth:`allocate` runs out of empty ones.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 2:
            raise ValueError(
                f"a KV cache needs at least 2 blocks (one is padding), got {num_blocks}"
            )
        self.num_blocks = num_blocks
        # Pop from the end: low ids first, which keeps a lightly used cache compact.
        self._free: list[int] = list(range(num_blocks - 1, PADDING_BLOCK, -1))
        self._refs: dict[int, int] = {}
        # Registered prefixes: key -> block and back; unheld ones in least-recently-used order.
        self._by_key: dict[bytes, int] = {}
        self._key_of: dict[int, bytes] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()
        self.evictions = 0

    @property
    def num_free(self) -> int:
        """Blocks a request can get: empty ones plus cached prefixes nobody holds."""
        return len(self._free) + len(self._idle)

    @property
    def num_usable(self) -> int:
        """Blocks that can hold tokens (all but the padding block)."""
        return self.num_blocks - 1

    @property
    def num_cached(self) -> int:
        """Blocks holding a registered prefix that no request holds (reusable, evictable)."""
        return len(self._idle)

    def allocate(self, n: int) -> list[int]:
        """``n`` distinct free block ids; raises :class:`CacheFullError` (allocating none) if short."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > self.num_free:
            raise CacheFullError(
                f"KV cache full: {n} blocks needed, {self.num_free} of {self.num_usable} free"
            )
        blocks = []
        for _ in range(n):
            if self._free:
                block = self._free.pop()
            else:
                block, _ = self._idle.popitem(last=False)
                del self._by_key[self._key_of.pop(block)]
                self.evictions += 1
            self._refs[block] = 1
            blocks.append(block)
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Drop one hold on each block; freeing a block that is not held is a bug and raises.

        A block nobody holds any more goes back to the pool, or, when it holds a registered
        prefix, to the cached ones as the most recently used (blocks later in ``blocks`` counting
        as less recent than earlier ones, so a sequence's tail is evicted before its head)."""
        unknown = [b for b in blocks if b not in self._refs]
        if unknown or len(set(blocks)) != len(blocks):
            raise ValueError(f"freeing blocks that are not allocated (or twice): {sorted(blocks)}")
        released = []
        for b in blocks:
            self._refs[b] -= 1
            if self._refs[b] == 0:
                del self._refs[b]
                released.append(b)
        for b in reversed(released):
            if b in self._key_of:
                self._idle[b] = None
            else:
                self._free.append(b)

    # ---- prefix blocks --------------------------------------------------------------

    def match(self, keys: list[bytes]) -> list[int]:
        """The cached blocks of the longest run of ``keys`` from the first, now held by the caller
        (free them as any other block)."""
        blocks = []
        for key in keys:
            block = self._by_key.get(key)
            if block is None:
                break
            blocks.append(block)
        for b in blocks:
            if b in self._idle:
                del self._idle[b]
                self._refs[b] = 1
            else:
                self._refs[b] += 1
        return blocks

    def register(self, block: int, key: bytes) -> None:
        """Record that held ``block`` is full and holds the prefix ``key``. A key already cached
        (the same prefix computed twice) keeps its first block; this one stays private."""
        if block not in self._refs:
            raise ValueError(f"registering block {block}, which is not allocated")
        if key in self._by_key or block in self._key_of:
            return
        self._by_key[key] = block
        self._key_of[block] = key

    def drop_cached(self) -> int:
        """Forget every cached prefix nobody holds (their blocks become empty); how many."""
        n = len(self._idle)
        for b in self._idle:
            del self._by_key[self._key_of.pop(b)]
            self._free.append(b)
        self._idle.clear()
        return n


def prefix_keys(tokens: list[int], block_size: int, start: list[bytes] | None = None) -> list[bytes]:
    """One key per full block of ``tokens``: a digest of the block's tokens and every token before
    it, so equal keys mean equal prefixes (128-bit BLAKE2b; a collision is not a practical concern).
    ``start`` holds the keys already computed for the first blocks; they are extended, not redone."""
    keys = list(start or [])
    parent = keys[-1] if keys else b""
    for b in range(len(keys), len(tokens) // block_size):
        chunk = array("I", tokens[b * block_size : (b + 1) * block_size]).tobytes()
        parent = hashlib.blake2b(parent + chunk, digest_size=16).digest()
        keys.append(parent)
    return keys


def blocks_for_tokens(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


class KVCache:
    """Per layer a ``(k, v)`` pair of ``[num_blocks, block_size, num_kv_heads, head_dim]`` tensors."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = device
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = [
            (
                torch.zeros(shape, dtype=dtype, device=device),
                torch.zeros(shape, dtype=dtype, device=device),
            )
            for _ in range(num_layers)
        ]

    @property
    def capacity_tokens(self) -> int:
        """Tokens the usable blocks hold (the padding block excluded)."""
        return (self.num_blocks - 1) * self.block_size

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.layers)


def bytes_per_block(
    num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> int:
    """Memory one block takes over all layers, keys and values."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * element


def host_available_bytes(meminfo: Path = Path("/proc/meminfo")) -> int:
    """``MemAvailable`` of the host (or the cgroup limit left, when lower)."""
    available = None
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError) as e:
        raise CacheFullError(f"cannot read available memory from {meminfo}: {e}") from e
    if available is None:
        raise CacheFullError(f"{meminfo} has no MemAvailable line; pass --max-batch-total-tokens")
    limit = _cgroup_room()
    return min(available, limit) if limit is not None else available


def _cgroup_room() -> int | None:
    """Bytes left under a cgroup v2 memory limit, if one is set (containers)."""
    root = Path("/sys/fs/cgroup")
    try:
        raw = (root / "memory.max").read_text().strip()
        if raw == "max":
            return None
        return max(0, int(raw) - int((root / "memory.current").read_text().strip()))
    except (OSError, ValueError):
        return None


def device_available_bytes(device: torch.device) -> int:
    """Free memory on a CUDA device."""
    torch.cuda.empty_cache()
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def blocks_for_memory(
    *,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    block_size: int = DEFAULT_BLOCK_SIZE,
    max_batch_total_tokens: int = 0,
    max_total_tokens: int = 0,
    min_tokens: int = 0,
    world_size: int = 1,
    available_bytes: int | None = None,
) -> int:
    """Total blocks (padding block included) for the KV cache.

    With ``max_batch_total_tokens`` > 0 the cache holds that many tokens. With
    0 it takes a share of the memory available once the weights are loaded
    (CPU: ``MemAvailable`` split between the ``world_size`` shards of the
    host; CUDA: free device memory), on CPU capped at
    :data:`CPU_MAX_CACHE_TOKENS` tokens or :data:`CPU_MIN_FULL_SEQUENCES`
    sequences of ``max_total_tokens``, whichever is more. Either way it holds at least ``min_tokens`` (what a
    maximal prefill needs). Raises :class:`CacheFullError` naming the numbers
    when that does not fit in memory.
    """
    per_block = bytes_per_block(num_layers, block_size, num_kv_heads, head_dim, dtype)
    if available_bytes is None:
        if device.type == "cuda":
            available_bytes = device_available_bytes(device)
        else:
            available_bytes = host_available_bytes() // max(1, world_size)
    fraction = CUDA_MEMORY_FRACTION if device.type == "cuda" else CPU_MEMORY_FRACTION
    needed_blocks = blocks_for_tokens(max(min_tokens, 0), block_size)
    if max_batch_total_tokens > 0:
        usable = max(blocks_for_tokens(max_batch_total_tokens, block_size), needed_blocks)
        # An explicit size may use more than the default share, but not more than exists.
        budget = int(available_bytes * 0.9)
        if (usable + 1) * per_block > budget:
            raise CacheFullError(
                f"a KV cache of {usable * block_size} tokens needs "
                f"{_gib((usable + 1) * per_block)} but only {_gib(budget)} can be used on {device}; "
                f"lower --max-batch-total-tokens"
            )
        return usable + 1
    usable = int(available_bytes * fraction) // per_block - 1
    share = usable
    cap = None
    if device.type != "cuda":
        cap = blocks_for_tokens(
            max(CPU_MAX_CACHE_TOKENS, CPU_MIN_FULL_SEQUENCES * max(max_total_tokens, 0)), block_size
        )
        usable = min(usable, cap)
    if usable < max(needed_blocks, 1):
        raise CacheFullError(
            f"not enough memory for the KV cache on {device}: {_gib(available_bytes)} available, "
            f"{fraction:.0%} of it holds {max(usable, 0) * block_size} tokens but a maximal prefill "
            f"needs {needed_blocks * block_size}; lower --max-batch-prefill-tokens or free memory"
        )
    usable = max(usable, needed_blocks)
    capped = f", capped on CPU at {cap * block_size} tokens" if cap is not None and share > cap else ""
    logger.info(
        f"KV cache sized from memory left after the weights: {_gib(available_bytes)} available to this "
        f"shard, {fraction:.0%} of it holds {max(share, 0) * block_size} tokens{capped}: "
        f"{usable * block_size} tokens ({_gib((usable + 1) * per_block)}); "
        f"--max-batch-total-tokens sets it explicitly"
    )
    return usable + 1


def cuda_memory_fraction(environ=None) -> float:
    """``CUDA_MEMORY_FRACTION`` (TGI's ``--cuda-memory-fraction``, passed by the launcher): the share
    of a GPU's memory this shard may use, 1.0 where unset."""
    import os

    raw = (os.environ if environ is None else environ).get("CUDA_MEMORY_FRACTION", "").strip()
    if not raw:
        return 1.0
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:
        raise ValueError(f"CUDA_MEMORY_FRACTION={raw!r} must be a number in (0, 1]")
    return value


def cuda_cache_budget(*, total: int, free: int, reserved: int, activations: int, fraction: float) -> int:
    """Bytes a GPU shard's KV cache may take, sized after the warm-up's peak: what is free, and no
    more than ``fraction`` of the GPU less what this process already holds (``reserved``: weights
    and allocator cache), less the activations a maximal prefill needed on top of them."""
    return max(0, min(free, int(total * fraction) - reserved) - activations)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def default_num_blocks(max_position_embeddings: int, block_size: int) -> int:
    """A small cache for before Warmup: one sequence of up to 4096 tokens."""
    tokens = min(max(max_position_embeddings, 1), 4096)
    return math.ceil(tokens / block_size) + 1
