"""The C allocator's settings and trim, where the C library is glibc (no-ops elsewhere).

Three processes tune glibc's malloc for the same reason, each to its own
sizes: freed large buffers otherwise stay in the heap, fragmented by what
is allocated after them, so the resident size creeps up. The router caps
its arenas and maps blocks of 256 KiB and up on their own (request texts);
the quantizer maps 1 MiB and up (calibration activations); loading with
bitsandbytes trims the heap after each float slice it quantized.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

# mallopt parameters
M_ARENA_MAX = -8  # the most arenas glibc creates
M_MMAP_THRESHOLD = -3  # the size from which blocks get their own mapping, returned when freed


@functools.cache
def glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc with ``mallopt`` and ``malloc_trim``, else ``None``."""
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    if not (hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim")):
        return None
    return libc


def set_mmap_threshold(size: int) -> bool:
    """Blocks of ``size`` bytes and up get their own mapping for the rest of the process (glibc
    otherwise raises the threshold up to 32 MiB after freeing a large block); True when applied."""
    libc = glibc()
    return libc is not None and libc.mallopt(M_MMAP_THRESHOLD, size) == 1


def limit_arenas(count: int) -> bool:
    """Cap glibc's malloc arenas (call early, before threads allocate); True when applied."""
    libc = glibc()
    return libc is not None and libc.mallopt(M_ARENA_MAX, count) == 1


def trim() -> bool:
    """Return free heap pages to the OS; True when some were released."""
    libc = glibc()
    return bool(libc is not None and libc.malloc_trim(0) == 1)
