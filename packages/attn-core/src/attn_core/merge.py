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

__all__ = ["merge_into_", "merge_partials", "merge_weights"]


def _acc(t: torch.Tensor) -> torch.Tensor:
    # float64 stays float64 (reference path); everything else accumulates in fp32
    return t if t.dtype == torch.float64 else t.float()


def _lse_to_out_layout(w: torch.Tensor) -> torch.Tensor:
    # (B, H, N) -> (B, N, H, 1), matching out (B, N, H, D)
    return w.transpose(1, 2).unsqueeze(-1)


def merge_weights(lses: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Softmax-denominator weights exp(lse_g - L) (fp32, 0 where empty) and the merged L."""
    stacked = torch.stack([_acc(lse) for lse in lses])
    merged = torch.logsumexp(stacked, dim=0)
    # logsumexp of all -inf is -inf; subtracting it would give NaN, so clamp the reference point.
    finite = torch.where(torch.isfinite(merged), merged, torch.zeros_like(merged))
    weights = [torch.exp(s - finite) for s in stacked]
    return weights, merged


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
    new = torch.logaddexp(lse_acc, lse_blk.to(lse_acc.dtype))
    ref = torch.where(torch.isfinite(new), new, torch.zeros_like(new))
    w_acc = _lse_to_out_layout(torch.exp(lse_acc - ref))
    w_blk = _lse_to_out_layout(torch.exp(lse_blk.to(lse_acc.dtype) - ref))
    out_acc.mul_(w_acc).add_(w_blk * out_blk.to(out_acc.dtype))
    lse_acc.copy_(new)
