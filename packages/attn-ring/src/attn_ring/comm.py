"""RingComm: the ring communication layer of ring attention.

Every rank of a process group (the world by default, or any subgroup) sends tensors to the next
rank of the ring and receives same-shaped tensors from the previous one, with one batched
``dist.batch_isend_irecv`` per transfer. Receive buffers are double buffered per *channel* (a
name such as ``"kv"`` or ``"dkv"``): the transfer for step i+1 lands in one buffer set while the
block of step i, in the other set, is being computed on, so communication overlaps compute::

    comm = RingComm(group, timeout_s=60)
    comm.handshake({"batch": B, "shard_len": n, ...})   # ValueError on every rank if any differs
    blk = [kv]
    for step in range(comm.world_size):
        pending = comm.send_recv(blk, channel="kv") if step + 1 < comm.world_size else None
        compute(blk)                                      # overlaps the transfer
        if pending is not None:
            blk = pending.wait()                          # TimeoutError naming step and peer
    comm.close()                                          # returns the buffers to the provider

Interface (other attn_ring modules build on it):

- ``RingComm(group=None, *, timeout_s=DEFAULT_TIMEOUT_S, buffers=None)``: validates the group
  (torch.distributed initialised, this process a member) and exposes ``rank``, ``world_size``,
  ``next_rank``, ``prev_rank`` (group ranks) and ``device`` (where tensors on the wire live:
  CUDA for NCCL, CPU for gloo).
- ``handshake(descriptor)``: all-gathers a small {name: int} descriptor (shapes, dtype code,
  flags, config hash); any mismatch raises ValueError on every rank instead of a later hang.
- ``send_recv(tensors, channel=...) -> PendingTransfer``; ``PendingTransfer.wait() -> list[Tensor]``.
- ``exchange(sends, recvs, what) -> PendingTransfer``: one batched point-to-point exchange with
  any peers ({group rank: tensor}), for rings that move planned rows rather than whole blocks
  (ring dilated, ring block-sparse); ``all_gather(tensor, what)``: a small collective.
- ``buffers``: an optional provider with ``acquire(shape, dtype, device) -> Tensor`` and
  ``release(tensor) -> None`` (memory_runtime's buffer managers implement it); default
  ``torch.empty``.
- ``dtype_code(dtype)``, ``config_hash(obj)``, ``check_timeout(value)``: helpers to build descriptors
  and validate arguments the same way everywhere.

Timeouts: on gloo each wait is bounded by ``timeout_s`` (``Work.wait(timeout)``); on NCCL the wait
is a stream dependency (it does not block the host, which keeps the overlap) and the process
group's own timeout aborts a stuck transfer. A peer that exited or disagrees on sizes gives a
TimeoutError/RuntimeError naming the step and the peer rank.

A failed group stays failed: after a transfer, exchange or handshake times out or cannot be
posted, the group's point-to-point state is unknown (messages may be half sent), so the failure
is recorded against the group (:func:`mark_group_failed`). Every later ``RingComm`` on that group,
and every later transfer of an existing one, raises a RuntimeError at once, quoting the original error, instead of waiting out another timeout;
destroy the group and create a new one to go on. ``raise_if_group_failed(group)`` makes the same
check for code that talks to a group without a ``RingComm``.
"""

from __future__ import annotations

import threading
import weakref
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch
import torch.distributed as dist

from .exchange import DEFAULT_TIMEOUT_S, comm_device, group_rank_and_size, handshake, post_exchange, wait_all

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "BufferProvider",
    "PendingTransfer",
    "RingComm",
    "TorchBuffers",
    "check_timeout",
    "config_hash",
    "dtype_code",
    "mark_group_failed",
    "raise_if_group_failed",
]

_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}


def dtype_code(dtype: torch.dtype) -> int:
    """A small stable integer for a floating dtype (0 for anything else), for handshake descriptors."""
    return _DTYPE_CODES.get(dtype, 0)


def config_hash(obj: object) -> int:
    """A stable 31-bit hash of ``repr(obj)`` (not Python's per-process salted ``hash``)."""
    return zlib.crc32(repr(obj).encode()) & 0x7FFFFFFF


def check_timeout(timeout_s: object) -> float:
    """A finite positive number of seconds; ValueError otherwise."""
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < float(timeout_s) < 1e9:
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    return float(timeout_s)


# group -> (what failed, the error): weak keys, so a destroyed group's entry goes with it
_FAILED_GROUPS: weakref.WeakKeyDictionary[dist.ProcessGroup, tuple[str, BaseException]] = weakref.WeakKeyDictionary()
_FAILED_LOCK = threading.Lock()


