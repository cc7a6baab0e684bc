"""Point-to-point row exchange: send each peer exactly the rows it asked for, receive the rows we need.

Ring dilated attention does not pass whole K/V blocks around a ring: a rank needs only the
dilated rows (1/r of K/V, at its heads' offsets) of the long segments it spans. Every rank derives
the same exchange plan from the global geometry, so sender and receiver agree on the sizes and
order of every message without any metadata on the wire. This module holds the low-level steps
that :class:`attn_ring.comm.RingComm` (which every ring goes through: it bounds the waits and
records a failed group) and :class:`attn_ring.alltoall.AllToAllComm` build on:

- :func:`post_exchange` posts all sends and receives of one exchange as one
  ``dist.batch_isend_irecv`` batch (NCCL groups them into one launch; gloo runs them
  concurrently); :func:`wait_all` waits with a deadline on gloo, so a peer that died or
  disagrees on the plan gives a :class:`TimeoutError` naming the peers instead of a hang (on
  NCCL the wait is a stream dependency and the process group's timeout bounds it);
  :func:`exchange_rows` does both. :func:`last_stats` counts the payload bytes moved.
- :func:`handshake` checks that every rank of the group called with the same configuration
  (shapes, dtype, flags) before any payload moves: a mismatch is a ValueError on every rank.

Peers are named by their rank in ``group``; the global ranks P2P needs are derived here.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "ExchangeStats",
    "comm_device",
    "exchange_rows",
    "group_rank_and_size",
    "handshake",
    "is_nccl",
    "last_stats",
    "post_exchange",
    "reset_stats",
    "wait_all",
]

DEFAULT_TIMEOUT_S = 300.0

_STATS = threading.local()


@dataclass
class ExchangeStats:
    """Bytes this rank moved in the latest exchanges of the current thread (payload only)."""

    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0


def last_stats() -> ExchangeStats:
    """Counters of this thread since the last :func:`reset_stats` (or thread start)."""
    stats = getattr(_STATS, "value", None)
    if stats is None:
        stats = ExchangeStats()
        _STATS.value = stats
    return stats


def reset_stats() -> None:
    _STATS.value = ExchangeStats()


def group_rank_and_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(rank in group, group size); ValueError if torch.distributed is not initialised or we are not a member."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "torch.distributed is not initialised: call dist.init_process_group(...) on every rank "
            "before ring attention (a single process may use a world of size 1)"
        )
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of the given process group")
    return rank, dist.get_world_size(group)


def _global_rank(group: dist.ProcessGroup | None, group_rank: int) -> int:
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


def comm_device(group: dist.ProcessGroup | None, fallback: torch.device) -> torch.device:
    """Where tensors for this group must live: CUDA for NCCL, CPU for gloo."""
    backend = dist.get_backend(group)
    if backend == "nccl":
        return fallback if fallback.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def wait_all(works: Sequence[dist.Work], timeout_s: float, what: str, *, stream_only: bool = False) -> None:
    """Wait for ``works``; TimeoutError naming ``what`` after ``timeout_s`` seconds.

    stream_only (NCCL): make the current CUDA stream wait instead of blocking the host, so the
    host keeps queueing compute; the process group's own timeout (watchdog) bounds a stuck transfer.
    """
    for work in works:
        if stream_only:
            work.wait()
            continue
        try:
            ok = work.wait(timedelta(seconds=timeout_s))
        except RuntimeError as exc:
            raise TimeoutError(f"{what} did not complete within {timeout_s:.0f} s: {exc}") from exc
        if ok is False:
            raise TimeoutError(f"{what} did not complete within {timeout_s:.0f} s")


def is_nccl(group: dist.ProcessGroup | None) -> bool:
    return str(dist.get_backend(group)) == "nccl"


def handshake(
    signature: Sequence[int],
    names: Sequence[str],
    group: dist.ProcessGroup | None,
    timeout_s: float,
    label: str = "ring",
) -> None:
    """All-gather ``signature`` (ints) and raise ValueError on every rank if any rank differs.

    ``names`` labels the entries for the error message; ``label`` names the caller (e.g. "ring attention").
    """
    rank, world = group_rank_and_size(group)
    if world == 1:
        return
    device = comm_device(group, torch.device("cpu"))
    mine = torch.tensor(list(signature), dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    work = dist.all_gather(gathered, mine, group=group, async_op=True)
    if work is None:  # async_op=True always returns a handle; guard for type checkers
        raise RuntimeError("all_gather(async_op=True) returned no work handle")
    wait_all([work], timeout_s, f"{label} handshake (all_gather of the call signature)")
    rows = [g.tolist() for g in gathered]
    bad = [
        f"rank {r}: {name}={theirs} (rank {rank} has {ours})"
        for r, row in enumerate(rows)
        for name, theirs, ours in zip(names, row, rows[rank])
        if theirs != ours
    ]
    if bad:
        raise ValueError(f"{label}: ranks called with mismatched configurations: " + "; ".join(bad))


def post_exchange(
    sends: Mapping[int, torch.Tensor],
    recvs: Mapping[int, torch.Tensor],
    group: dist.ProcessGroup | None,
) -> list[dist.Work]:
    """Post the sends and receives of one exchange as one batch and return the pending works.

    ``sends[peer]`` goes to each peer and ``recvs[peer]`` is filled from each peer (group ranks).
    Tensors must be contiguous and on the group's device; every receive buffer must have exactly
    the size its sender sends (both sides derive it from the same plan). Empty tensors are not
    sent. Wait for the result with :func:`wait_all`; :func:`exchange_rows` does both.
    """
    rank, world = group_rank_and_size(group)
    ops: list[dist.P2POp] = []
    stats = last_stats()
    for peer, buf in sorted(recvs.items()):
        if not 0 <= peer < world or peer == rank:
            raise ValueError(f"receive peer {peer} must be another rank of the group (size {world}, this rank {rank})")
        if buf.numel():
            ops.append(dist.P2POp(dist.irecv, buf, _global_rank(group, peer), group))
            stats.bytes_received += buf.numel() * buf.element_size()
    for peer, buf in sorted(sends.items()):
        if not 0 <= peer < world or peer == rank:
            raise ValueError(f"send peer {peer} must be another rank of the group (size {world}, this rank {rank})")
        if buf.numel():
            ops.append(dist.P2POp(dist.isend, buf.contiguous(), _global_rank(group, peer), group))
            stats.bytes_sent += buf.numel() * buf.element_size()
            stats.messages_sent += 1
    if not ops:
        return []
    return list(dist.batch_isend_irecv(ops))


def exchange_rows(
    sends: Mapping[int, torch.Tensor],
    recvs: Mapping[int, torch.Tensor],
    group: dist.ProcessGroup | None,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> None:
    """:func:`post_exchange` and wait for it (TimeoutError naming the peers after ``timeout_s``)."""
    works = post_exchange(sends, recvs, group)
    if works:
        rank = dist.get_rank(group)
        what = f"rank {rank}: exchange with peers {sorted(set(sends) | set(recvs))}"
        wait_all(works, timeout_s, what, stream_only=is_nccl(group))
