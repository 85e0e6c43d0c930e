"""The prompts every contestant of `make bench` gets: the same texts, hence the same token ids.

Texts are windows of the Python standard library's docstrings (the built-in
``python-docs`` corpus, PSF-licensed, offline everywhere). The server keeps
the last ``length`` tokens of a text (``truncate_input_tokens``); the peers
get exactly those ids, encoded by the checkpoint's own tokenizer as the
router encodes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Prompt:
    text: str  # what the server receives (it keeps the last len(ids) tokens)
    ids: list[int]  # what the peers receive


class PromptBook:
    """Prompts of a given token length, cut from one corpus with one tokenizer."""

    def __init__(self, checkpoint: Path) -> None:
        from text_generation_server.quantize.data import load_text
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True)
        self._text = load_text("python-docs", "eval").text

    def prompts(self, count: int, length: int) -> list[Prompt]:
        """``count`` different prompts of exactly ``length`` tokens each."""
        chars = length * 8  # comfortably more than `length` tokens of English prose
        stride = max(chars, len(self._text) // max(count, 1) - 1)
        out = []
        for i in range(count):
            text = self._text[i * stride : i * stride + chars]
            ids = self.tokenizer(text)["input_ids"]
            if len(ids) < length:
                raise RuntimeError(f"corpus window {i} has only {len(ids)} tokens; need {length}")
            out.append(Prompt(text=text, ids=list(ids[-length:])))
        return out
