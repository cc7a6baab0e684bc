"""Dense-masked reference implementations, computed in float64 by default.

These are the ground truth every backend of every package is tested against. They build an
explicit (B, H, Nq, Nk) weight tensor of key multiplicities and run one softmax over it, so they
are only for small shapes. Conventions:

- q: (B, Nq, H, D); k, v: (B, Nk, Hkv, D) with H % Hkv == 0; query head j reads kv head
  j // (H // Hkv).
- Returned ``lse``: (B, H, Nq), the log of the softmax denominator; ``-inf`` for rows that see
  no key, whose output is 0 (never NaN).
- ``is_causal`` is top-left aligned like ``torch.nn.functional.scaled_dot_product_attention``:
  query i sees keys j <= i.
- ``dtype``: the computation dtype. float64 is the reference; passing the inputs' own low
  precision dtype gives "plain PyTorch in that dtype", the baseline the tolerance rule uses.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .config import DilatedConfig

__all__ = [
    "attention_from_weights",
    "block_sparse_attention",
    "block_sparse_weights",
    "dense_attention",
    "dilated_attention",
    "dilated_weights",
]


def _expand_kv(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    return t.repeat_interleave(num_heads // t.shape[2], dim=2) if t.shape[2] != num_heads else t


def attention_from_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    weights: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention where key j of query i counts ``weights[..., i, j]`` times.

    weights: broadcastable to (B, H, Nq, Nk), non-negative (0 = not attended; 2 = the key is in
    the multiset twice). Returns out (B, Nq, H, D) and lse (B, H, Nq) in ``dtype``.
    """
    H = q.shape[2]
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    qh = q.to(dtype).transpose(1, 2)  # (B, H, Nq, D)
    kh = _expand_kv(k, H).to(dtype).transpose(1, 2)
    vh = _expand_kv(v, H).to(dtype).transpose(1, 2)
    w = weights.to(device=q.device, dtype=dtype)
    # log(0) = -inf masks; taken through a where so that weights given with a gradient (a learned
    # multiplicity) get 0, not NaN, at their zeros
    taken = w > 0
    log_w = torch.where(taken, torch.log(torch.where(taken, w, torch.ones_like(w))), float("-inf"))
    # keys no query takes are never read (a NaN there would give NaN + -inf, 0 * NaN)
    used = taken.any(dim=-2).unsqueeze(-1)  # (B or 1, H or 1, Nk, 1)
    kh, vh = torch.where(used, kh, 0.0), torch.where(used, vh, 0.0)
    logits = torch.where(taken, torch.matmul(qh, kh.transpose(-1, -2)) * scale + log_w, float("-inf"))
    if logits.shape[-1] == 0:  # no keys at all: every row is empty
        out = torch.zeros(*logits.shape[:-1], vh.shape[-1], dtype=dtype, device=q.device)
        return out.transpose(1, 2), torch.full(logits.shape[:-1], float("-inf"), dtype=dtype, device=q.device)
    row_max = logits.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.exp(logits - row_max)
    denom = e.sum(dim=-1, keepdim=True)
    nonempty = denom > 0
    safe = torch.where(nonempty, denom, torch.ones_like(denom))  # no 0/0 even in the untaken branch
    out = torch.matmul(e / safe, vh)
    lse = torch.where(nonempty, torch.log(safe) + row_max, torch.full_like(denom, float("-inf")))
    return out.transpose(1, 2), lse.squeeze(-1)


def _padding_weights(key_padding_mask: torch.Tensor | None) -> torch.Tensor | None:
    if key_padding_mask is None:
        return None
    return (~key_padding_mask)[:, None, None, :]  # (B, 1, 1, Nk)


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    is_causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention. attn_mask: bool broadcastable to (B, H, Nq, Nk), True = attend."""
    Nq, Nk = q.shape[1], k.shape[1]
    w = torch.ones(1, 1, Nq, Nk, dtype=torch.bool, device=q.device)
    if is_causal:
        w = w & torch.ones(Nq, Nk, dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None:
        w = w & attn_mask.to(q.device)
    pad = _padding_weights(key_padding_mask)
    if pad is not None:
        w = w & pad
    return attention_from_weights(q, k, v, w, softmax_scale=softmax_scale, dtype=dtype)


def dilated_weights(
    seq_len: int,
    num_heads: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    is_causal: bool = False,
    head_mode: str = "all",
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Key multiplicities (H, N, N) of LongNet dilated attention (Eq. 10 of the paper).

    Group g, head j: positions p with p mod r_g == j mod r_g (segments start at multiples of
    w_g and w_g % r_g == 0, so the in-segment offset test reduces to that) attend to the
    selected keys of their own segment. Summing the groups' 0/1 masks gives the multiset union
    whose single softmax equals the LSE-weighted merge of the per-group outputs.
    """
    cfg = DilatedConfig(segment_lengths, dilation_rates, head_mode)
    pos = torch.arange(seq_len, device=device)
    counts = torch.zeros(num_heads, seq_len, seq_len, dtype=torch.float64, device=device)
    causal = pos[None, :] <= pos[:, None]
    for g in range(cfg.num_groups):
        # clamped to N (same selection): no int64 overflow or work from lengths and rates beyond N
        w, r = cfg.group_extent(g, seq_len)
        same_segment = (pos[:, None] // w) == (pos[None, :] // w)
        if is_causal:
            same_segment = same_segment & causal
        for o, heads in cfg.heads_by_offset(g, num_heads, seq_len):
            sel = (pos % r) == o
            pairs = (sel[:, None] & sel[None, :] & same_segment).to(torch.float64)
            counts[list(heads)] += pairs
    return counts


def dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    is_causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    head_mode: str = "all",
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LongNet dilated attention as one softmax over the multiset union of the groups' keys.

    Returns out (B, N, H, D) and the merged lse L(p) (B, H, N); unselected or fully padded
    (position, head) pairs give out 0 and lse -inf.
    """
    N, H = q.shape[1], q.shape[2]
    w = dilated_weights(
        N, H, segment_lengths, dilation_rates, is_causal=is_causal, head_mode=head_mode, device=q.device
    )[None]
    pad = _padding_weights(key_padding_mask)
    if pad is not None:
        w = w * pad
    return attention_from_weights(q, k, v, w, softmax_scale=softmax_scale, dtype=dtype)


def block_sparse_weights(
    block_mask: torch.Tensor,
    block_size: tuple[int, int],
    seq_len_q: int,
    seq_len_k: int,
    *,
    is_causal: bool = False,
) -> torch.Tensor:
    """Token-level bool mask (Hm, Nq, Nk) from a block mask (Hm, ceil(Nq/Bq), ceil(Nk/Bk)).

    The last block row/column may be partial (N not a multiple of the block size).
    """
    bq, bk = block_size
    m = block_mask.to(torch.bool)
    m = m.repeat_interleave(bq, dim=1).repeat_interleave(bk, dim=2)[:, :seq_len_q, :seq_len_k]
    if is_causal:
        m = m & torch.ones(seq_len_q, seq_len_k, dtype=torch.bool, device=m.device).tril()
    return m


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    block_size: tuple[int, int],
    *,
    is_causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the active (query block, key block) tiles of ``block_mask`` (H or 1, nq, nk).

    A query row with no active key outputs 0 with lse -inf.
    """
    w = block_sparse_weights(block_mask.to(q.device), block_size, q.shape[1], k.shape[1], is_causal=is_causal)[None]
    pad = _padding_weights(key_padding_mask)
    if pad is not None:
        w = w & pad
    return attention_from_weights(q, k, v, w, softmax_scale=softmax_scale, dtype=dtype)
