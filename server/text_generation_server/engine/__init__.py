"""The shard's engine: batch state, paged KV cache, sampler and stopping checks."""

from text_generation_server.engine.generator import BatchNotFoundError, Generator
from text_generation_server.engine.kv_cache import (
    DEFAULT_BLOCK_SIZE,
    BlockAllocator,
    CacheFullError,
    KVCache,
    blocks_for_memory,
)
from text_generation_server.engine.sampler import SampledToken, SampleRow, SamplingParams, sample
from text_generation_server.engine.stopping import StoppingCriteria, StoppingParams

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "BatchNotFoundError",
    "BlockAllocator",
    "CacheFullError",
    "Generator",
    "KVCache",
    "SampleRow",
    "SampledToken",
    "SamplingParams",
    "StoppingCriteria",
    "StoppingParams",
    "blocks_for_memory",
    "sample",
]
