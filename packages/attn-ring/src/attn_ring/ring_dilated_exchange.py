"""Ring dilated attention's communication: the K/V rows of crossing segments, their gradients, the padding masks.

Every rank derives the same exchange plan (:mod:`attn_ring.ring_dilated_plan`), so sender and
receiver agree on the sizes and order of every message; the payloads move through
:meth:`attn_ring.comm.RingComm.exchange` (one batched point-to-point exchange per direction),
which bounds every wait and records a failed group.
"""

from __future__ import annotations

import torch

from .comm import PendingTransfer, RingComm
from .exchange import comm_device
from .ring_dilated_plan import RingDilatedRankPlan

__all__ = ["finish_kv", "finish_kv_grads", "gather_mask", "post_kv", "post_kv_grads"]


def post_kv(k: torch.Tensor, v: torch.Tensor, plan: RingDilatedRankPlan, comm: RingComm) -> PendingTransfer:
    """Post the exchange: send the K/V rows (k, v (B, n, Hkv, D)) others need, receive ours."""
    B, n, Hkv, D = k.shape
    dev = comm_device(comm.group, k.device)
    kf, vf = k.reshape(B, n * Hkv, D), v.reshape(B, n * Hkv, D)
    sends = {}
    for dst, idx in plan.send_index.items():
        i = idx.to(k.device)
        sends[dst] = torch.stack([kf.index_select(1, i), vf.index_select(1, i)]).to(dev).contiguous()
    recvs = {
        a: torch.empty(2, B, cnt, D, dtype=k.dtype, device=dev) for a, cnt in enumerate(plan.recv_counts) if cnt > 0
    }
    return comm.exchange(sends, recvs, f"ring dilated K/V exchange of rank {comm.rank}")


def finish_kv(pending: PendingTransfer, k: torch.Tensor) -> torch.Tensor:
    """Wait for the exchange; the received rows (2, B, R, D) in the plan's ``needed`` order."""
    received = pending.wait()  # ascending source rank: the plan's order
    B, D = k.shape[0], k.shape[-1]
    if not received:
        return torch.empty(2, B, 0, D, dtype=k.dtype, device=k.device)
    return torch.cat(received, dim=2).to(k.device)


def post_kv_grads(drecv: torch.Tensor, dk: torch.Tensor, plan: RingDilatedRankPlan, comm: RingComm) -> PendingTransfer:
    """Post the reverse exchange: gradients drecv (2, B, R, D) of received rows go back to their owners (fp32)."""
    dev = comm_device(comm.group, dk.device)
    sends, start = {}, 0
    for a, cnt in enumerate(plan.recv_counts):
        if cnt > 0:
            sends[a] = drecv[:, :, start : start + cnt].to(dev).contiguous()
            start += cnt
    B, D = dk.shape[0], dk.shape[-1]
    recvs = {b: torch.empty(2, B, idx.numel(), D, dtype=drecv.dtype, device=dev) for b, idx in plan.send_index.items()}
    return comm.exchange(sends, recvs, f"ring dilated dK/dV exchange of rank {comm.rank}")


def finish_kv_grads(pending: PendingTransfer, dk: torch.Tensor, dv: torch.Tensor, plan: RingDilatedRankPlan) -> None:
    """Wait for the reverse exchange and add the returned (fp32) gradients into dk, dv (B, n*Hkv, D)."""
    for b, buf in zip(sorted(plan.send_index), pending.wait()):
        i = plan.send_index[b].to(dk.device)
        dk.index_add_(1, i, buf[0].to(device=dk.device, dtype=dk.dtype))
        dv.index_add_(1, i, buf[1].to(device=dk.device, dtype=dv.dtype))


def gather_mask(mask: torch.Tensor, comm: RingComm) -> torch.Tensor:
    """All-gather the (B, n) padding masks into (B, N): B * N bytes, tiny next to the K/V rows."""
    mine = mask.to(device=comm_device(comm.group, mask.device), dtype=torch.uint8).contiguous()
    parts = comm.all_gather(mine, "all_gather of key_padding_mask")
    return torch.cat(parts, dim=1).to(device=mask.device, dtype=torch.bool)
