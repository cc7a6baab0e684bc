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

is_causal is SDPA's causal mask on each dilated segment (selected key t' <= selected query t),
which is LongNet's causal rule within a group. GQA (k, v with Hkv < H heads; query head j reads
kv head j // (H // Hkv)): the copy of a group's k / v slice gathers the kv head of each of the
group's query heads, so SDPA sees as many kv heads as query heads and any backend takes it (the
group's head range need not align with the kv heads); with Hkv == H the copy is a plain slice.

Plain autograd does the backward (through the copies, the normalisation and the scatter).
It is a speed anchor only; its math differs from the LongNet contract (see docs/architecture.md).
``self_check`` (``python tools/dilated_baselines.py``, also run by ``bench_dilated.py --quick``)
checks it in float64 on the CPU against attn_core.reference.dilated_attention.
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


def common_group_heads(num_heads: int, num_groups: int) -> list[range]:
    """The query heads of each group: contiguous ranges, the first num_heads % num_groups one head larger."""
    base, extra = divmod(num_heads, num_groups)
    sizes = [base + (1 if i < extra else 0) for i in range(num_groups)]
    return [range(sum(sizes[:i]), sum(sizes[: i + 1])) for i in range(num_groups)]


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_lengths: Sequence[int]) -> None:
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(
            f"q must be (B, N, H, D) and k, v (B, N, Hkv, D) of one shape, got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    b, n, h, d = q.shape
    if k.shape[0] != b or k.shape[1] != n or k.shape[3] != d or h % k.shape[2] != 0:
        raise ValueError(f"k, v {tuple(k.shape)} must match q {tuple(q.shape)} in B, N and D, with H % Hkv == 0")
    for s in segment_lengths:
        if n % s != 0:
            raise ValueError(f"the common algorithm needs N % segment == 0, got N={n}, segment {s}")


def common_group_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment: int,
    rate: int,
    offset: int,
    heads: range,
    *,
    is_causal: bool = False,
) -> torch.Tensor:
    """One group's attention, before the common algorithm's normalisation.

    q: (B, N, H, D); k, v: (B, N, Hkv, D). Positions ``offset, offset + rate, ...`` of each segment of
    ``segment`` positions, query heads ``heads``. Returns (B, N // segment, segment // rate, len(heads), D).
    """
    b, n, h, d = q.shape
    g, rows, nseg = len(heads), segment // rate, n // segment

    def segments(x: torch.Tensor) -> torch.Tensor:  # (B, N, heads, D) -> strided view (B, N / s, heads, s / r, D)
        return x.reshape(b, nseg, segment, x.shape[2], d)[:, :, offset::rate].permute(0, 1, 3, 2, 4)

    # one copy per tensor straight into SDPA's (batch, heads, rows, D) layout, as einops.rearrange does
    qs = segments(q)[:, :, heads.start : heads.stop].reshape(b * nseg, g, rows, d)
    rep = h // k.shape[2]
    if rep == 1:
        ks, vs = (segments(x)[:, :, heads.start : heads.stop].reshape(b * nseg, g, rows, d) for x in (k, v))
    else:
        kv_heads = torch.arange(heads.start, heads.stop, device=q.device) // rep
        ks, vs = (segments(x).index_select(2, kv_heads).reshape(b * nseg, g, rows, d) for x in (k, v))
    with sdpa_kernel(_COMMON_BACKENDS):
        x = F.scaled_dot_product_attention(qs, ks, vs, is_causal=is_causal)
    return x.reshape(b, nseg, g, rows, d).transpose(2, 3)


