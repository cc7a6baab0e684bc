"""A ring group whose transfer failed is reported as failed on the next call, at once, with the cause.

Single process: a real 1-rank gloo world plus a subgroup; the failure is simulated with a work
handle that never completes (what a dead peer looks like to ``Work.wait(timeout)``).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import attn_ring.comm as comm_module
from attn_core.reference import dense_attention
from attn_ring import PendingTransfer, RingComm, ring_attention


class _NeverCompletes:
    """A stand-in for a ``dist.Work`` whose peer is gone: every bounded wait reports "not done"."""

    def __init__(self) -> None:
        self.waits = 0

    def wait(self, timeout: timedelta | None = None) -> bool:
        self.waits += 1
        return False


@pytest.fixture
def subgroup(tmp_path: Path) -> Iterator[dist.ProcessGroup]:
    """A 1-rank gloo world and a gloo subgroup of it (the subgroup is the one that fails)."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        group = dist.new_group([0], backend="gloo")
        assert group is not None
        yield group
    finally:
        dist.destroy_process_group()


def _fail_a_transfer(group: dist.ProcessGroup, work: _NeverCompletes) -> TimeoutError:
    comm = RingComm(group, timeout_s=20)
    pending = PendingTransfer(comm, [work], [torch.zeros(3)], "ring transfer 'kv' step 2 on rank 0")  # type: ignore[list-item]
    with pytest.raises(TimeoutError, match=r"ring transfer 'kv' step 2 .* did not complete within 20 s") as info:
        pending.wait()
    return info.value


def test_next_call_on_a_failed_group_names_the_earlier_failure(subgroup: dist.ProcessGroup) -> None:
    work = _NeverCompletes()
    original = _fail_a_transfer(subgroup, work)
    assert work.waits == 1

    # A new communicator on the same group: refused before anything is posted or waited on.
    with pytest.raises(RuntimeError, match="failed earlier") as info:
        RingComm(subgroup, timeout_s=20)
    message = str(info.value)
    assert "ring transfer 'kv' step 2" in message and "TimeoutError" in message
    assert info.value.__cause__ is original
    assert work.waits == 1

    # The public entry point says the same (it builds its RingComm first).
    q = torch.randn(1, 4, 2, 8, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="failed earlier"):
        ring_attention(q, q, q, group=subgroup)
    comm_module.raise_if_group_failed(None)  # the world group did not fail


def test_other_groups_still_work_after_one_failed(subgroup: dist.ProcessGroup) -> None:
    _fail_a_transfer(subgroup, _NeverCompletes())
    fresh = dist.new_group([0], backend="gloo")
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 6, 2, 8, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(3))
    for group in (None, fresh):
        out = ring_attention(q, k, v, group=group, is_causal=True)
        ref, _ = dense_attention(q, k, v, is_causal=True)
        torch.testing.assert_close(out, ref)
        (dq,) = torch.autograd.grad(out.sum(), q)
        (dq_ref,) = torch.autograd.grad(ref.sum(), q)
        torch.testing.assert_close(dq, dq_ref)


def test_a_handshake_timeout_marks_the_group(subgroup: dist.ProcessGroup, monkeypatch: pytest.MonkeyPatch) -> None:
    def stuck_handshake(*args: object, **kwargs: object) -> None:
        raise TimeoutError("ring attention handshake (all_gather of the call signature) did not complete within 5 s")

    monkeypatch.setattr(comm_module, "handshake", stuck_handshake)
    comm = RingComm(subgroup, timeout_s=5)
    with pytest.raises(TimeoutError):
        comm.handshake({"batch": 1})
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match=r"failed earlier.*handshake on rank 0.*within 5 s"):
        RingComm(subgroup)


def test_a_configuration_mismatch_does_not_mark_the_group(
    subgroup: dist.ProcessGroup, monkeypatch: pytest.MonkeyPatch
) -> None:
    def mismatched(*args: object, **kwargs: object) -> None:
        raise ValueError("ring attention: ranks called with mismatched configurations: rank 1: batch=2")

    monkeypatch.setattr(comm_module, "handshake", mismatched)
    with pytest.raises(ValueError, match="mismatched"):
        RingComm(subgroup).handshake({"batch": 1})
    monkeypatch.undo()
    RingComm(subgroup).close()  # still usable: a mismatch is caught before any payload moves


def test_ring_dilated_and_ring_sparse_refuse_a_failed_group(subgroup: dist.ProcessGroup) -> None:
    from attn_ring import ring_dilated_attention

    _fail_a_transfer(subgroup, _NeverCompletes())
    q = torch.randn(1, 8, 2, 8, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"failed earlier.*ring transfer 'kv' step 2"):
        ring_dilated_attention(q, q, q, [4], [1], group=subgroup)
    sparse = pytest.importorskip("attn_sparse")
    layout = sparse.BlockLayout.from_dense(torch.ones(1, 1, 1, dtype=torch.bool), 16)
    q16 = torch.randn(1, 16, 2, 16, dtype=torch.float64)
    from attn_ring.ring_sparse import ring_block_sparse_attention

    with pytest.raises(RuntimeError, match=r"failed earlier.*ring transfer 'kv' step 2"):
        ring_block_sparse_attention(q16, q16, q16, layout, group=subgroup)


def test_a_stuck_exchange_marks_the_group_for_every_ring(
    subgroup: dist.ProcessGroup, monkeypatch: pytest.MonkeyPatch
) -> None:
    from attn_ring import ring_dilated_attention

    work = _NeverCompletes()
    monkeypatch.setattr(comm_module, "post_exchange", lambda sends, recvs, group: [work])
    comm = RingComm(subgroup, timeout_s=5)
    pending = comm.exchange({}, {0: torch.zeros(3)}, "ring dilated K/V exchange of rank 0")
    with pytest.raises(TimeoutError, match="K/V exchange of rank 0 did not complete within 5 s"):
        pending.wait()
    monkeypatch.undo()
    q = torch.randn(1, 8, 2, 8, dtype=torch.float64)
    for call in (
        lambda: ring_dilated_attention(q, q, q, [4], [1], group=subgroup),
        lambda: ring_attention(q, q, q, group=subgroup),
    ):
        with pytest.raises(RuntimeError, match=r"failed earlier.*K/V exchange of rank 0"):
            call()
    with pytest.raises(RuntimeError, match="failed earlier"):  # an existing communicator refuses to post too
        comm.exchange({}, {0: torch.zeros(3)}, "again")
