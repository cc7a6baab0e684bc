"""Packed documents in ring attention: which varlen calls each ring step makes.

With ``cu_seqlens`` (the offsets of documents packed along the whole sequence of N = n * W
tokens) a query sees only keys of its own document. Ring attention's step schedule
(:func:`attn_ring.ring.ring_step_blocks`) says which (local query rows, block key rows, causal)
pieces rank r computes against the block of rank src; here every piece is cut into the
documents its query rows and key rows share, giving one :class:`PackedBlock` (one
:func:`attn_core.varlen.varlen_forward` call) per piece, or none when they share no document.

Why a piece maps to one varlen call without gathering rows: a shard's (and a block's) rows are
in increasing global position (contiguous: one chunk; zigzag: chunk r, then chunk 2W-1-r), so
each document's rows in a piece are one contiguous run, and the runs come in document order.
The call takes the row span from the first to the last shared document on each side (a slice,
no copy); a document inside that span present on one side only becomes a sequence with no
queries or no keys (nothing computed; rows without keys give lse -inf, which merges as
nothing). Under causal, the diagonal piece (src == r) holds the same rows on both sides, so
every document in it has equal query and key lengths and the local top-left causal mask is the
global one; every other piece is non-causal (its keys all precede its queries).

Plans are built on the host from the offsets (one host read), vectorised over documents (no
Python loop per document: searchsorted over the offsets per chunk), and cached per
(offsets, world, rank, shard length, layout, causal, device).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from attn_core.merge import merge_into_
from attn_core.packing import host_offsets, host_to_device, offsets_from_key
from attn_core.varlen import explain_varlen, varlen_backward, varlen_forward

from .ring_schedule import ring_step_blocks, shard_chunks

__all__ = [
    "PLAN_CACHE_SIZE",
    "PackedBlock",
    "packed_backward",
    "packed_forward",
    "packed_ring_plan",
    "packed_step_blocks",
]

# Distinct (offsets, world, rank, shard length, layout, causal, device) plans kept: a model's
# layers share one.
PLAN_CACHE_SIZE = 16


@dataclass(frozen=True)
class PackedBlock:
    """One varlen call of a ring step: local query rows ``q_rows`` = [q0, q1) of the shard against
    key rows ``k_rows`` = [k0, k1) of the visiting block, cut into sequences (documents).

    cu_seqlens_q / cu_seqlens_k: int32 (S + 1,) offsets relative to q0 / k0, on the CPU;
    device_cu_seqlens_q / _k the same on the inputs' device (the flash path reads them there).
    max_seqlen_q / _k: the longest sequence on each side; causal: whether the call is causal.
    """

    q_rows: tuple[int, int]
    k_rows: tuple[int, int]
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    device_cu_seqlens_q: torch.Tensor
    device_cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    causal: bool

    def offsets_for(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The offsets to pass with these (sliced, packed) q, k, v: on the device where the flash
        path takes the call, else on the CPU (the bucketed path then reads no device memory)."""
        if q.device.type == "cpu":
            return self.cu_seqlens_q, self.cu_seqlens_k
        choice = explain_varlen(
            q, k, v, self.device_cu_seqlens_q, self.device_cu_seqlens_k, self.max_seqlen_q, self.max_seqlen_k,
            is_causal=self.causal,
        )  # fmt: skip
        if choice.backend == "flash":
            return self.device_cu_seqlens_q, self.device_cu_seqlens_k
        return self.cu_seqlens_q, self.cu_seqlens_k


def _intervals(chunks: list[tuple[int, int]], rows: tuple[int, int]) -> list[tuple[int, int]]:
    """Global [start, end) intervals of the local rows [r0, r1), in local order."""
    out, local = [], 0
    for start, length in chunks:
        a, b = max(rows[0], local), min(rows[1], local + length)
        if a < b:
            out.append((start + a - local, start + b - local))
        local += length
    return out