def _group_object(group: dist.ProcessGroup | None) -> dist.ProcessGroup | None:
    # None means the default world; key on its object so that a re-initialised world starts clean
    return group if group is not None else dist.group.WORLD


def mark_group_failed(group: dist.ProcessGroup | None, what: str, error: BaseException) -> None:
    """Record that ``what`` (a transfer, a handshake) failed on ``group`` with ``error``.

    Only the first failure is kept: it is the cause, later ones are its consequences.
    """
    key = _group_object(group)
    if key is None:
        return
    with _FAILED_LOCK:
        _FAILED_GROUPS.setdefault(key, (what, error))


def raise_if_group_failed(group: dist.ProcessGroup | None) -> None:
    """RuntimeError, at once, if a ring operation on ``group`` failed earlier in this process."""
    key = _group_object(group)
    if key is None:
        return
    with _FAILED_LOCK:
        failure = _FAILED_GROUPS.get(key)
    if failure is not None:
        what, error = failure
        raise RuntimeError(
            f"this process group failed earlier and cannot be used for ring attention again: {what} raised "
            f"{type(error).__name__}: {error}. Destroy the group (dist.destroy_process_group) and create a new one."
        ) from error


class BufferProvider(Protocol):
    """Where receive buffers come from; memory_runtime's ring buffer managers implement this."""

    def acquire(self, shape: Sequence[int], dtype: torch.dtype, device: Any) -> torch.Tensor: ...

    def release(self, tensor: torch.Tensor) -> None: ...


class TorchBuffers:
    """Default provider: plain ``torch.empty`` (the caching allocator recycles the memory)."""

    def acquire(self, shape: Sequence[int], dtype: torch.dtype, device: Any) -> torch.Tensor:
        return torch.empty(tuple(shape), dtype=dtype, device=device)

    def release(self, tensor: torch.Tensor) -> None:
        del tensor


class PendingTransfer:
    """One in-flight transfer (ring step or exchange); :meth:`wait` returns the received tensors."""

    def __init__(self, comm: RingComm, works: list[dist.Work], received: list[torch.Tensor], what: str) -> None:
        self._comm = comm
        self._works = works
        self._received = received
        self._what = what
        self._done = not works

    def wait(self) -> list[torch.Tensor]:
        if not self._done:
            c = self._comm
            try:
                if c.backend == "nccl":
                    # A stream dependency, not a host block: keeps compute and transfer overlapped. The
                    # process group's timeout (watchdog) bounds a transfer that never completes.
                    for work in self._works:
                        work.wait()
                else:
                    wait_all(self._works, c.timeout_s, self._what)
            except (TimeoutError, RuntimeError) as exc:
                mark_group_failed(c.group, self._what, exc)
                raise
            self._done = True
        return self._received


