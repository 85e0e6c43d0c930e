"""Stop sequences: matching on generated text as it grows.

A stop sequence may span several tokens, so the router matches on decoded
text, only in the region the newest text could complete. When a sequence
matches, the output ends at its end (include_stop_sequence) or its start;
any text after it is dropped. While streaming, the last
``holdback`` characters are held back so text that turns out to be the
start of a stop sequence is never sent before the router knows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class StopMatch:
    """A matched stop sequence: the output keeps ``text[:keep]``."""

    sequence: str
    start: int
    end: int
    keep: int


def find_stop_sequence(
    text: str, new_from: int, stop_sequences: Sequence[str], include_stop_sequence: bool
) -> StopMatch | None:
    """The stop sequence completed earliest by the text from ``new_from`` on, if any.

    Only matches that end inside the new text count: earlier text was checked
    when it arrived.
    """
    best: StopMatch | None = None
    for seq in stop_sequences:
        if not seq:
            continue
        start = text.find(seq, max(0, new_from - len(seq) + 1))
        if start < 0:
            continue
        end = start + len(seq)
        if best is None or end < best.end or (end == best.end and start < best.start):
            best = StopMatch(seq, start, end, end if include_stop_sequence else start)
    return best


def holdback(stop_sequences: Sequence[str]) -> int:
    """Characters to withhold from a stream so a partial stop sequence is never sent."""
    return max((len(s) for s in stop_sequences), default=1) - 1
