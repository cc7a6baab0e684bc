"""attn_core.memo: BoundedMemo (keyed LRU) and StorageMemo (one memo per set of tensors, by storage)."""

from __future__ import annotations

import gc

import pytest
import torch

from attn_core.memo import MISSING, BoundedMemo, StorageMemo
from attn_core.validation import check_cu_seqlens, cu_seqlens_on_host


def test_bounded_memo_builds_once_and_drops_the_least_recent() -> None:
    memo = BoundedMemo(2)
    calls: list[str] = []
    assert memo.get("a", lambda: calls.append("a") or 1) == 1
    assert memo.get("a", lambda: calls.append("a") or 2) == 1 and calls == ["a"]  # built once
    memo.put("b", 2)
    memo.get("a", lambda: 0)  # "a" is now the most recent
    memo.put("c", 3)  # over the bound: "b" goes
    assert memo.peek("b") is MISSING and "a" in memo and memo["c"] == 3 and len(memo) == 2
    with pytest.raises(KeyError):
        memo["b"]


def _builds(memo: StorageMemo, t: torch.Tensor) -> int:
    """1 when the memo of t had to build its value, else 0."""
    built = []
    lookup = memo.memo_for((t,), ("extra",))
    assert lookup is not None
    lookup("value", lambda: built.append(1))
    return len(built)


def test_storage_memo_follows_storage_geometry_and_version() -> None:
    memo = StorageMemo(max_sets=2, max_derived=1)
    t = torch.arange(8, dtype=torch.int32)
    assert _builds(memo, t) == 1 and _builds(memo, t) == 0
    assert _builds(memo, t[:]) == 0  # a new tensor object over the same storage and geometry
    assert _builds(memo, t[1:]) == 1  # another view: other offsets
    t.add_(1)  # in place: the version counter moves, the value is stale
    assert _builds(memo, t) == 1
    assert _builds(memo, t.clone()) == 1  # equal values in another storage: not the same offsets
    assert len(memo) == 2  # bounded: max_sets


def test_storage_memo_never_hits_a_freed_storage() -> None:
    memo = StorageMemo(max_sets=4, max_derived=1)
    for _ in range(20):  # new tensors often reuse a freed one's memory address
        t = torch.arange(16, dtype=torch.int64)
        assert _builds(memo, t) == 1
        del t
        gc.collect()


def test_storage_memo_does_not_keep_inference_tensors() -> None:
    memo = StorageMemo(max_sets=4, max_derived=1)
    with torch.inference_mode():
        t = torch.arange(4)
    assert _builds(memo, t) == 1 and _builds(memo, t) == 1 and len(memo) == 0


def test_cu_seqlens_on_host_returns_cpu_tensors_as_given() -> None:
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    assert cu_seqlens_on_host(cu) is cu


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_offsets_are_read_once_per_version() -> None:
    cu = torch.tensor([0, 3, 7], dtype=torch.int32, device="cuda")
    first = cu_seqlens_on_host(cu)
    assert first.device.type == "cpu" and first.tolist() == [0, 3, 7]
    torch.cuda.set_sync_debug_mode("error")  # a device read now raises
    try:
        assert cu_seqlens_on_host(cu) is first
        check_cu_seqlens(cu, batch=1, seq_len=7, device=cu.device)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cu[1] = 9  # modified: read again, and now invalid
    with pytest.raises(ValueError, match="non-decreasing"):
        check_cu_seqlens(cu, batch=1, seq_len=7, device=cu.device)
