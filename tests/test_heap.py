"""The serving heap settings (server/heap.py), applied in this process and undone after."""

import gc

from rnnzoo.server import heap


def test_settling_freezes_what_exists_and_raises_only_the_young_threshold():
    before = gc.get_threshold()
    try:
        kept = [object() for _ in range(10)]  # objects alive now are frozen with the rest
        gc.unfreeze()
        heap.settle()
        assert gc.get_freeze_count() > len(kept)
        young, older, oldest = gc.get_threshold()
        assert young == heap.YOUNG_THRESHOLD and (older, oldest) == before[1:]
        # cycles made after settling are still collected
        a: list = []
        a.append(a)
        del a
        assert gc.collect() >= 1
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
