"""The portable varlen path: sequences batched by length into power-of-two buckets; takes every call.

Sequences whose (query, key) lengths round up to the same powers of two (Pq, Pk) form one bucket;
each bucket runs as padded batches (n, Pq, H, D) / (n, Pk, Hkv, D), never a loop over sequences:
padded keys are masked (an additive -inf key bias), padded query rows dropped. A batch runs
through the fused SDPA kernels of :mod:`attn_core.sdpa_ops` where they take the device, dtype and
head dim (the CPU flash kernel on CPU, cuDNN on CUDA fp16/bf16), else through the math block path
(:func:`attn_core.blocks.block_forward` / ``block_backward``: batched matmuls in the accumulation
dtype). Either takes the rows' final out and LSE in the backward. A batch holds at most
:data:`LOGITS_BUDGET` query-key pairs (n * H * Pq * Pk), or one sequence's when that alone is
more: memory follows the buckets, never total_q * total_k.

The lengths are read to the host (free for CPU offsets, one device read otherwise); the batches'
index tensors are cached per (offsets, heads, device), so a forward, its backward and every layer
of a model share them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .. import sdpa_ops
from ..blocks import acc_dtype, block_backward, block_forward
from ..packing import host_offsets, host_to_device, offsets_from_key

__all__ = ["LOGITS_BUDGET", "NAME", "PLAN_CACHE_SIZE", "backward", "forward", "unsupported_reasons"]

NAME = "bucketed"

# Logits (fp32, fp64 for fp64) one padded batch may hold: bounds each batch's temporaries.
LOGITS_BUDGET = 1 << 24
# Distinct (offsets, heads, device, budget) batch plans kept.
PLAN_CACHE_SIZE = 16


def unsupported_reasons(
    q: torch.Tensor, k: torch.Tensor, cu_seqlens_q: torch.Tensor, max_seqlen_q: int, has_padding: bool
) -> list[str]:
    """The bucketed path takes every validated call."""
    return []


@dataclass(frozen=True)
class Batch:
    """One padded batch of a bucket: n sequences, Pq query rows, Pk key rows each.

    q_index (n, Pq) / k_index (n, Pk): packed rows (0 where padded); q_valid / k_valid: which are
    real; q_take / k_take: the flat (n * P) indices of the real ones and q_rows / k_rows their
    packed rows (index tensors: selecting them reads nothing back to the host); keys_full: no
    padded key (no mask needed without a key_padding_mask).
    """

    q_index: torch.Tensor
    q_valid: torch.Tensor
    q_take: torch.Tensor
    q_rows: torch.Tensor
    k_index: torch.Tensor
    k_valid: torch.Tensor
    k_take: torch.Tensor
    k_rows: torch.Tensor
    keys_full: bool


def _pow2_ceil(x: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= x, elementwise (x >= 1, int64)."""
    p = torch.pow(2, torch.ceil(torch.log2(x.to(torch.float64)))).to(torch.int64)
    return torch.where(p < x, 2 * p, p)  # a log2 rounded down by one step would give p < x


