"""The router's tokenizer: text to ids for validation and Tokenize, ids to token strings for responses.

Encoding runs on dedicated worker threads so long prompts do not stall the
event loop, each thread with its own copy of the tokenizer (the fast
tokenizer's Rust state is not safe to share between two encodes at once):
one for ordinary prompts and one for texts of :data:`LONG_TEXT_CHARS` and
more, so a long text (up to ``--payload-limit``) never holds up the short
prompts queued behind it.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from loguru import logger

# Texts of this many characters and more are encoded on the second thread.
LONG_TEXT_CHARS = 32 * 1024

T = TypeVar("T")


class TokenizerLoadError(RuntimeError):
    """The tokenizer directory could not be loaded; the message names the directory."""


@dataclass(frozen=True)
class Encoding:
    """Token ids of one text, with token strings and character offsets when asked."""

    ids: list[int]
    tokens: list[str] | None = None
    offsets: list[tuple[int, int]] | None = None

    def keep_last(self, n: int) -> Encoding:
        """The last ``n`` tokens (TGIS truncates inputs from the left)."""
        if n <= 0 or n >= len(self.ids):
            return self
        return Encoding(
            ids=self.ids[-n:],
            tokens=None if self.tokens is None else self.tokens[-n:],
            offsets=None if self.offsets is None else self.offsets[-n:],
        )


class Tokenizer:
    """Wraps a transformers tokenizer with the few operations the router needs."""

    def __init__(self, hf_tokenizer) -> None:
        self._tok = hf_tokenizer
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")
        self._long_tok = copy.deepcopy(hf_tokenizer)
        self._long_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer-long")
        self.eos_token_id: int | None = hf_tokenizer.eos_token_id
        self.vocab_size: int = len(hf_tokenizer)
        self._special_ids = frozenset(hf_tokenizer.all_special_ids)

    @classmethod
    def load(cls, path: Path | str) -> Tokenizer:
        """Load with transformers' AutoTokenizer from a local directory (never the network)."""
        from transformers import AutoTokenizer

        path = Path(path)
        if not path.is_dir():
            raise TokenizerLoadError(f"tokenizer directory {path} does not exist")
        try:
            hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as err:
            reason = " ".join(str(err).split())
            raise TokenizerLoadError(f"cannot load a tokenizer from {path}: {reason}") from err
        logger.info(f"Loaded tokenizer from {path} ({type(hf).__name__}, vocab {len(hf)})")
        return cls(hf)

    def encode(
        self, text: str, *, with_tokens: bool = False, with_offsets: bool = False, add_special_tokens: bool = True
    ) -> Encoding:
        """Token ids as the model sees them (special tokens such as BOS added as configured, unless
        ``add_special_tokens`` is False: for a text that already holds them, a rendered chat template)."""
        return self._encode(self._tok, text, with_tokens, with_offsets, add_special_tokens)

    @staticmethod
    def _encode(tok, text: str, with_tokens: bool, with_offsets: bool, add_special_tokens: bool = True) -> Encoding:
        enc = tok(text, return_offsets_mapping=with_offsets, add_special_tokens=add_special_tokens)
        ids = list(enc["input_ids"])
        tokens = tok.convert_ids_to_tokens(ids) if with_tokens else None
        offsets = [tuple(o) for o in enc["offset_mapping"]] if with_offsets else None
        return Encoding(ids=ids, tokens=tokens, offsets=offsets)

    async def encode_async(
        self,
        text: str,
        *,
        with_tokens: bool = False,
        with_offsets: bool = False,
        add_special_tokens: bool = True,
        then: Callable[[Encoding], T] | None = None,
    ) -> Encoding | T:
        """``encode`` on a tokenizer thread: the long-text one from :data:`LONG_TEXT_CHARS` characters.

        With ``then``, returns ``then(encoding)`` computed on that thread too: building a response
        from hundreds of thousands of tokens takes a second, which the event loop must not wait
        out, and long texts are then encoded and turned into responses one at a time, so the
        transient memory of only one is alive at once.
        """
        loop = asyncio.get_running_loop()
        if len(text) >= LONG_TEXT_CHARS:
            executor, tok = self._long_executor, self._long_tok
        else:
            executor, tok = self._executor, self._tok

        def work():
            encoding = self._encode(tok, text, with_tokens, with_offsets, add_special_tokens)
            return encoding if then is None else then(encoding)

        return await loop.run_in_executor(executor, work)

    def decode(self, ids: list[int]) -> str:
        """Text of the ids, special tokens skipped (what clients see as generated text)."""
        return self._tok.decode(ids, skip_special_tokens=True)

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary string of one id (TokenInfo.text), '' for an id outside the vocabulary."""
        token = self._tok.convert_ids_to_tokens(int(token_id))
        return token if isinstance(token, str) else ""

    def token_text(self, token_id: int) -> str:
        """The text one token decodes to on its own (special tokens as written, e.g. '</s>')."""
        return self._tok.decode([int(token_id)], skip_special_tokens=False)

    def is_special(self, token_id: int) -> bool:
        return int(token_id) in self._special_ids

    @property
    def chat_template(self) -> str | None:
        """The model's chat template (tokenizer_config.json or chat_template.jinja), None without one."""
        template = getattr(self._tok, "chat_template", None)
        return template or None

    def apply_chat_template(self, messages: list[dict], **kwargs) -> str:
        """The prompt text of a conversation, rendered by transformers' sandboxed Jinja environment.

        Raises ValueError (a message the client can act on) for a conversation the template refuses.
        """
        from jinja2 import TemplateError

        try:
            return self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
        except TemplateError as err:
            raise ValueError(f"the model's chat template refused the messages: {err}") from None

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._long_executor.shutdown(wait=False, cancel_futures=True)