def common_dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    is_causal: bool = False,
) -> torch.Tensor:
    """q: (B, N, H, D); k, v: (B, N, Hkv, D) with H % Hkv == 0; N a multiple of every segment length.

    Returns (B, N, H, D).
    """
    _check_shapes(q, k, v, segment_lengths)
    b, n, h, d = q.shape
    groups = len(dilation_rates)
    out = torch.zeros_like(q)
    for i, (s, r, heads) in enumerate(zip(segment_lengths, dilation_rates, common_group_heads(h, groups))):
        offset = i % r
        x = common_group_attention(q, k, v, s, r, offset, heads, is_causal=is_causal)
        x = x / x.sum(dim=(1, 2), keepdim=True)
        out = out.reshape(b, n // s, s, h, d)
        out[:, :, offset::r, heads.start : heads.stop, :] += x
        out = out.reshape(b, n, h, d)
    return out / groups


def common_attended_pairs(
    n: int, h: int, segment_lengths: Sequence[int], dilation_rates: Sequence[int], *, is_causal: bool = False
) -> int:
    """(query, key) pairs the common algorithm computes, per batch row (causal: t' <= t within a segment)."""
    total = 0
    for heads, s, r in zip(common_group_heads(h, len(dilation_rates)), segment_lengths, dilation_rates):
        rows = s // r
        total += len(heads) * (n // s) * (rows * (rows + 1) // 2 if is_causal else rows * rows)
    return total


def _reference_group(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment: int, rate: int, offset: int, heads: range, causal: bool
) -> torch.Tensor:
    """LongNet's one-group attention at one offset for ``heads``, from attn_core.reference.dilated_attention.

    The reference gives query head j the offset j % rate; to give every head of ``heads`` the offset
    ``offset``, head t of the group is placed at head index offset + t * rate of a wider MHA call (k, v
    expanded to the query heads first, so the placement keeps each query head's kv head).
    Returns (B, N // segment, segment // rate, len(heads), D) like :func:`common_group_attention`.
    """
    from attn_core import reference

    b, n, h, d = q.shape
    rep = h // k.shape[2]
    src = torch.tensor(list(heads))
    slots = offset + rate * torch.arange(len(heads))
    wide = []
    for x, kv in ((q, False), (k, True), (v, True)):
        full = x.repeat_interleave(rep, dim=2) if kv else x
        w = torch.zeros(b, n, rate * len(heads), d, dtype=x.dtype)
        w[:, :, slots] = full[:, :, src]
        wide.append(w)
    out, _ = reference.dilated_attention(*wide, [segment], [rate], is_causal=causal, head_mode="all")
    return out[:, :, slots].reshape(b, n // segment, segment, len(heads), d)[:, :, offset::rate]


def self_check(seed: int = 0) -> dict[str, float]:
    """Float64 CPU check of the common algorithm, causal and not, for MHA, GQA 4:1 with groups aligned to
    the kv heads and GQA 3:1 with groups straddling them (H not a multiple of G).

    Each group's attention is compared with attn_core.reference.dilated_attention (:func:`_reference_group`),
    and the whole output with those reference groups merged the common algorithm's way. Returns the
    largest error of each kind relative to the largest expected value; raises RuntimeError past 1e-9.
    """
    cases = [  # (H, Hkv, segments, rates, N)
        (4, 4, [8, 16], [1, 2], 32),
        (8, 2, [8, 16], [1, 2], 32),
        (6, 2, [4, 8, 16, 32], [1, 2, 4, 8], 64),
    ]
    gen = torch.Generator().manual_seed(seed)
    worst = {"group": 0.0, "output": 0.0}
    for h, hkv, segs, rates, n in cases:
        for causal in (False, True):
            q = torch.randn(2, n, h, 8, generator=gen, dtype=torch.float64)
            k, v = (torch.randn(2, n, hkv, 8, generator=gen, dtype=torch.float64) for _ in range(2))
            expected = torch.zeros_like(q)
            for i, (s, r, heads) in enumerate(zip(segs, rates, common_group_heads(h, len(rates)))):
                mine = common_group_attention(q, k, v, s, r, i % r, heads, is_causal=causal)
                ref = _reference_group(q, k, v, s, r, i % r, heads, causal)
                worst["group"] = max(worst["group"], float((mine - ref).abs().max() / ref.abs().max().clamp_min(1)))
                merged = expected.view(2, n // s, s, h, 8)
                merged[:, :, i % r :: r, heads.start : heads.stop] += ref / ref.sum(dim=(1, 2), keepdim=True)
            expected /= len(rates)
            out = common_dilated_attention(q, k, v, segs, rates, is_causal=causal)
            err = float((out - expected).abs().max() / expected.abs().max().clamp_min(1))
            worst["output"] = max(worst["output"], err)
    if max(worst.values()) > 1e-9:
        raise RuntimeError(f"the common algorithm differs from attn_core.reference: relative errors {worst}")
    return worst


if __name__ == "__main__":
    print("common algorithm vs attn_core.reference (float64, CPU), relative errors:", self_check())
