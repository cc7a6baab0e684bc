"""Ulysses (head-parallel) and hybrid attention in real gloo processes (one spawn per world size, many cases inside)."""

from __future__ import annotations

import checks_ulysses
import pytest
from harness import assert_all_ok, run_world


# a world of one runs in-process in packages/attn-ring/tests/test_ulysses_unit.py
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ulysses_matches_reference(world_size: int) -> None:
    values = assert_all_ok(run_world(checks_ulysses.check_ulysses_cases, world_size, timeout=150))
    assert values == [[c.name for c in checks_ulysses.cases(world_size)] + ["module"]] * world_size


@pytest.mark.parametrize("world_size", [2, 3])
def test_ulysses_packed_documents_match_reference(world_size: int) -> None:
    values = assert_all_ok(run_world(checks_ulysses.check_ulysses_packed, world_size, timeout=150))
    assert values == [[c.name for c in checks_ulysses.packed_cases()] + ["module packed"]] * world_size


def test_hybrid_two_by_two_matches_reference() -> None:
    values = assert_all_ok(run_world(checks_ulysses.check_hybrid, 4, 2, timeout=150))
    names = [c.name for c in checks_ulysses.hybrid_cases()]
    names += ["new_group mesh", "module", "groups that are not a grid refused"]
    assert values == [names] * 4


def test_mismatches_raise_on_every_rank() -> None:
    values = assert_all_ok(run_world(checks_ulysses.check_errors_raise_on_every_rank, 2, timeout=120))
    assert values == [["shape", "option", "config", "heads", "still works"]] * 2


@pytest.mark.parametrize("mode", ["exit", "absent"])
def test_rank_leaving_makes_the_others_raise(mode: str) -> None:
    values = assert_all_ok(run_world(checks_ulysses.check_rank_leaving_is_an_error, 3, mode, 3.0, timeout=90))
    assert values == ["raised", "raised", "left"]
