"""The portable block path: attention in plain torch ops, in the accumulation dtype; takes every input.

Logits are materialised per block ((B, Hkv, G, Nq, Nk) in fp32, fp64 for fp64), so callers bound
the block sizes. Shapes and semantics as in :mod:`attn_core.blocks`.
"""

from __future__ import annotations

import torch

from ..blocks import acc_dtype, drop_padded_keys, softmax_with_lse

__all__ = ["NAME", "backward", "forward", "unsupported_reasons"]

NAME = "math"


def unsupported_reasons(q: torch.Tensor, k: torch.Tensor, is_causal: bool, has_padding: bool) -> list[str]:
    """The math path takes every validated block."""
    return []


def _grouped(q: torch.Tensor, hkv: int) -> torch.Tensor:
    # (B, N, H, D) -> (B, Hkv, G, N, D): query heads grouped by the kv head they read
    B, N, H, D = q.shape
    return q.reshape(B, N, hkv, H // hkv, D).permute(0, 2, 3, 1, 4)


def _masked_logits(
    q: torch.Tensor, k: torch.Tensor, is_causal: bool, scale: float, key_padding_mask: torch.Tensor | None
) -> torch.Tensor:
    """fp32 logits (B, Hkv, G, Nq, Nk) with -inf at masked keys."""
    hkv = k.shape[2]
    ad = acc_dtype(q.dtype)
    qg = _grouped(q.to(ad), hkv)
    kg = k.to(ad).permute(0, 2, 1, 3).unsqueeze(2)  # (B, Hkv, 1, Nk, D)
    s = torch.matmul(qg, kg.transpose(-1, -2)) * scale
    Nq, Nk = q.shape[1], k.shape[1]
    if is_causal:
        keep = torch.ones(Nq, Nk, dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    if key_padding_mask is not None:
        s = s.masked_fill(key_padding_mask[:, None, None, None, :], float("-inf"))
    return s


def _lse_grouped(lse: torch.Tensor, hkv: int) -> torch.Tensor:
    # (B, H, Nq) -> (B, Hkv, G, Nq, 1)
    B, H, Nq = lse.shape
    return lse.reshape(B, hkv, H // hkv, Nq).unsqueeze(-1)


def _ungroup(x: torch.Tensor) -> torch.Tensor:
    # (B, Hkv, G, N, D) -> (B, N, H, D)
    B, hkv, G, N, D = x.shape
    return x.permute(0, 3, 1, 2, 4).reshape(B, N, hkv * G, D)


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    is_causal: bool,
    softmax_scale: float,
    key_padding_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, Nq, H, D) in q.dtype, lse (B, H, Nq) in the accumulation dtype); see blocks.block_forward."""
    if key_padding_mask is not None:
        k, v = drop_padded_keys(k, v, key_padding_mask)
    s = _masked_logits(q, k, is_causal, softmax_scale, key_padding_mask)
    p, lse = softmax_with_lse(s)  # lse -inf for empty rows
    vg = v.to(s.dtype).permute(0, 2, 1, 3).unsqueeze(2)
    out = _ungroup(torch.matmul(p, vg))
    B, H = q.shape[0], q.shape[2]
    return out.to(q.dtype), lse.reshape(B, H, q.shape[1])


def backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    is_causal: bool,
    softmax_scale: float,
    key_padding_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in the accumulation dtype; see blocks.block_backward."""
    hkv = k.shape[2]
    if key_padding_mask is not None:
        k, v = drop_padded_keys(k, v, key_padding_mask)
    s = _masked_logits(q, k, is_causal, softmax_scale, key_padding_mask)
    ad = s.dtype
    # The rows' merged probabilities exp(s - L) as (this block's normalised softmax) x (its merge
    # weight exp(lse_blk - L)), with lse_blk recomputed as block_forward computed it: a row whose
    # keys are all in this block gets exactly its forward probabilities (lse_blk == L), and the
    # weights are the ones the merge used. exp(s - L) in one step scales every p by the rounding
    # of L instead (|L| * 2^-24 for fp32 L: 3% at logits ~1e6). What remains with several blocks
    # is that rounding of the given L in the weight; an fp64 L is used in fp64.
    p_blk, lse_blk = softmax_with_lse(s)
    L = _lse_grouped(lse, hkv)
    lse_blk = lse_blk.unsqueeze(-1).to(L.dtype)
    # Rows with L = -inf saw no key anywhere, rows with lse_blk = -inf none here: weight 0, no NaN.
    seen = torch.isfinite(L)
    weight = torch.where(seen, torch.exp(lse_blk - torch.where(seen, L, torch.zeros_like(L))), 0.0)
    p = p_blk * weight.to(ad)
    do = _grouped(dout.to(ad), hkv)
    o = _grouped(out.to(ad), hkv)
    vg = v.to(ad).permute(0, 2, 1, 3).unsqueeze(2)
    kg = k.to(ad).permute(0, 2, 1, 3).unsqueeze(2)
    dv = torch.matmul(p.transpose(-1, -2), do).sum(dim=2)  # (B, Hkv, Nk, D)
    dp = torch.matmul(do, vg.transpose(-1, -2))
    delta = (do * o).sum(dim=-1, keepdim=True)
    ds = p * (dp - delta) * softmax_scale
    dq = _ungroup(torch.matmul(ds, kg))
    dk = torch.matmul(ds.transpose(-1, -2), _grouped(q.to(ad), hkv)).sum(dim=2)
    return dq, dk.permute(0, 2, 1, 3), dv.permute(0, 2, 1, 3)