def _padded_rows(starts: torch.Tensor, lengths: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.arange(width)
    valid = t[None, :] < lengths[:, None]
    return torch.where(valid, starts[:, None] + t[None, :], 0), valid


def _batches(
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, heads: int, device: torch.device
) -> tuple[Batch, ...]:
    # keyed on the offsets' values: one host copy, however many layers reuse the plan
    return _plan(host_offsets(cu_seqlens_q), host_offsets(cu_seqlens_k), heads, device, LOGITS_BUDGET)


@functools.lru_cache(maxsize=PLAN_CACHE_SIZE)
def _plan(cu_q: bytes, cu_k: bytes, heads: int, device: torch.device, budget: int) -> tuple[Batch, ...]:
    cq, ck = offsets_from_key(cu_q), offsets_from_key(cu_k)
    len_q, len_k = cq[1:] - cq[:-1], ck[1:] - ck[:-1]
    # sequences without queries or without keys produce nothing (their rows stay out 0, lse -inf)
    seqs = torch.nonzero((len_q > 0) & (len_k > 0)).squeeze(1)
    if seqs.numel() == 0:
        return ()
    pq, pk = _pow2_ceil(len_q[seqs]), _pow2_ceil(len_k[seqs])
    buckets, which = torch.unique(torch.stack([pq, pk], dim=1), dim=0, return_inverse=True)
    batches = []
    for b, (Pq, Pk) in enumerate(buckets.tolist()):  # one step per bucket: O(log^2 of the longest)
        members = seqs[which == b]
        per_batch = max(1, budget // (heads * Pq * Pk))
        for s in range(0, members.numel(), per_batch):
            chunk = members[s : s + per_batch]
            q_index, q_valid = _padded_rows(cq[chunk], len_q[chunk], Pq)
            k_index, k_valid = _padded_rows(ck[chunk], len_k[chunk], Pk)
            q_take, k_take = torch.nonzero(q_valid.flatten()).squeeze(1), torch.nonzero(k_valid.flatten()).squeeze(1)
            batches.append(
                Batch(
                    q_index=host_to_device(q_index, device),
                    q_valid=host_to_device(q_valid, device),
                    q_take=host_to_device(q_take, device),
                    q_rows=host_to_device(q_index.flatten()[q_take], device),
                    k_index=host_to_device(k_index, device),
                    k_valid=host_to_device(k_valid, device),
                    k_take=host_to_device(k_take, device),
                    k_rows=host_to_device(k_index.flatten()[k_take], device),
                    keys_full=bool(k_valid.all()),
                )
            )
    return tuple(batches)


def _key_mask(batch: Batch, key_padding_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(n, Pk) bool, True = key not attendable (a padded slot or a padding key), or None if none is."""
    if key_padding_mask is None:
        return None if batch.keys_full else ~batch.k_valid
    return ~batch.k_valid | key_padding_mask[batch.k_index]


def _take(x: torch.Tensor, take: torch.Tensor) -> torch.Tensor:
    """x (n, P, ...) at the flat (n * P) indices ``take``: (len(take), ...)."""
    return x.flatten(0, 1).index_select(0, take)


def _fused(q: torch.Tensor) -> bool:
    """Whether the fused SDPA kernels take batches like q (n, P, H, D)."""
    return not sdpa_ops.unsupported_reasons(q.device, q.dtype, q.shape[-1])


def _batch_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (n, Pq, H, D), lse (n, H, Pq)) of one padded batch; mask (n, Pk) True = not attendable."""
    if _fused(q):
        out, lse = sdpa_ops.attention_forward(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            is_causal=is_causal, scale=scale, key_bias=sdpa_ops.key_bias_from_mask(mask, q.dtype),
        )  # fmt: skip
        return out.transpose(1, 2), lse
    return block_forward(q, k, v, is_causal=is_causal, softmax_scale=scale, key_padding_mask=mask)


def _batch_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of one padded batch from the rows' final out and lse (n, H, Pq)."""
    if _fused(q):
        grads = sdpa_ops.attention_backward(
            dout.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), out.transpose(1, 2), lse,
            is_causal=is_causal, scale=scale, key_bias=sdpa_ops.key_bias_from_mask(mask, q.dtype),
        )  # fmt: skip
        return grads[0].transpose(1, 2), grads[1].transpose(1, 2), grads[2].transpose(1, 2)
    return block_backward(dout, q, k, v, out, lse, is_causal=is_causal, softmax_scale=scale, key_padding_mask=mask)


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    is_causal: bool,
    key_padding_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (total_q, H, D) in q's dtype, lse (H, total_q) in the accumulation dtype)."""
    H = q.shape[1]
    out = q.new_zeros(q.shape)
    lse = torch.full((H, q.shape[0]), float("-inf"), dtype=acc_dtype(q.dtype), device=q.device)
    for b in _batches(cu_seqlens_q, cu_seqlens_k, H, q.device):
        mask = _key_mask(b, key_padding_mask)
        o, l_ = _batch_forward(q[b.q_index], k[b.k_index], v[b.k_index], mask, is_causal, softmax_scale)
        out.index_copy_(0, b.q_rows, _take(o, b.q_take))
        lse.index_copy_(1, b.q_rows, _take(l_.transpose(1, 2), b.q_take).t().to(lse.dtype))
    return out, lse


def backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    is_causal: bool,
    key_padding_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in q's dtype, accumulated per batch in the accumulation dtype."""
    H = q.shape[1]
    ad = acc_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=ad, device=q.device)
    dk = torch.zeros(k.shape, dtype=ad, device=q.device)
    dv = torch.zeros(v.shape, dtype=ad, device=q.device)
    for b in _batches(cu_seqlens_q, cu_seqlens_k, H, q.device):
        rows = b.q_valid[:, :, None, None]
        # padded query rows: no dout and lse -inf, so they add nothing to dk, dv
        dout_b = torch.where(rows, dout[b.q_index], 0.0)
        lse_b = torch.where(b.q_valid[:, None, :], lse[:, b.q_index].transpose(0, 1), float("-inf"))
        dq_b, dk_b, dv_b = _batch_backward(
            dout_b, q[b.q_index], k[b.k_index], v[b.k_index], out[b.q_index], lse_b,
            _key_mask(b, key_padding_mask), is_causal, softmax_scale,
        )  # fmt: skip
        # every packed row belongs to one sequence: copies, not sums
        dq.index_copy_(0, b.q_rows, _take(dq_b, b.q_take).to(ad))
        dk.index_copy_(0, b.k_rows, _take(dk_b, b.k_take).to(ad))
        dv.index_copy_(0, b.k_rows, _take(dv_b, b.k_take).to(ad))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
