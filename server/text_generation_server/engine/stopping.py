"""Per-request stopping checks the shard can make from token ids alone.

Stop sequences, deadlines and cancellation need text or time and belong to
the router; here: stop token ids, EOS (unless ignored) and max_new_tokens.
When one token satisfies several, the most specific reason wins: a stop
token, then EOS, then the length limit.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loguru import logger

from text_generation_server.pb.generate.v1 import generate_pb2

NOT_FINISHED = generate_pb2.FINISH_REASON_UNSPECIFIED
LENGTH = generate_pb2.FINISH_REASON_LENGTH
EOS_TOKEN = generate_pb2.FINISH_REASON_EOS_TOKEN
STOP_TOKEN = generate_pb2.FINISH_REASON_STOP_TOKEN


@dataclass(frozen=True)
class StoppingParams:
    max_new_tokens: int
    min_new_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos_token: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(
                f"stopping parameter max_new_tokens={self.max_new_tokens} is invalid; it must be >= 1"
            )
        if self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens={self.min_new_tokens} is invalid; it must be >= 0")

    @classmethod
    def from_pb(cls, pb) -> StoppingParams:
        """From a ``generate.v1.StoppingParameters``."""
        return cls(
            max_new_tokens=int(pb.max_new_tokens),
            min_new_tokens=int(pb.min_new_tokens),
            stop_token_ids=tuple(int(t) for t in pb.stop_token_ids),
            ignore_eos_token=bool(pb.ignore_eos_token),
        )


class StoppingCriteria:
    """Decides after each generated token whether a request is done, and why."""

    def __init__(self, params: StoppingParams, eos_token_ids: Iterable[int]) -> None:
        self.params = params
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.stop_token_ids = frozenset(params.stop_token_ids)
        # EOS is masked before min_new_tokens even when ignored: it ends nothing
        # then, but a model that wants to stop should not be forced to say it.
        self._banned = sorted(self.eos_token_ids | self.stop_token_ids)

    def banned_ids(self, generated: int) -> list[int]:
        """Ids the next token may not be, given ``generated`` tokens so far (transformers' rule)."""
        return self._banned if generated < self.params.min_new_tokens else []

    def check(self, token_id: int, generated: int) -> int:
        """The ``FinishReason`` after ``token_id`` became generated token number ``generated``."""
        if token_id in self.stop_token_ids:
            return STOP_TOKEN
        if token_id in self.eos_token_ids and not self.params.ignore_eos_token:
            return EOS_TOKEN
        if generated >= self.params.max_new_tokens:
            return LENGTH
        return NOT_FINISHED


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value if v is not None]


def eos_token_ids(config: Any, model_dir: str | Path | None = None) -> list[int]:
    """EOS ids from the model config and, when present, ``generation_config.json``.

    Chat checkpoints often list their end-of-turn token only in the generation
    config, so both sources are merged (config order first).
    """
    ids = _ids(getattr(config, "eos_token_id", None))
    if model_dir is not None:
        path = Path(model_dir) / "generation_config.json"
        if path.is_file():
            try:
                ids += _ids(json.loads(path.read_text()).get("eos_token_id"))
            except (OSError, ValueError, TypeError, AttributeError) as e:
                logger.warning(f"ignoring unreadable {path} for EOS ids: {e}")
    return list(dict.fromkeys(ids))
