"""Baselines for tools/bench_dilated.py (never shipped).

``common_dilated_attention``: our re-implementation of the dilated attention algorithm common in
open-source LongNet ports (e.g. the widely used `dilated-attention-pytorch` DilatedAttention),
kept faithful so its speed is representative, including its quirks:

* heads are split across the G groups (the first H % G groups get one extra head);
* group i uses ONE offset ``i % r_i`` for all its heads (not j mod r per head);
* per group: strided slices of q, k, v are copied into a (B * segments) batch, one SDPA call
  (torch picks cuDNN / flash), the result is normalised by its sum over the segment and row
  dims (``x / x.sum(dim=(1, 2))``, a signed sum: not the softmax-denominator merge) and
  scattered back with ``+=``; the output is divided by G;
* N must be a multiple of every segment length; positions a group does not select stay 0.

Plain autograd does the backward (through the copies, the normalisation and the scatter).
It is a speed anchor only; its math differs from the LongNet contract (see docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

LABEL = "common algorithm (heads split over groups, copies + SDPA flash + scatter; our re-implementation)"
# torch 2.11's cuDNN SDPA backward hit an illegal memory access inside this algorithm's autograd graph
# on the H100 (twice, D=64, N=16K); SDPA is limited to flash / efficient here, which is also what the
# common algorithm's usual figures (~340 TF/s forward on copied segment batches, H100) correspond to.
_COMMON_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]


def common_dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    is_causal: bool = False,
) -> torch.Tensor:
    """q, k, v: (B, N, H, D) (no GQA), N a multiple of every segment length. Returns (B, N, H, D)."""
    b, n, h, d = q.shape
    groups = len(dilation_rates)
    sizes = [h // groups + (1 if i < h % groups else 0) for i in range(groups)]
    starts = [sum(sizes[:i]) for i in range(groups)]
    out = torch.zeros_like(q)
    for i, (g, r, s) in enumerate(zip(sizes, dilation_rates, segment_lengths)):
        if n % s != 0:
            raise ValueError(f"the common algorithm needs N % segment == 0, got N={n}, segment {s}")
        offset = i % r
        hmin, hmax = starts[i], starts[i] + g

        # (B, N, H, D) -> (B * segments, g, s / r, D): the strided slice, copied (as einops.rearrange does),
        # one copy per tensor straight into SDPA's (batch, heads, rows, D) layout
        qs, ks, vs = (
            x.reshape(b, n // s, s, h, d)[:, :, offset::r, hmin:hmax, :]
            .permute(0, 1, 3, 2, 4)
            .reshape(b * (n // s), g, s // r, d)
            for x in (q, k, v)
        )
        with sdpa_kernel(_COMMON_BACKENDS):
            x = F.scaled_dot_product_attention(qs, ks, vs, is_causal=is_causal)
        x = x.reshape(b, n // s, g, s // r, d).transpose(2, 3)
        x = x / x.sum(dim=(1, 2), keepdim=True)
        out = out.reshape(b, n // s, s, h, d)
        out[:, :, offset::r, hmin:hmax, :] += x
        out = out.reshape(b, n, h, d)
    return out / groups


def common_attended_pairs(n: int, h: int, segment_lengths: Sequence[int], dilation_rates: Sequence[int]) -> int:
    """(query, key) pairs the common algorithm computes (non-causal), per batch row."""
    groups = len(dilation_rates)
    sizes = [h // groups + (1 if i < h % groups else 0) for i in range(groups)]
    return sum(g * (n // s) * (s // r) ** 2 for g, s, r in zip(sizes, segment_lengths, dilation_rates))
