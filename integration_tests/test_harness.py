"""The harness runs real processes, returns their values and reports a failing rank."""

from __future__ import annotations

import checks_harness
import pytest
from harness import assert_all_ok, run_world


@pytest.mark.parametrize("world_size", [1, 3])
def test_all_reduce_across_real_processes(world_size: int) -> None:
    assert assert_all_ok(run_world(checks_harness.check_all_reduce, world_size, timeout=120)) == list(range(world_size))


def test_failing_rank_is_reported() -> None:
    results = run_world(checks_harness.fail_on_rank_one, 2, timeout=120)
    assert [r.ok for r in results] == [True, False]
    assert results[1].error_type == "ValueError"
    with pytest.raises(AssertionError, match="rank 1 fails on purpose"):
        assert_all_ok(results)
