"""Start-up objects exempt from the cyclic collector; later garbage still collected."""

from __future__ import annotations

import gc
import weakref

from text_generation_server.utils.heap import freeze_startup_objects


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def test_objects_alive_at_start_up_are_frozen_and_later_cycles_are_still_collected():
    kept = _Node()
    try:
        frozen = freeze_startup_objects()
        assert frozen == gc.get_freeze_count() > 0
        assert not any(o is kept for o in gc.get_objects())  # frozen objects are out of every generation
        a, b = _Node(), _Node()
        a.other, b.other = b, a  # a cycle made after the freeze, as a refused request's frames make
        gone = weakref.ref(a)
        del a, b
        gc.collect()
        assert gone() is None
    finally:
        gc.unfreeze()