def _documents(c: torch.Tensor, intervals: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(docs, lengths), int64: the documents with rows in the intervals (sorted) and how many rows
    each has there. c: int64 offsets (num_docs + 1,) on the CPU; intervals sorted and disjoint."""
    ends = c[1:]
    docs, lengths = [torch.zeros(0, dtype=torch.int64)], [torch.zeros(0, dtype=torch.int64)]
    for start, end in intervals:
        first = int(torch.searchsorted(ends, start, right=True))
        last = int(torch.searchsorted(ends, end - 1, right=True))
        d = torch.arange(first, last + 1)
        docs.append(d)
        lengths.append(torch.minimum(c[d + 1], torch.tensor(end)) - torch.maximum(c[d], torch.tensor(start)))
    d, n = torch.cat(docs), torch.cat(lengths)
    keep = n > 0  # empty documents inside the range have no rows
    d, n = d[keep], n[keep]
    # a document reaching from one interval into the next appears twice (adjacent): add its rows
    uniq, inverse = torch.unique_consecutive(d, return_inverse=True)
    return uniq, torch.zeros(uniq.numel(), dtype=torch.int64).index_add_(0, inverse, n)


def _cumulative(lengths: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)]).to(torch.int32)


def _packed_block(
    c: torch.Tensor,
    q_chunks: list[tuple[int, int]],
    k_chunks: list[tuple[int, int]],
    q_rows: tuple[int, int],
    k_rows: tuple[int, int],
    causal: bool,
    device: torch.device,
) -> PackedBlock | None:
    q_docs, q_len = _documents(c, _intervals(q_chunks, q_rows))
    k_docs, k_len = _documents(c, _intervals(k_chunks, k_rows))
    docs = torch.unique(torch.cat([q_docs, k_docs]))  # sorted: every document with rows on either side
    lq = torch.zeros(docs.numel(), dtype=torch.int64).index_copy_(0, torch.searchsorted(docs, q_docs), q_len)
    lk = torch.zeros(docs.numel(), dtype=torch.int64).index_copy_(0, torch.searchsorted(docs, k_docs), k_len)
    shared = torch.nonzero((lq > 0) & (lk > 0)).squeeze(1)
    if shared.numel() == 0:
        return None  # no document in common: no call
    i0, i1 = int(shared[0]), int(shared[-1]) + 1
    # rows before the first shared document belong to earlier documents: the span starts after them
    q0 = q_rows[0] + int(lq[:i0].sum())
    k0 = k_rows[0] + int(lk[:i0].sum())
    lq, lk = lq[i0:i1], lk[i0:i1]
    cu_q, cu_k = _cumulative(lq), _cumulative(lk)
    return PackedBlock(
        q_rows=(q0, q0 + int(cu_q[-1])),
        k_rows=(k0, k0 + int(cu_k[-1])),
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        device_cu_seqlens_q=host_to_device(cu_q, device),
        device_cu_seqlens_k=host_to_device(cu_k, device),
        max_seqlen_q=int(lq.max()),
        max_seqlen_k=int(lk.max()),
        causal=causal,
    )


def packed_step_blocks(
    offsets: torch.Tensor,
    rank: int,
    src: int,
    world_size: int,
    shard_len: int,
    layout: str,
    is_causal: bool,
    device: torch.device | None = None,
) -> list[PackedBlock]:
    """The varlen calls rank ``rank`` makes against the block of rank ``src`` (empty: the step is skipped).

    offsets: valid cu_seqlens (num_docs + 1,) of the whole sequence of world_size * shard_len
    tokens (any integer dtype, on the CPU). device: where the calls' offsets go (default CPU).
    """
    c = offsets.to("cpu", torch.int64)
    dev = torch.device("cpu") if device is None else device
    q_chunks = shard_chunks(rank, world_size, shard_len, layout)
    k_chunks = shard_chunks(src, world_size, shard_len, layout)
    blocks = []
    for q_rows, k_rows, causal in ring_step_blocks(rank, src, world_size, shard_len, layout, is_causal):
        block = _packed_block(c, q_chunks, k_chunks, q_rows, k_rows, causal, dev)
        if block is not None:
            blocks.append(block)
    return blocks


def packed_ring_plan(
    cu_seqlens: torch.Tensor,
    rank: int,
    world_size: int,
    shard_len: int,
    layout: str,
    is_causal: bool,
    device: torch.device,
) -> tuple[tuple[PackedBlock, ...], ...]:
    """Per ring step s (the block of rank (rank - s) mod W), the varlen calls of rank ``rank``.

    cu_seqlens: validated offsets (int32, any device; read to the host once); device: the
    inputs' device (where the calls' device offsets go). Cached.
    """
    return _plan(host_offsets(cu_seqlens), rank, world_size, shard_len, layout, is_causal, device)


@functools.lru_cache(maxsize=PLAN_CACHE_SIZE)
def _plan(
    key: bytes, rank: int, world_size: int, shard_len: int, layout: str, is_causal: bool, device: torch.device
) -> tuple[tuple[PackedBlock, ...], ...]:
    c = offsets_from_key(key)
    return tuple(
        tuple(packed_step_blocks(c, rank, (rank - s) % world_size, world_size, shard_len, layout, is_causal, device))
        for s in range(world_size)
    )


def packed_forward(
    q: torch.Tensor,
    blk: torch.Tensor,
    block: PackedBlock,
    scale: float,
    out_acc: torch.Tensor,
    lse_acc: torch.Tensor,
) -> None:
    """Run one varlen call of a ring step and merge it into the accumulators by LSE.

    q (1, n, H, D) the local shard; blk (2, 1, n, Hkv, D) the visiting K/V; out_acc (1, n, H, D)
    and lse_acc (1, H, n) in the accumulation dtype, updated in place.
    """
    (q0, q1), (k0, k1) = block.q_rows, block.k_rows
    qs, ks, vs = q[0, q0:q1], blk[0, 0, k0:k1], blk[1, 0, k0:k1]
    cu_q, cu_k = block.offsets_for(qs, ks, vs)
    o, lse = varlen_forward(
        qs, ks, vs, cu_q, cu_k, block.max_seqlen_q, block.max_seqlen_k,
        softmax_scale=scale, is_causal=block.causal, check_offsets=False,
    )  # fmt: skip
    merge_into_(out_acc[:, q0:q1], lse_acc[:, :, q0:q1], o[None], lse[None])


def packed_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    blk: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    block: PackedBlock,
    scale: float,
    dq: torch.Tensor,
    dkv: torch.Tensor,
) -> None:
    """One varlen call's gradients from the rows' final out (1, n, H, D) and lse (1, H, n), added
    into dq (1, n, H, D) and dkv (2, 1, n, Hkv, D) (accumulation dtype) in place."""
    (q0, q1), (k0, k1) = block.q_rows, block.k_rows
    qs, ks, vs = q[0, q0:q1], blk[0, 0, k0:k1], blk[1, 0, k0:k1]
    cu_q, cu_k = block.offsets_for(qs, ks, vs)
    dq_b, dk_b, dv_b = varlen_backward(
        dout[0, q0:q1], qs, ks, vs, out[0, q0:q1], lse[0, :, q0:q1], cu_q, cu_k,
        block.max_seqlen_q, block.max_seqlen_k, softmax_scale=scale, is_causal=block.causal, check_offsets=False,
    )  # fmt: skip
    dq[0, q0:q1] += dq_b
    dkv[0, 0, k0:k1] += dk_b
    dkv[1, 0, k0:k1] += dv_b
