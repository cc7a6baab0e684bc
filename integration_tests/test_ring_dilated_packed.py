"""Ring dilated attention over packed documents (cu_seqlens) in real gloo processes, world sizes 1-4."""

from __future__ import annotations

import checks_ring_dilated_packed as checks
import pytest
import torch
from harness import assert_all_ok, run_world

from attn_core import strided_varlen


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_packed_ring_dilated_matches_reference(world_size: int) -> None:
    values = assert_all_ok(run_world(checks.check_packed_cases, world_size, timeout=240))
    names = [c.name for c in checks.CASES]
    expected = [*names, *(f"{n} (gather path)" for n in names[:4])]
    if not strided_varlen.unsupported_reasons(torch.empty(1, 1, 8)):  # the ranks run on the CPU here
        expected += [f"{n} (strided kernels)" for n in names]  # float32 in Triton's interpreter
        expected += [f"{n} (kernels and pieces)" for n in names[:4] if world_size in (2, 3)]
        expected += [f"{n} (kernels and pieces, float16)" for n in names[:4] if world_size in (2, 3)]
    assert values == [expected] * world_size


def test_bad_offsets_raise_on_every_rank() -> None:
    values = assert_all_ok(run_world(checks.check_bad_offsets_raise, 2, timeout=90))
    assert values == [["last offset != N", "decreasing", "int64", "differs between ranks"]] * 2


@pytest.mark.parametrize("world_size", [1, 3, 4])
def test_module_and_hybrid_take_cu_seqlens(world_size: int) -> None:
    values = assert_all_ok(run_world(checks.check_module_and_hybrid, world_size, timeout=90))
    assert values == [["module", "hybrid"]] * world_size
