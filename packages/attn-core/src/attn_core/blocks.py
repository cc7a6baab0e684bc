"""Attention block primitives with LSE: the per-step kernels ring attention and dilated groups use.

``block_forward`` returns (out, lse) for one block of queries against one block of keys.
``block_backward`` takes the *final* out and lse of the rows (after merging with other blocks)
and returns this block's contribution to dq, dk, dv. Using the merged statistics makes the sum
of the per-block gradients exactly the gradient of the merged output (the rows' probabilities
are exp(s - L_merged), and D = rowsum(dout * out_merged)).

Shapes: q (B, Nq, H, D), k/v (B, Nk, Hkv, D) with H % Hkv == 0 (any strides); out like q;
lse (B, H, Nq) fp32. ``is_causal`` is top-left aligned (query i sees keys j <= i).
This module holds the portable math path; device-specific fast paths register through
:func:`register_block_impl` (kept out of the backends so ring and dilated share them).
"""

from __future__ import annotations

import threading
from typing import Protocol

import torch

from .validation import check_qkv, check_tensor

__all__ = [
    "BlockImpl",
    "acc_dtype",
    "block_backward",
    "block_forward",
    "drop_padded_keys",
    "register_block_impl",
    "softmax_with_lse",
]


class BlockImpl(Protocol):
    def supports(self, q: torch.Tensor, k: torch.Tensor, is_causal: bool, has_padding: bool) -> bool: ...

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def backward(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        is_causal: bool,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


_IMPLS: list[BlockImpl] = []
_IMPLS_LOCK = threading.Lock()


def register_block_impl(impl: BlockImpl) -> None:
    """Add a fast path (tried in registration order before the math path)."""
    with _IMPLS_LOCK:
        _IMPLS.append(impl)


def _pick(q: torch.Tensor, k: torch.Tensor, is_causal: bool, has_padding: bool) -> BlockImpl | None:
    with _IMPLS_LOCK:
        impls = list(_IMPLS)
    for impl in impls:
        if impl.supports(q, k, is_causal, has_padding):
            return impl
    return None


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64 (reference path), everything else is fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def softmax_with_lse(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row softmax p of logits s (..., n) (-inf = masked) and its log-sum-exp lse (...), differentiable.

    The row max is subtracted before exp and p is divided by its own sum, so p sums to 1 however
    large the logits (exp(s - logsumexp(s)) does not: at |s| ~ 1e6 in fp32 the rounding of the
    lse alone scales every p by up to e^0.03). Rows with no finite logit: p 0, lse -inf, no NaN.
    """
    if s.shape[-1] == 0:  # no keys: every row is empty
        return s, torch.full(s.shape[:-1], float("-inf"), dtype=s.dtype, device=s.device)
    # any reference point gives the same p and lse: the max keeps exp in range (no gradient needed)
    row_max = s.detach().amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.exp(s - row_max)
    total = e.sum(dim=-1, keepdim=True)
    nonempty = total > 0
    safe = torch.where(nonempty, total, torch.ones_like(total))  # no 0/0, even in the branch not taken
    lse = torch.where(nonempty, row_max + torch.log(safe), torch.full_like(total, float("-inf")))
    return e / safe, lse.squeeze(-1)


def drop_padded_keys(
    k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v (B, Nk, Hkv, D) with the rows of padded keys (key_padding_mask (B, Nk) True) set to 0.

    Padded keys are masked out of the softmax, but a masked logit still multiplies their values
    (q . k, p * v): a NaN or inf there would reach the output (NaN + -inf, 0 * NaN). Zeroing them
    makes their values never read; the gradient of k and v is 0 there.
    """
    keep = ~key_padding_mask[:, :, None, None]
    return torch.where(keep, k, 0.0), torch.where(keep, v, 0.0)


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


def block_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    is_causal: bool = False,
    softmax_scale: float,
    key_padding_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, Nq, H, D) in q.dtype, lse (B, H, Nq) fp32, fp64 for fp64 q); empty rows: out 0, lse -inf.

    Padded keys (key_padding_mask (B, Nk) True) are ignored, their k and v values never read.
    """
    check_qkv(q, k, v, key_padding_mask=key_padding_mask, same_length=False)
    impl = _pick(q, k, is_causal, key_padding_mask is not None)
    if impl is not None:
        return impl.forward(q, k, v, is_causal, softmax_scale)
    if key_padding_mask is not None:
        k, v = drop_padded_keys(k, v, key_padding_mask)
    s = _masked_logits(q, k, is_causal, softmax_scale, key_padding_mask)
    p, lse = softmax_with_lse(s)  # lse -inf for empty rows
    vg = v.to(s.dtype).permute(0, 2, 1, 3).unsqueeze(2)
    out = _ungroup(torch.matmul(p, vg))
    B, H = q.shape[0], q.shape[2]
    return out.to(q.dtype), lse.reshape(B, H, q.shape[1])


def block_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    is_causal: bool = False,
    softmax_scale: float,
    key_padding_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This block's (dq, dk, dv) given the rows' final out and lse (in acc_dtype; dk/dv summed over GQA groups).

    dout, out: (B, Nq, H, D); lse: (B, H, Nq). Padded keys get dk = dv = 0; their values are never read.
    """
    B, Nq, H, _, _ = check_qkv(q, k, v, key_padding_mask=key_padding_mask, same_length=False)
    check_tensor("dout", dout, tuple(q.shape), q.device)
    check_tensor("out", out, tuple(q.shape), q.device)
    check_tensor("lse", lse, (B, H, Nq), q.device)
    impl = _pick(q, k, is_causal, key_padding_mask is not None)
    if impl is not None:
        return impl.backward(dout, q, k, v, out, lse, is_causal, softmax_scale)
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
