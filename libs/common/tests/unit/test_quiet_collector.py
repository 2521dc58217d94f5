"""A started service keeps the garbage collector off what lives as long as the process."""

from __future__ import annotations

import gc

from omni_common.run import quiet_collector


def test_what_exists_at_start_is_frozen_and_young_collections_are_rarer() -> None:
    threshold = gc.get_threshold()
    try:
        quiet_collector()
        assert gc.get_freeze_count() > 1000  # this process's modules and objects
        assert gc.get_threshold()[0] > threshold[0]
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
