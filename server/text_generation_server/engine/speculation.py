"""N-gram (prompt lookup) drafts for speculative decoding (TGI's ``--speculate N`` without a draft model).

A greedy request's next tokens are guessed by finding the latest earlier place where its last few
tokens occurred (in the prompt or in what it generated) and proposing what followed there. Text
that copies or edits its input (summaries, rewrites, code edits, extraction) repeats long runs of
it, so the guesses are often right. The model then checks the request's last token and all the
guessed ones in one forward: the tokens it would have chosen anyway are kept, so the output is
token for token what plain greedy decoding gives, and a step yields one token more per correct
guess.
"""

from __future__ import annotations

MAX_NGRAM = 3  # the longest suffix looked up first; shorter ones when it does not occur


class NgramIndex:
    """A request's tokens, indexed as they are appended: per suffix of 1 to ``max_ngram`` tokens,
    where the token after its latest occurrence sits. O(``max_ngram``) per token.

    :meth:`draft` gives up to ``n`` tokens that followed the latest earlier occurrence of the
    longest suffix of the tokens (``max_ngram`` down to 1 tokens) that occurred before; [] if none."""

    def __init__(self, max_ngram: int = MAX_NGRAM) -> None:
        self.max_ngram = max_ngram
        self.tokens: list[int] = []
        self._next: dict[tuple[int, ...], int] = {}

    def extend(self, tokens: list[int]) -> None:
        for t in tokens:
            end = len(self.tokens)  # position of t: it follows every n-gram ending just before it
            for size in range(1, min(self.max_ngram, end) + 1):
                self._next[tuple(self.tokens[end - size : end])] = end
            self.tokens.append(t)

    def draft(self, n: int) -> list[int]:
        if n <= 0:
            return []
        tokens = self.tokens
        for size in range(min(self.max_ngram, len(tokens) - 1), 0, -1):
            at = self._next.get(tuple(tokens[-size:]))
            if at is not None:
                return tokens[at : at + n]
        return []
