"""Merging partial attention results by their log-sum-exp, in float32.

Two partial results over disjoint (or multiset-disjoint) key sets, out_a with lse_a and out_b
with lse_b, combine exactly into the attention over the union:
    L = log(exp(lse_a) + exp(lse_b)),  out = exp(lse_a - L) * out_a + exp(lse_b - L) * out_b.
Dilated attention merges its groups this way; ring attention merges its ring steps this way.
An lse of -inf marks an empty row: it contributes weight 0, and a row empty everywhere stays
out 0, lse -inf (never NaN).

Shapes: out (B, N, H, D); lse (B, H, N).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .blocks import acc_dtype

__all__ = ["merge_into_", "merge_partials", "merge_weights"]


def _lse_to_out_layout(w: torch.Tensor) -> torch.Tensor:
    # (B, H, N) -> (B, N, H, 1), matching out (B, N, H, D)
    return w.transpose(1, 2).unsqueeze(-1)


def merge_weights(lses: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Softmax-denominator weights exp(lse_g - L) (fp32, 0 where empty) and the merged L.

    The weights are exp(lse_g - M) / sum_g' exp(lse_g' - M) with M the largest lse, so they sum to
    1 however large the lse (exp(lse_g - L) with L rounded scales them by that rounding, up to
    e^0.03 at |L| ~ 1e6 in fp32); L = M + log(sum). Differentiable.
    """
    stacked = torch.stack([lse.to(acc_dtype(lse.dtype)) for lse in lses])
    # the max is only a reference point (weights and L do not depend on it): no gradient through it
    top = stacked.detach().amax(dim=0)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # all empty: weights 0, L -inf
    e = torch.exp(stacked - top)
    total = e.sum(dim=0)
    nonempty = total > 0
    safe = torch.where(nonempty, total, torch.ones_like(total))
    merged = torch.where(nonempty, top + torch.log(safe), torch.full_like(total, float("-inf")))
    return list(e / safe), merged


def merge_partials(outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge partial results; returns (out (B, N, H, D), lse (B, H, N)) in fp32 (fp64 if the lses are). Differentiable."""
    if len(outs) != len(lses) or len(outs) == 0:
        raise ValueError(f"merge_partials needs as many outs as lses, at least one; got {len(outs)} and {len(lses)}")
    weights, merged = merge_weights(lses)
    out = torch.zeros_like(outs[0], dtype=weights[0].dtype)
    for o, w in zip(outs, weights):
        out = out + _lse_to_out_layout(w) * o.to(w.dtype)
    return out, merged


@torch.no_grad()
def merge_into_(out_acc: torch.Tensor, lse_acc: torch.Tensor, out_blk: torch.Tensor, lse_blk: torch.Tensor) -> None:
    """Streaming in-place merge: (out_acc, lse_acc) <- merge((out_acc, lse_acc), (out_blk, lse_blk)).

    out_acc (B, N, H, D) fp32 and lse_acc (B, H, N) fp32 are updated in place; the block may be
    any float dtype. Not differentiable (used inside custom autograd forwards).
    """
    blk = lse_blk.to(lse_acc.dtype)
    # weights normalised by their sum (as in merge_weights): exact at any lse magnitude
    top = torch.maximum(lse_acc, blk)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # both empty: weights 0, lse -inf
    e_acc = torch.exp(lse_acc - top)
    e_blk = torch.exp(blk - top)
    total = e_acc + e_blk
    nonempty = total > 0
    safe = torch.where(nonempty, total, torch.ones_like(total))
    out_acc.mul_(_lse_to_out_layout(e_acc / safe)).add_(_lse_to_out_layout(e_blk / safe) * out_blk.to(out_acc.dtype))
    lse_acc.copy_(torch.where(nonempty, top + torch.log(safe), torch.full_like(total, float("-inf"))))
