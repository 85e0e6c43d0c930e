"""The waiting queue and the choice of which waiting requests form the next prefill.

First come, first served: a batch is the longest prefix of the queue that
fits the prefill budget (input tokens) and the token budget (input plus
max_new_tokens per request, in whole KV blocks). Stopping at the first
request that does not fit keeps a large request from being overtaken
forever by small ones.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from .entry import Entry


class WaitingQueue:
    """Requests validated and waiting for a prefill."""

    def __init__(self, block_size: int) -> None:
        self._entries: deque[Entry] = deque()
        self._block_size = block_size

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self):
        return iter(self._entries)

    def push(self, entries: Iterable[Entry]) -> None:
        self._entries.extend(entries)

    def push_front(self, entries: list[Entry]) -> None:
        """Put entries back at the head, in their original order (after a refused prefill)."""
        self._entries.extendleft(reversed(entries))

    def remove(self, entry: Entry) -> bool:
        try:
            self._entries.remove(entry)
        except ValueError:
            return False
        return True

    def take_expired(self, now: float) -> list[Entry]:
        """Remove and return the entries whose time limit passed while waiting."""
        expired = [e for e in self._entries if e.expired(now)]
        for entry in expired:
            self._entries.remove(entry)
        return expired

    def drain(self) -> list[Entry]:
        entries = list(self._entries)
        self._entries.clear()
        return entries

    def next_batch(
        self,
        *,
        min_size: int | None,
        max_size: int | None,
        prefill_token_budget: int,
        token_budget: int,
        admit_first_anyway: bool = False,
    ) -> list[Entry] | None:
        """Pop the next prefill batch, or None when fewer than ``min_size`` requests fit.

        A prompt longer than what is left of ``prefill_token_budget`` joins only as the first of
        the batch (the shards prefill it in chunks of the budget). ``admit_first_anyway`` lets the
        head of the queue in even if it is over the token budget (nothing else is running; the
        shard has the last word).
        """
        if not self._entries or (max_size is not None and max_size <= 0):
            return None
        chosen: list[Entry] = []
        prefill_tokens = 0
        total_tokens = 0
        for entry in self._entries:
            prefill = entry.request.input_length
            total = entry.kv_tokens(self._block_size)
            prefill_fits = not chosen or prefill_tokens + prefill <= prefill_token_budget
            fits = prefill_fits and total_tokens + total <= token_budget
            if not fits and not (admit_first_anyway and not chosen):
                break
            chosen.append(entry)
            prefill_tokens += prefill
            total_tokens += total
            if max_size is not None and len(chosen) >= max_size:
                break
        if not chosen or (min_size is not None and len(chosen) < min_size):
            return None
        for _ in chosen:
            self._entries.popleft()
        return chosen
