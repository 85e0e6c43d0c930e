"""Which waiting requests form the next prefill: FIFO within the prefill and token budgets."""

from __future__ import annotations

import pytest
from text_generation_router.entry import Entry
from text_generation_router.request import SamplingConfig, ValidatedRequest
from text_generation_router.waiting_queue import WaitingQueue


class _NoTokenizer:
    def decode(self, ids):
        return ""


def entry(rid: int, inputs: int, max_new: int, time_limit_ms: int = 0, now: float = 0.0) -> Entry:
    request = ValidatedRequest(
        text="x", input_ids=tuple(range(inputs)), sampling=SamplingConfig(), max_new_tokens=max_new,
        time_limit_ms=time_limit_ms,
    )
    return Entry(rid, request, _NoTokenizer(), now)


def queue_of(*sizes: tuple[int, int], block: int = 1) -> WaitingQueue:
    q = WaitingQueue(block)
    q.push(entry(i, inputs, max_new) for i, (inputs, max_new) in enumerate(sizes))
    return q


def ids(batch) -> list[int]:
    return [e.id for e in batch]


def test_batch_is_the_longest_prefix_within_the_prefill_budget():
    q = queue_of((10, 5), (10, 5), (10, 5))
    assert ids(q.next_batch(min_size=None, max_size=None, prefill_token_budget=25, token_budget=1000)) == [0, 1]
    assert len(q) == 1


def test_a_request_that_does_not_fit_is_not_overtaken_by_smaller_ones():
    q = queue_of((10, 5), (50, 5), (1, 1))
    assert ids(q.next_batch(min_size=None, max_size=None, prefill_token_budget=40, token_budget=1000)) == [0]
    assert [e.id for e in q] == [1, 2]


def test_token_budget_counts_input_plus_max_new_tokens_in_whole_blocks():
    q = queue_of((10, 10), (10, 10), block=16)  # each needs 32 tokens of blocks
    assert ids(q.next_batch(min_size=None, max_size=None, prefill_token_budget=100, token_budget=63)) == [0]
    q = queue_of((10, 10), (10, 10), block=16)
    assert ids(q.next_batch(min_size=None, max_size=None, prefill_token_budget=100, token_budget=64)) == [0, 1]


def test_min_size_and_max_size():
    q = queue_of((5, 5), (5, 5), (5, 5))
    assert q.next_batch(min_size=4, max_size=None, prefill_token_budget=100, token_budget=100) is None
    assert len(q) == 3  # nothing taken
    assert ids(q.next_batch(min_size=2, max_size=2, prefill_token_budget=100, token_budget=100)) == [0, 1]
    assert q.next_batch(min_size=None, max_size=0, prefill_token_budget=100, token_budget=100) is None


def test_head_over_budget_is_admitted_only_when_asked():
    q = queue_of((50, 50))
    assert q.next_batch(min_size=None, max_size=None, prefill_token_budget=10, token_budget=10) is None
    assert ids(q.next_batch(min_size=None, max_size=None, prefill_token_budget=10, token_budget=10, admit_first_anyway=True)) == [0]


def test_requeued_entries_go_back_to_the_head_in_order():
    q = queue_of((1, 1), (1, 1), (1, 1))
    batch = q.next_batch(min_size=None, max_size=2, prefill_token_budget=100, token_budget=100)
    q.push_front(batch)
    assert [e.id for e in q] == [0, 1, 2]


@pytest.mark.parametrize("now, expected", [(0.5, []), (1.5, [1])])
def test_expired_entries_are_taken_out(now, expected):
    q = WaitingQueue(1)
    q.push([entry(0, 1, 1), entry(1, 1, 1, time_limit_ms=1000), entry(2, 1, 1, time_limit_ms=5000)])
    assert ids(q.take_expired(now)) == expected
    assert len(q) == 3 - len(expected)
