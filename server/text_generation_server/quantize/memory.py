"""How the quantizer's process uses the C allocator, and what it reports.

Calibration activations are megabyte buffers (a batch of windows times the
hidden or MLP width), allocated and freed many times per layer in sizes that
change from stage to stage. glibc's malloc raises its mmap threshold each
time such a buffer is freed (up to 32 MiB), so after the first few they all
come from the heap, whose holes the next stage's differently sized buffers
fit badly: the resident size grows by hundreds of MiB over the live
activations, and varies from run to run. With a fixed threshold every such
buffer gets its own mapping and is returned to the OS when freed. All of
this is a no-op where the C library is not glibc.
"""

from __future__ import annotations

import resource

from loguru import logger

from text_generation_server.utils import glibc

# Activation buffers are MiB-sized and up; the solver's per-column tensors
# (kilobytes, thousands per linear) stay in the heap.
MMAP_THRESHOLD_BYTES = 1 << 20


def map_large_buffers() -> bool:
    """Give every allocation of ``MMAP_THRESHOLD_BYTES`` and up its own mapping,
    returned to the OS when freed, for the rest of the process; True when applied."""
    applied = glibc.set_mmap_threshold(MMAP_THRESHOLD_BYTES)
    if not applied:
        logger.debug("glibc's mallopt is not available: freed activation memory stays with the allocator")
    return applied


def return_freed_memory() -> None:
    """Hand free heap pages (the smaller allocations) back to the OS."""
    glibc.trim()


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (MiB): the kernel's VmHWM, which starts afresh
    at exec (ru_maxrss keeps the peak of the process that forked this one, a test runner's say)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
