"""Pure PyTorch block-sparse attention over the active tiles only: any device, any float dtype.

For every query block row the active key/value blocks are gathered (rows padded to the layout's
largest row, padding slots masked), so the work and memory are O(active tiles x Bq x Bk), never
N x N (a row with many active blocks, e.g. a global row, pads every row of its head to that
width). Everything is ordinary autograd: gradients are exact (the gather's backward scatters
dK/dV back with accumulation). Accumulates in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import torch

from attn_core.blocks import acc_dtype

from ..layout import BlockLayout

NAME = "reference"


def unsupported_reasons(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, is_causal: bool
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
    is_causal: bool,
    softmax_scale: float,
    tile_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the active tiles; returns out (B, Nq, H, D) in q's dtype and lse (B, H, Nq).

    q: (B, Nq, H, D); k, v: (B, Nk, Hkv, D); ``layout`` fits the call and is on q's device.
    tile_bias: optional (B or 1, layout.num_heads, nq, K) added to every logit of the tile in
    slot t of :meth:`BlockLayout.padded_columns` (K = its width); differentiable. Rows that
    see no key give out 0 and lse -inf.
    """
    B, Nq, H, D = q.shape
    Nk, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    bq, bk = layout.block_size
    nq, nk = layout.num_query_blocks, layout.num_key_blocks
    ad = acc_dtype(q.dtype)
    cols, valid = layout.padded_columns()  # (Hl, nq, K)
    Kw = cols.shape[-1]
    # (B, Hkv, G, nq, Bq, D): query heads grouped by the kv head they read (GQA without copies of K/V)
    qg = _pad_seq(q, nq * bq).to(ad).reshape(B, nq, bq, Hkv, G, D).permute(0, 3, 4, 1, 2, 5)
    kp = _pad_seq(k, nk * bk).to(ad).reshape(B, nk, bk, Hkv, D).permute(0, 3, 1, 2, 4)  # (B, Hkv, nk, Bk, D)
    vp = _pad_seq(v, nk * bk).to(ad).reshape(B, nk, bk, Hkv, D).permute(0, 3, 1, 2, 4)
    if layout.num_heads == 1:
        idx = cols[0]  # (nq, K): one gather per kv head, shared by its G query heads
        kg, vg = kp[:, :, idx].unsqueeze(2), vp[:, :, idx].unsqueeze(2)  # (B, Hkv, 1, nq, K, Bk, D)
        ok = valid.reshape(1, 1, nq, Kw)
    else:
        idx = cols.reshape(Hkv, G, nq, Kw)
        head = torch.arange(Hkv, device=q.device).reshape(Hkv, 1, 1, 1)
        kg, vg = kp[:, head, idx], vp[:, head, idx]  # (B, Hkv, G, nq, K, Bk, D)
        ok = valid.reshape(Hkv, G, nq, Kw)
    kg = kg.reshape(*kg.shape[:4], Kw * bk, D)
    vg = vg.reshape(*vg.shape[:4], Kw * bk, D)
    s = torch.matmul(qg, kg.transpose(-1, -2)) * softmax_scale  # (B, Hkv, G|1, nq, Bq, K*Bk)
    if tile_bias is not None:
        bias = tile_bias.to(ad).reshape(tile_bias.shape[0], *ok.shape[:2], nq, 1, Kw, 1)
        s = s + bias.expand(*bias.shape[:5], Kw, bk).reshape(*bias.shape[:5], Kw * bk)
    # masked keys: padding slots, keys past Nk, and (causal) keys after the query
    kpos = (idx.unsqueeze(-1) * bk + torch.arange(bk, device=q.device)).reshape(*ok.shape[:-1], Kw * bk)
    masked = ~ok.unsqueeze(-1).expand(*ok.shape, bk).reshape(kpos.shape) | (kpos >= Nk)
    masked = masked.unsqueeze(-2)  # (.., nq, 1, K*Bk)
    if is_causal:
        qpos = torch.arange(nq * bq, device=q.device).reshape(nq, bq, 1)
        masked = masked | (kpos.unsqueeze(-2) > qpos)
    s = s.masked_fill(masked, float("-inf"))  # its backward zeroes the masked entries (no NaN from empty rows)
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)))
    out = torch.matmul(p, vg)  # (B, Hkv, G, nq, Bq, D)
    out = out.permute(0, 3, 4, 1, 2, 5).reshape(B, nq * bq, H, D)[:, :Nq]
    lse = lse.reshape(B, H, nq * bq)[:, :, :Nq]
    return out.to(q.dtype), lse


def block_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, is_causal: bool, softmax_scale: float
) -> torch.Tensor:
    """out (B, Nq, H, D) in q's dtype (see :func:`gathered_attention`)."""
    out, _ = gathered_attention(q, k, v, layout, is_causal=is_causal, softmax_scale=softmax_scale)
    return out
