"""Incremental detokenization: generated token ids in, text deltas out.

A byte-level tokenizer can split one character across tokens (東, 🙂 are
three and four UTF-8 bytes); decoding a lone piece gives U+FFFD. Like TGI's
``decode_token``, the decoder re-decodes a short window of recent tokens
(``prefix_offset``..end) and emits only the part beyond what was already
emitted (``read_offset``), and only when the window does not end in U+FFFD,
so a client never receives half a character. Starting the window inside
the prompt keeps leading spaces right for tokenizers that strip a word's
leading space when it starts the decoded text (SentencePiece-style).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded ahead of the first generated token, as TGI does.
CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turns one request's generated token ids into text, one token at a time.

    ``decode`` must decode a list of ids to text with special tokens skipped.
    ``text`` is everything emitted so far; after ``flush`` it is the whole
    generated text.
    """

    def __init__(self, decode: Callable[[list[int]], str], prompt_ids: Sequence[int] = ()) -> None:
        self._decode = decode
        self._ids: list[int] = list(prompt_ids[-CONTEXT_TOKENS:]) if prompt_ids else []
        self._context_len = len(self._ids)
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self.text = ""

    def step(self, token_id: int) -> str:
        """Add one generated token; return the new complete text ('' while a character is partial)."""
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT_CHAR):
            delta = new_text[len(prefix_text) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """Emit whatever is still held back (the request has stopped): the rest of the full decode."""
        full = self.full_text()
        if full.startswith(self.text) and len(full) > len(self.text):
            delta = full[len(self.text) :]
            self.text = full
            self._prefix_offset = self._read_offset = len(self._ids)
            return delta
        return ""

    def full_text(self) -> str:
        """The generated text decoded in one go (with the same prompt context)."""
        context = self._decode(self._ids[: self._context_len])
        whole = self._decode(self._ids)
        if whole.startswith(context):
            return whole[len(context) :]
        return self._decode(self._ids[self._context_len :])