class RingComm:
    """Send to the next rank, receive from the previous one, double buffered; see the module doc.

    group: a torch.distributed ProcessGroup (None = the default world). The ring is the group's
    ranks in order: rank r sends to (r + 1) % W and receives from (r - 1) % W.
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        buffers: BufferProvider | None = None,
    ) -> None:
        self.rank, self.world_size = group_rank_and_size(group)
        raise_if_group_failed(group)
        if self.world_size < 1:
            raise ValueError(f"ring size must be >= 1, got a group of size {self.world_size}")
        if buffers is not None and not (
            callable(getattr(buffers, "acquire", None)) and callable(getattr(buffers, "release", None))
        ):
            raise TypeError(
                f"buffers must provide acquire(shape, dtype, device) and release(tensor), got {type(buffers).__name__}"
            )
        self.group = group
        self.timeout_s = check_timeout(timeout_s)
        self.backend = str(dist.get_backend(group))
        self.device = comm_device(group, torch.device("cpu"))
        self.next_rank = (self.rank + 1) % self.world_size
        self.prev_rank = (self.rank - 1) % self.world_size
        self._next_global = self._global(self.next_rank)
        self._prev_global = self._global(self.prev_rank)
        self._buffers: BufferProvider = buffers if buffers is not None else TorchBuffers()
        # channel -> (two buffer sets, each a list of tensors; the set the next transfer fills; step count)
        self._slots: dict[str, tuple[list[list[torch.Tensor]], int, int]] = {}
        self._lock = threading.Lock()

    def _global(self, group_rank: int) -> int:
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)

    def handshake(self, descriptor: Mapping[str, int], label: str = "ring attention") -> None:
        """All-gather ``descriptor`` ({name: int}); ValueError on every rank if any rank's values differ."""
        names = list(descriptor)
        values = [int(descriptor[n]) for n in names]
        try:
            handshake(values, names, self.group, self.timeout_s, label)
        except (TimeoutError, RuntimeError) as exc:
            # a mismatch (ValueError) leaves the group usable; a stuck or broken all_gather does not
            mark_group_failed(self.group, f"{label} handshake on rank {self.rank}", exc)
            raise

    def _receive_buffers(self, tensors: Sequence[torch.Tensor], channel: str) -> tuple[list[torch.Tensor], int]:
        spec = [(tuple(t.shape), t.dtype) for t in tensors]
        with self._lock:
            slot = self._slots.get(channel)
            if slot is not None and [(tuple(b.shape), b.dtype) for b in slot[0][0]] != spec:
                self._release_sets(slot[0])
                slot = None
            if slot is None:
                sets = [[self._buffers.acquire(s, d, self.device) for s, d in spec] for _ in range(2)]
                slot = (sets, 0, 0)
            sets, nxt, step = slot
            self._slots[channel] = (sets, 1 - nxt, step + 1)
        return sets[nxt], step

    def send_recv(self, tensors: Sequence[torch.Tensor], *, channel: str = "kv") -> PendingTransfer:
        """Post: send ``tensors`` to the next rank, receive same-shaped tensors from the previous rank.

        Tensors must be contiguous, on :attr:`device`, and shaped alike on every rank (check with
        :meth:`handshake`). The received tensors live in this channel's double buffer: they stay
        valid until the transfer after next on the same channel. A world of size 1 returns the
        inputs themselves.
        """
        if self.world_size == 1:
            return PendingTransfer(self, [], list(tensors), f"ring transfer '{channel}'")
        for i, t in enumerate(tensors):
            if t.device != self.device:
                raise ValueError(f"tensor {i} for channel '{channel}' is on {t.device}; the ring needs {self.device}")
        recv, step = self._receive_buffers(tensors, channel)
        what = (
            f"ring transfer '{channel}' step {step} on rank {self.rank} of {self.world_size} "
            f"(receiving from rank {self.prev_rank}, sending to rank {self.next_rank})"
        )
        ops = []
        # Receives first, then sends, in the same order on every rank: gloo and NCCL match
        # point-to-point messages between a pair of ranks in posting order.
        for buf in recv:
            ops.append(dist.P2POp(dist.irecv, buf, self._prev_global, self.group))
        for t in tensors:
            ops.append(dist.P2POp(dist.isend, t.contiguous(), self._next_global, self.group))
        return PendingTransfer(self, self._post(lambda: list(dist.batch_isend_irecv(ops)), what), recv, what)

    def exchange(
        self, sends: Mapping[int, torch.Tensor], recvs: Mapping[int, torch.Tensor], what: str
    ) -> PendingTransfer:
        """Post one batched point-to-point exchange with any peers of the group; ``wait()`` returns
        the receive buffers in ascending peer order.

        ``sends[peer]`` goes to each peer, ``recvs[peer]`` is filled from each peer (group ranks).
        Tensors must be contiguous and on the group's device (CUDA for NCCL, CPU for gloo), and
        every receive buffer exactly the size its sender sends (both sides derive it from the same
        plan). Bytes are counted in :func:`attn_ring.exchange.last_stats`. ``what`` names the
        exchange in errors.
        """
        works = self._post(lambda: post_exchange(sends, recvs, self.group), what) if sends or recvs else []
        return PendingTransfer(self, works, [recvs[p] for p in sorted(recvs)], what)

    def all_gather(self, tensor: torch.Tensor, what: str) -> list[torch.Tensor]:
        """Every rank's ``tensor`` (same shape on all ranks, on :attr:`device`), in rank order; bounded wait."""
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]

        def post() -> list[dist.Work]:
            work = dist.all_gather(parts, tensor, group=self.group, async_op=True)
            if work is None:  # async_op=True always returns a handle; guard for type checkers
                raise RuntimeError("all_gather(async_op=True) returned no work handle")
            return [work]

        PendingTransfer(self, self._post(post, what), parts, what).wait()
        return parts

    def _post(self, post: Callable[[], list[dist.Work]], what: str) -> list[dist.Work]:
        """Run ``post``; a group that failed earlier raises at once, a failed post marks the group failed."""
        raise_if_group_failed(self.group)
        try:
            return post()
        except RuntimeError as exc:  # e.g. gloo: the peer's connection is gone (it exited)
            mark_group_failed(self.group, what, exc)
            raise RuntimeError(f"{what} could not be posted: {exc}") from exc

    def _release_sets(self, sets: list[list[torch.Tensor]]) -> None:
        for bufs in sets:
            for b in bufs:
                self._buffers.release(b)

    def close(self) -> None:
        """Give every receive buffer back to the provider (received tensors must no longer be used)."""
        with self._lock:
            slots, self._slots = self._slots, {}
        for sets, _, _ in slots.values():
            self._release_sets(sets)

    def __enter__(self) -> RingComm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
