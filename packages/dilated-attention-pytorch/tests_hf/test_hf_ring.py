"""Ring kinds in real gloo processes (2 and 3 ranks): the sharded model equals the whole model, and a\nsharded packed row equals its documents run alone."""

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


@pytest.mark.parametrize("world_size", [2, 3])
def test_packed_ring_model_equals_each_document_alone(world_size: int) -> None:
    values = assert_all_ok(run_world(hf_ring_checks.check_ring_packed, world_size, timeout=240))
    expected = [
        f"packed ring/zigzag from position_ids W={world_size}",
        f"packed ring/contiguous from cu_seqlens W={world_size}",
        "shard offsets refused",
    ]
    assert values == [expected] * world_size
