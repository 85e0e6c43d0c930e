"""What this host's CPU can do, read once."""

from __future__ import annotations

import functools
from pathlib import Path

BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The first ``flags`` line of ``cpuinfo`` (empty where there is none, e.g. off Linux)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[-1].split())
    return frozenset()


def cpu_has_bf16_instructions(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True when the CPU advertises AVX-512 bf16 or AMX bf16 (native bf16 dot products)."""
    return bool(cpu_flags(cpuinfo) & BF16_FLAGS)


@functools.cache
def host_has_bf16_instructions() -> bool:
    """:func:`cpu_has_bf16_instructions` for this host, read once per process."""
    return cpu_has_bf16_instructions()
