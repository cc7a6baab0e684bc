"""Ring attention in real gloo processes, world sizes 1-4 (one spawn per world size, many cases inside)."""

from __future__ import annotations

import checks_ring
import pytest
import torch
from harness import assert_all_ok, run_world


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_ring_attention_matches_reference(world_size: int) -> None:
    values = assert_all_ok(run_world(checks_ring.check_all_cases, world_size, timeout=150))
    expected = [c.name for c in checks_ring.cases(world_size, torch.device("cpu"))] + ["module serialized"]
    if world_size > 1:
        expected.append("transfers overlap compute, double buffered")
    if checks_ring.has_memory_runtime():
        expected.append("memory_runtime buffer pool")
    assert values == [expected] * world_size


@pytest.mark.parametrize("world_size", [2, 3])
def test_mismatches_raise_on_every_rank(world_size: int) -> None:
    values = assert_all_ok(run_world(checks_ring.check_errors_raise_on_every_rank, world_size, timeout=120))
    assert values == [["shape", "dtype", "option", "zigzag odd shard", "still works"]] * world_size


@pytest.mark.parametrize("mode", ["exit", "stall"])
def test_rank_leaving_makes_the_others_raise(mode: str) -> None:
    values = assert_all_ok(run_world(checks_ring.check_rank_leaving_is_an_error, 3, mode, timeout=90))
    assert values == ["raised", "raised", "left"]
