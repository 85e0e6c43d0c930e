"""The router returns freed heap memory to the OS only while no request is in flight."""

from __future__ import annotations

import asyncio
import sys

import pytest
from text_generation_router import memory
from text_generation_server.utils import glibc


def test_trim_runs_when_idle_and_never_while_busy(monkeypatch):
    if glibc.glibc() is None:
        pytest.skip("needs glibc")
    calls: list[bool] = []
    busy = {"now": True}
    monkeypatch.setattr(memory, "release_freed_memory", lambda: calls.append(busy["now"]) or True)

    async def scenario() -> None:
        task = asyncio.ensure_future(memory.trim_when_idle(lambda: not busy["now"], interval=0.01))
        await asyncio.sleep(0.1)
        assert calls == []
        busy["now"] = False
        await asyncio.sleep(0.1)
        task.cancel()

    asyncio.run(scenario())
    assert calls and not any(calls)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_arena_cap_and_trim_are_accepted_by_glibc():
    if glibc.glibc() is None:
        pytest.skip("not glibc")
    assert memory.limit_arenas(2) is True
    assert memory.release_freed_memory() in (True, False)


def test_release_collects_unreachable_cycles_first():
    """A cycle (as an exception's traceback makes with its frames) holding a request's text is freed by the trim."""
    import gc
    import weakref

    class Holder:
        pass

    holder = Holder()
    holder.self = holder
    holder.text = "x" * 2**20
    alive = weakref.ref(holder)
    enabled = gc.isenabled()
    gc.disable()  # only the trim may collect it
    try:
        del holder
        assert alive() is not None
        memory.release_freed_memory()
        assert alive() is None
    finally:
        if enabled:
            gc.enable()

