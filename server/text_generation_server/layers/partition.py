"""How attention heads are divided between tensor-parallel ranks.

Heads are split by GQA group so every rank's query heads find their KV head
locally. KV heads go to ranks in contiguous, near-equal groups and each rank
takes the query heads of its KV heads (9 q / 3 kv heads on 2 ranks: 6+3 q,
2+1 kv). With more ranks than KV heads, each KV head is replicated on the
ranks that share its query heads.
"""

from __future__ import annotations

from dataclasses import dataclass

from text_generation_server.weights import shard_range


@dataclass(frozen=True)
class HeadPartition:
    """One rank's contiguous query and KV head ranges (``[start, stop)``)."""

    q_start: int
    q_stop: int
    kv_start: int
    kv_stop: int

    @property
    def num_heads(self) -> int:
        return self.q_stop - self.q_start

    @property
    def num_kv_heads(self) -> int:
        return self.kv_stop - self.kv_start


def _no_scheme(num_heads: int, num_kv_heads: int, world_size: int, why: str) -> ValueError:
    return ValueError(
        f"cannot split attention heads across ranks: num_attention_heads={num_heads}, "
        f"num_key_value_heads={num_kv_heads}, world_size={world_size} ({why}); "
        f"use a shard count that is at most num_key_value_heads, or one that each KV head's "
        f"query heads can be shared by"
    )


def partition_heads(num_heads: int, num_kv_heads: int, world_size: int) -> list[HeadPartition]:
    """Every rank's :class:`HeadPartition`, in rank order.

    Raises ``ValueError`` naming the three numbers when no split keeps each
    rank's query heads next to their KV head.
    """
    if num_kv_heads < 1 or num_heads < 1 or num_heads % num_kv_heads:
        raise _no_scheme(
            num_heads,
            num_kv_heads,
            world_size,
            "num_attention_heads must be a positive multiple of num_key_value_heads",
        )
    group = num_heads // num_kv_heads
    parts = []
    if world_size <= num_kv_heads:
        for rank in range(world_size):
            kv_start, kv_stop = shard_range(num_kv_heads, world_size, rank)
            parts.append(HeadPartition(kv_start * group, kv_stop * group, kv_start, kv_stop))
        return parts
    # More ranks than KV heads: ranks are shared out between KV heads as evenly
    # as possible, and each KV head's query heads are split among its ranks.
    for kv in range(num_kv_heads):
        first_rank, last_rank = shard_range(world_size, num_kv_heads, kv)
        sharing = last_rank - first_rank
        if sharing > group:
            raise _no_scheme(
                num_heads,
                num_kv_heads,
                world_size,
                f"{sharing} ranks would share a KV head that has only {group} query heads",
            )
        for i in range(sharing):
            q_start, q_stop = shard_range(group, sharing, i)
            parts.append(HeadPartition(kv * group + q_start, kv * group + q_stop, kv, kv + 1))
    return parts


def describe_partition(parts: list[HeadPartition]) -> str:
    """A one-line summary such as ``q heads 6/3, kv heads 2/1 (uneven GQA split)``."""
    q = "/".join(str(p.num_heads) for p in parts)
    kv = "/".join(str(p.num_kv_heads) for p in parts)
    notes = []
    kv_ranges = [(p.kv_start, p.kv_stop) for p in parts]
    if len(set(kv_ranges)) < len(kv_ranges):
        notes.append("KV heads replicated")
    if len({p.num_heads for p in parts}) > 1:
        notes.append("uneven GQA split")
    suffix = f" ({', '.join(notes)})" if notes else ""
    return f"q heads {q}, kv heads {kv}{suffix}"
