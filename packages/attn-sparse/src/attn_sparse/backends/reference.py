"""Pure PyTorch block-sparse attention over the active tiles only: any device, any float dtype.

Query block rows are bucketed by their number of active key blocks (widths rounded up to a power
of two); per bucket the rows' active key/value blocks are gathered and attended in one batched
softmax. Work and memory are O(active tiles x Bq x Bk) (at most 2x for the rounding), never
N x N, even when a few global rows read every key block. Everything is ordinary autograd, so
gradients are exact (the gathers' backward scatters dK/dV back with accumulation). Accumulates in
float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import torch

from attn_core.blocks import acc_dtype, drop_padded_keys, softmax_with_lse

from ..intervals import KeyIntervals
from ..layout import BlockLayout
from ..masks import TokenMask

NAME = "reference"
SUPPORTS_KEY_PADDING_MASK = True


def unsupported_reasons(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, mask: TokenMask
) -> list[str]:
    """The reference path takes every validated call."""
    return []


def _pad_seq(t: torch.Tensor, length: int) -> torch.Tensor:
    extra = length - t.shape[1]
    return t if extra == 0 else torch.nn.functional.pad(t, (0, 0, 0, 0, 0, extra))


def gathered_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    *,
    mask: TokenMask | KeyIntervals,
    softmax_scale: float,
    key_padding_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the active tiles; returns out (B, Nq, H, D) in q's dtype and lse (B, H, Nq).

    q: (B, Nq, H, D); k, v: (B, Nk, Hkv, D); ``layout`` fits the call and is on q's device.
    mask: the token masks inside the tiles: a TokenMask (causal, window, documents) or explicit
    per-query key intervals (:class:`attn_sparse.intervals.KeyIntervals` of this call).
    key_padding_mask: optional (B, Nk) bool, True = padding key to ignore. Rows that see no key
    give out 0 and lse -inf.
    """
    B, Nq, H, D = q.shape
    Nk, Hkv = k.shape[1], k.shape[2]
    if B == 0 or Nq == 0:  # nothing to attend from; keep the graph so q, k, v get (empty / zero) gradients
        zero = q.sum() * 0 + k.sum() * 0 + v.sum() * 0
        out = torch.zeros(B, Nq, H, D, dtype=q.dtype, device=q.device) + zero.to(q.dtype)
        return out, torch.full((B, H, Nq), float("-inf"), dtype=acc_dtype(q.dtype), device=q.device)
    if key_padding_mask is not None:  # padded keys' values are never read (a NaN there would reach p * v)
        k, v = drop_padded_keys(k, v, key_padding_mask)
    G = H // Hkv
    bq, bk = layout.block_size
    nq, nk = layout.num_query_blocks, layout.num_key_blocks
    shared = layout.num_heads == 1
    ad = acc_dtype(q.dtype)
    dev = q.device
    qb = _pad_seq(q, nq * bq).to(ad).reshape(B, nq, bq, H, D)
    kb = _pad_seq(k, nk * bk).to(ad).reshape(B, nk, bk, Hkv, D)
    vb = _pad_seq(v, nk * bk).to(ad).reshape(B, nk, bk, Hkv, D)
    crow = layout.crow_indices.long()
    col = layout.col_indices.long()
    counts = crow[1:] - crow[:-1]  # (Hl * nq,)
    # bucket b holds the rows with 2^(b-1) < count <= 2^b (b = 0: exactly one block); empty rows stay 0
    bucket = torch.ceil(torch.log2(counts.clamp(min=1).double())).long()
    bucket = torch.where(counts > 0, bucket, torch.full_like(bucket, -1))
    padk = None
    if key_padding_mask is not None:  # (B, nk * Bk): keys past Nk count as padding too
        padk = torch.nn.functional.pad(key_padding_mask, (0, nk * bk - Nk), value=True)
    qpos_in_block = torch.arange(bq, device=dev)
    kpos_in_block = torch.arange(bk, device=dev)
    band = None
    if mask.banded:  # each query's key interval [lo, hi]; rows past Nq see nothing (lo > hi)
        lo, hi = mask.key_intervals(Nq, Nk, dev)
        extra = nq * bq - Nq
        band = (
            torch.nn.functional.pad(lo, (0, extra), value=1),
            torch.nn.functional.pad(hi, (0, extra), value=0),
        )
    rows_done, outs, lses = [], [], []
    for b in torch.unique(bucket[bucket >= 0]).tolist():
        rr = torch.nonzero(bucket == b).flatten()  # CSR rows (head * nq + query block)
        width = 1 << int(b)
        slot = torch.arange(width, device=dev)
        valid = slot < counts[rr, None]  # (R, W)
        pos = torch.clamp(crow[rr, None] + slot, max=max(col.numel() - 1, 0))  # CSR position of each slot
        cols = torch.where(valid, col[pos], torch.zeros_like(pos))
        qblk = rr % nq
        if shared:
            # every query head of the row reads the same tiles: gather K/V once per kv head
            qr = qb[:, qblk].reshape(B, -1, bq, Hkv, G, D).permute(0, 1, 3, 4, 2, 5)  # (B, R, Hkv, G, Bq, D)
            kr = kb[:, cols].permute(0, 1, 4, 2, 3, 5).reshape(B, -1, Hkv, 1, width * bk, D)
            vr = vb[:, cols].permute(0, 1, 4, 2, 3, 5).reshape(B, -1, Hkv, 1, width * bk, D)
        else:
            head = rr // nq
            kvh = head // G
            # (head, block) dims made adjacent so the advanced indices keep their place
            qr = qb.transpose(2, 3)[:, qblk, head].reshape(B, -1, 1, 1, bq, D)  # (B, R, 1, 1, Bq, D)
            kr = kb.transpose(2, 3)[:, cols, kvh[:, None]].reshape(B, -1, 1, 1, width * bk, D)
            vr = vb.transpose(2, 3)[:, cols, kvh[:, None]].reshape(B, -1, 1, 1, width * bk, D)
        s = torch.matmul(qr, kr.transpose(-1, -2)) * softmax_scale  # (B, R, h1, h2, Bq, W*Bk)
        # masked keys: padding slots, keys past Nk, and keys outside the query's token-mask interval
        kpos = (cols[:, :, None] * bk + kpos_in_block).reshape(-1, 1, 1, 1, width * bk)
        masked = ~valid[:, :, None].expand(-1, -1, bk).reshape(-1, 1, 1, 1, width * bk) | (kpos >= Nk)
        if band is not None:
            qpos = qblk[:, None] * bq + qpos_in_block  # (R, Bq)
            lo_r = band[0][qpos].reshape(-1, 1, 1, bq, 1)
            hi_r = band[1][qpos].reshape(-1, 1, 1, bq, 1)
            masked = masked | (kpos < lo_r) | (kpos > hi_r)
        if padk is not None:
            masked = masked | padk[:, kpos.flatten()].reshape(B, -1, 1, 1, 1, width * bk)
        s = s.masked_fill(masked, float("-inf"))  # its backward zeroes masked entries (no NaN from empty rows)
        p, lse = softmax_with_lse(s)
        outs.append(torch.matmul(p, vr))  # (B, R, h1, h2, Bq, D)
        lses.append(lse)
        rows_done.append(rr)
    out = torch.zeros(B, nq, bq, H, D, dtype=ad, device=dev)
    lse_all = torch.full((B, nq, bq, H), float("-inf"), dtype=ad, device=dev)
    if rows_done:
        rr = torch.cat(rows_done)
        qblk = rr % nq
        if shared:  # rows cover all heads: (B, R, Hkv, G, Bq, D) -> (B, R, Bq, H, D)
            o = torch.cat(outs, dim=1).permute(0, 1, 4, 2, 3, 5).reshape(B, -1, bq, H, D)
            l = torch.cat(lses, dim=1).permute(0, 1, 4, 2, 3).reshape(B, -1, bq, H)
            out = out.index_put((torch.arange(B, device=dev)[:, None], qblk[None]), o)
            lse_all = lse_all.index_put((torch.arange(B, device=dev)[:, None], qblk[None]), l)
        else:  # one (query block, head) per row
            head = rr // nq
            o = torch.cat(outs, dim=1).reshape(B, -1, bq, D).transpose(1, 2)  # (B, Bq, R, D)
            l = torch.cat(lses, dim=1).reshape(B, -1, bq).transpose(1, 2)
            bidx = torch.arange(B, device=dev)[:, None, None]
            sidx = qpos_in_block[None, :, None]
            out = out.index_put((bidx, qblk[None, None], sidx, head[None, None]), o)
            lse_all = lse_all.index_put((bidx, qblk[None, None], sidx, head[None, None]), l)
    else:
        # no active tile at all: still part of the graph, so q, k, v get (exactly zero) gradients
        out = out + (qb[:, :0].sum() + kb[:, :0].sum() + vb[:, :0].sum())
    out = out.reshape(B, nq * bq, H, D)[:, :Nq]
    lse_out = lse_all.reshape(B, nq * bq, H)[:, :Nq].transpose(1, 2)
    return out.to(q.dtype), lse_out


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    mask: TokenMask,
    softmax_scale: float,
    *,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """out (B, Nq, H, D) in q's dtype (see :func:`gathered_attention`)."""
    out, _ = gathered_attention(
        q, k, v, layout, mask=mask, softmax_scale=softmax_scale, key_padding_mask=key_padding_mask
    )
    return out
