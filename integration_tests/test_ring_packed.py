"""Ring attention over packed documents in real gloo processes, world sizes 1-4."""

from __future__ import annotations

import checks_ring_packed
import pytest
import torch
from harness import assert_all_ok, run_world


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_packed_ring_attention_matches_reference(world_size: int) -> None:
    values = assert_all_ok(run_world(checks_ring_packed.check_packed_cases, world_size, timeout=120))
    expected = [c.name for c in checks_ring_packed.cases(torch.device("cpu"))]
    expected += ["module", "steps sharing no document make no call"]
    if world_size == 4:
        expected.append("hybrid dense")
    assert values == [expected] * world_size


@pytest.mark.parametrize("world_size", [1, 3])
def test_bad_offsets_raise_on_every_rank(world_size: int) -> None:
    values = assert_all_ok(run_world(checks_ring_packed.check_packed_errors, world_size, timeout=90))
    done = ["offsets past the sequence", "offsets not int32", "still works"]
    if world_size > 1:
        done = ["offsets differ", "offsets on some ranks only", *done]
    assert values == [done] * world_size
