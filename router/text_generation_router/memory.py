"""Give memory freed after large requests back to the operating system.

glibc keeps freed heap memory in per-thread arenas, so a burst of huge
requests (megabyte prompts, messages over the receive limit) would leave the
router's resident memory at its high-water mark for good, a little higher
after every burst. Two arenas bound that retention, and trimming while no
request runs returns the rest. Both are no-ops where the C library is not
glibc.
"""

from __future__ import annotations

import asyncio
import ctypes
import sys
from collections.abc import Callable

from loguru import logger

# mallopt parameter: the most arenas glibc creates.
_M_ARENA_MAX = -8


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not (hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt")):
        return None
    return libc


def limit_arenas(count: int = 2) -> bool:
    """Cap glibc's malloc arenas (call early, before threads allocate); True when applied."""
    libc = _glibc()
    return bool(libc is not None and libc.mallopt(_M_ARENA_MAX, count) == 1)


def release_freed_memory() -> bool:
    """Return free heap memory to the operating system; True when some was released."""
    libc = _glibc()
    return bool(libc is not None and libc.malloc_trim(0) == 1)


async def trim_when_idle(is_idle: Callable[[], bool], interval: float = 10.0) -> None:
    """Every ``interval`` seconds with no request in flight, release freed memory (until cancelled)."""
    if _glibc() is None:
        logger.debug("malloc_trim is not available: freed memory stays with the allocator")
        return
    while True:
        await asyncio.sleep(interval)
        if is_idle():
            await asyncio.to_thread(release_freed_memory)
