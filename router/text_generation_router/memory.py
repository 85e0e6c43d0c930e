"""Give memory freed after large requests back to the operating system.

glibc keeps freed heap memory in per-thread arenas, so a burst of huge
requests (megabyte prompts, messages over the receive limit) would leave the
router's resident memory at its high-water mark for good, a little higher
after every burst. Two arenas and a fixed mmap threshold (large blocks get
their own mapping, returned when freed) bound that retention; while no
request runs, unreachable Python objects are collected and the heap is
trimmed. The glibc settings and the trim are no-ops where the C library is
not glibc.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable

from loguru import logger
from text_generation_server.utils import glibc

# Fixed (glibc otherwise raises it up to 32 MiB after freeing a large block, so the next megabyte-sized
# prompts land in the heap and fragment it); blocks this large and up are returned to the OS when freed.
_MMAP_THRESHOLD_BYTES = 256 * 1024


def limit_arenas(count: int = 2) -> bool:
    """Cap glibc's malloc arenas and fix its mmap threshold (call early, before threads allocate); True when applied."""
    return glibc.limit_arenas(count) and glibc.set_mmap_threshold(_MMAP_THRESHOLD_BYTES)


def release_freed_memory() -> bool:
    """Collect unreachable Python objects, then return free heap memory to the OS; True when some was released.

    The collection comes first: a refused request's exception keeps its
    frames, and with them the request's text (up to the --payload-limit + 1 MiB message
    limit), in a reference cycle that only the cyclic collector frees, and
    it runs its full pass rarely.
    """
    gc.collect()
    return glibc.trim()


async def trim_when_idle(is_idle: Callable[[], bool], interval: float = 10.0) -> None:
    """Every ``interval`` seconds with no request in flight, release freed memory (until cancelled)."""
    if glibc.glibc() is None:
        logger.debug("malloc_trim is not available: freed memory stays with the allocator")
        return
    while True:
        await asyncio.sleep(interval)
        if is_idle():
            await asyncio.to_thread(release_freed_memory)
