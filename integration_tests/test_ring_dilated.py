"""Ring dilated attention and its multihead module in real gloo processes, world sizes 1-4
(one spawn per world size, many cases inside)."""

from __future__ import annotations

import checks_ring_dilated
import pytest
from harness import assert_all_ok, run_world


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_ring_dilated_matches_reference(world_size: int) -> None:
    values = assert_all_ok(run_world(checks_ring_dilated.check_all_cases, world_size, timeout=150))
    names = [c.name for c in checks_ring_dilated.cases(world_size)]
    gather = [f"{n} (gather path)" for n in names if n in checks_ring_dilated.GATHER_PATH_CASES]
    expected = [*names, *gather, "multihead module"]
    assert values == [expected] * world_size


def test_mismatched_config_raises_on_every_rank() -> None:
    values = assert_all_ok(run_world(checks_ring_dilated.check_mismatched_config_raises, 2, timeout=90))
    assert values == ["raised", "raised"]


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_ring_block_sparse_matches_reference(world_size: int) -> None:
    if not checks_ring_dilated.has_attn_sparse():
        pytest.skip("attn-sparse (the optional [sparse] extra of attn-ring) is not installed")
    values = assert_all_ok(run_world(checks_ring_dilated.check_ring_sparse, world_size, timeout=120))
    assert values == [[name for name, _, _ in checks_ring_dilated._sparse_layouts(world_size, 2, 1)]] * world_size


def test_missing_peer_raises_within_bounded_time() -> None:
    values = assert_all_ok(run_world(checks_ring_dilated.check_missing_peer_times_out, 3, timeout=90))
    assert values == ["raised", "raised", "absent"]


def test_ring_block_sparse_triton_kernels_two_ranks() -> None:
    if not (checks_ring_dilated.has_attn_sparse() and checks_ring_dilated.has_triton()):
        pytest.skip("needs attn-sparse and triton (the integration session installs both)")
    values = assert_all_ok(run_world(checks_ring_dilated.check_ring_sparse_triton, 2, timeout=150))
    assert values == [["random per-head", "local window shared causal", "empty rows"]] * 2
