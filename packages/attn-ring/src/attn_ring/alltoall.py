"""AllToAllComm: the all-to-all sibling of :class:`attn_ring.comm.RingComm`.

Ulysses (head-parallel) attention trades a sequence shard for a head shard with one all-to-all:
every rank of a group of W ranks splits a tensor into W blocks along its first dim, sends
block d to rank d, and receives block s from every rank s::

    comm = AllToAllComm(group, timeout_s=60)
    comm.handshake({"batch": B, "shard_len": n, ...})   # ValueError on every rank if any differs
    recv = comm.all_to_all(send).wait()                   # send, recv: (W, ...); recv[s] came from rank s

Same guarantees as the ring layer: the handshake all-gathers a small {name: int} descriptor
(shapes, dtype code, flags, config hash) so a mismatch is a ValueError on every rank, not a
hang or a silent wrong answer; every wait is bounded by ``timeout_s`` on gloo (a peer that died
or never arrived gives a TimeoutError/RuntimeError naming the ranks); on NCCL the wait is a
stream dependency and the process group's own timeout bounds a stuck collective.

How the bytes move (one code path per group, chosen once from the backend's capability):

- ``"collective"``: ``dist.all_to_all_single`` (NCCL; gloo on CPU tensors, available in every
  torch this package supports). One collective call per exchange.
- ``"p2p"``: every other backend (or ``method="p2p"``): the W - 1 sends and receives are posted
  as one ``dist.batch_isend_irecv`` batch (:func:`attn_ring.exchange.post_exchange`, the same
  point-to-point primitive the ring uses); the block for this rank itself is a local copy.

:attr:`AllToAllComm.method_reason` says which one was chosen and why.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist

from .comm import check_timeout
from .exchange import DEFAULT_TIMEOUT_S, comm_device, group_rank_and_size, handshake, post_exchange, wait_all

__all__ = ["ALL_TO_ALL_METHODS", "AllToAllComm", "PendingAllToAll", "all_to_all_method"]

ALL_TO_ALL_METHODS = ("auto", "collective", "p2p")

# Backends whose ProcessGroup implements alltoall_base for the tensors they carry here (NCCL:
# CUDA; gloo: CPU, which is where comm_device puts gloo traffic).
_COLLECTIVE_BACKENDS = ("nccl", "gloo")


def all_to_all_method(backend: str, method: str = "auto") -> tuple[str, str]:
    """(method, reason): how an all-to-all runs on ``backend`` ("collective" or "p2p")."""
    if method not in ALL_TO_ALL_METHODS:
        raise ValueError(f"method must be one of {ALL_TO_ALL_METHODS}, got {method!r}")
    if method == "p2p":
        return "p2p", "point-to-point batch requested (method='p2p')"
    if backend in _COLLECTIVE_BACKENDS:
        return "collective", f"backend {backend!r} implements all_to_all_single for its tensors"
    if method == "collective":
        raise ValueError(
            f"method='collective' needs a backend with all_to_all_single ({_COLLECTIVE_BACKENDS}), got {backend!r}; "
            "use method='auto' or 'p2p'"
        )
    return "p2p", f"backend {backend!r} is not known to implement all_to_all_single: batched isend/irecv instead"


class PendingAllToAll:
    """One in-flight all-to-all; :meth:`wait` returns the received (W, ...) tensor."""

    def __init__(self, comm: AllToAllComm, works: list[dist.Work], received: torch.Tensor, label: str) -> None:
        self._comm = comm
        self._works = works
        self._received = received
        self._label = label
        self._done = not works

    def wait(self) -> torch.Tensor:
        if not self._done:
            c = self._comm
            what = f"{self._label} all-to-all on rank {c.rank} of {c.world_size} (exchanging with ranks 0..{c.world_size - 1})"
            wait_all(self._works, c.timeout_s, what, stream_only=c.backend == "nccl")
            self._done = True
        return self._received


class AllToAllComm:
    """All-to-all over a process group with a handshake and bounded waits; see the module doc.

    group: a torch.distributed ProcessGroup (None = the default world); block d of a send goes to
    the group's rank d. method: "auto" (by capability, see :func:`all_to_all_method`),
    "collective" or "p2p".
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        method: str = "auto",
    ) -> None:
        self.rank, self.world_size = group_rank_and_size(group)
        self.group = group
        self.timeout_s = check_timeout(timeout_s)
        self.backend = str(dist.get_backend(group))
        self.device = comm_device(group, torch.device("cpu"))
        self.method, self.method_reason = all_to_all_method(self.backend, method)

    def handshake(self, descriptor: Mapping[str, int], label: str = "ulysses attention") -> None:
        """All-gather ``descriptor`` ({name: int}); ValueError on every rank if any rank's values differ."""
        names = list(descriptor)
        try:
            handshake([int(descriptor[n]) for n in names], names, self.group, self.timeout_s, label)
        except (TimeoutError, RuntimeError) as exc:  # a peer that never arrived or has gone: name this rank
            raise type(exc)(f"rank {self.rank} of {self.world_size}: {exc}") from exc

    def all_to_all(self, send: torch.Tensor, *, label: str = "ulysses") -> PendingAllToAll:
        """Post: block ``send[d]`` goes to rank d; the result's block s comes from rank s.

        send: (W, ...) on :attr:`device`, shaped alike on every rank (check with :meth:`handshake`).
        Returns a :class:`PendingAllToAll`; its ``wait()`` gives a new (W, ...) tensor.
        A group of one returns a copy of ``send``.
        """
        W = self.world_size
        if send.dim() < 1 or send.shape[0] != W:
            raise ValueError(f"send must have shape (W={W}, ...), got {tuple(send.shape)}")
        if send.device != self.device:
            raise ValueError(f"send is on {send.device}; this group's all-to-all needs {self.device}")
        send = send.contiguous()
        recv = torch.empty_like(send)
        if W == 1:
            recv.copy_(send)
            return PendingAllToAll(self, [], recv, label)
        try:
            if self.method == "collective":
                work = dist.all_to_all_single(recv, send, group=self.group, async_op=True)
                works = [] if work is None else [work]
            else:
                recv[self.rank].copy_(send[self.rank])
                others = [r for r in range(W) if r != self.rank]
                works = post_exchange({r: send[r] for r in others}, {r: recv[r] for r in others}, self.group)
        except RuntimeError as exc:  # e.g. gloo: a peer's connection is gone (it exited)
            raise RuntimeError(
                f"{label} all-to-all on rank {self.rank} of {W} could not be posted ({self.method}): {exc}"
            ) from exc
        return PendingAllToAll(self, works, recv, label)

    def all_gather(self, tensor: torch.Tensor, *, label: str = "ulysses") -> torch.Tensor:
        """(W, ...) stack of every rank's ``tensor`` (same shape everywhere), through :meth:`all_to_all`.

        For small metadata (a key padding mask): it sends W copies of ``tensor``.
        """
        wire = tensor.to(self.device)
        send = wire.unsqueeze(0).expand(self.world_size, *wire.shape)
        return self.all_to_all(send, label=label).wait()
