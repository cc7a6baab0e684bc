"""Ring kinds in real gloo processes (2 and 3 ranks): the sharded model equals the whole model."""

from __future__ import annotations

import hf_ring_checks
import pytest
from harness import assert_all_ok, run_world


@pytest.mark.parametrize("world_size", [2, 3])
def test_ring_model_equals_single_process_model(world_size: int) -> None:
    values = assert_all_ok(run_world(hf_ring_checks.check_ring_kinds, world_size, timeout=240))
    expected = [
        f"ring/zigzag W={world_size}",
        f"ring/contiguous W={world_size}",
        f"ring_dilated/contiguous W={world_size}",
        "unsharded batch refused",
    ]
    assert values == [expected] * world_size
