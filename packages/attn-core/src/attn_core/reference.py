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
- ``cu_seqlens``: int32 (num_docs + 1,) offsets of documents packed along N (B == 1, flash-attn's
  varlen convention): a query sees only keys of its own document; causal masks, windows, dilated
  segments and offsets count from the document's start (:func:`document_mask`).
- ``dtype``: the computation dtype. float64 is the reference; passing the inputs' own low
  precision dtype gives "plain PyTorch in that dtype", the baseline the tolerance rule uses.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .config import DilatedConfig
from .packing import document_positions
from .validation import check_cu_seqlens, check_window_size

__all__ = [
    "attention_from_weights",
    "block_sparse_attention",
    "block_sparse_weights",
    "dense_attention",
    "dilated_attention",
    "dilated_weights",
    "document_mask",
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


def document_mask(
    seq_len_q: int,
    seq_len_k: int,
    *,
    cu_seqlens: torch.Tensor | None = None,
    is_causal: bool = False,
    window_size: tuple[int, int] | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Which keys each query may see: bool (Nq, Nk), True = attend. O(Nq * Nk): references only.

    is_causal: key j <= query i (top-left aligned). window_size (left, right): i - left <= j <= i + right,
    -1 = unbounded on that side (flash-attn's convention). cu_seqlens (needs Nq == Nk): i and j in
    the same document. Within one document the differences i - j are the same counted from the
    document's start or from 0, so causal masks and windows count within the document.
    """
    i = torch.arange(seq_len_q, device=device)[:, None]
    j = torch.arange(seq_len_k, device=device)[None, :]
    mask = torch.ones(seq_len_q, seq_len_k, dtype=torch.bool, device=device)
    if is_causal:
        mask &= j <= i
    if window_size is not None:
        left, right = check_window_size(window_size)
        if left >= 0:
            mask &= j >= i - left
        if right >= 0:
            mask &= j <= i + right
    if cu_seqlens is not None:
        if seq_len_q != seq_len_k:
            raise ValueError(
                f"cu_seqlens needs one packed sequence for queries and keys, got Nq={seq_len_q}, Nk={seq_len_k}"
            )
        check_cu_seqlens(cu_seqlens, batch=1, seq_len=seq_len_q, device=mask.device)
        doc_ids, _ = document_positions(cu_seqlens.to(mask.device), seq_len_q)
        mask &= doc_ids[:, None] == doc_ids[None, :]
    return mask


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    is_causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    window_size: tuple[int, int] | None = None,
    softmax_scale: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention. attn_mask: bool broadcastable to (B, H, Nq, Nk), True = attend.

    is_causal, window_size, cu_seqlens (B == 1): the masks of :func:`document_mask`, all applied.
    """
    if cu_seqlens is not None and q.shape[0] != 1:
        raise ValueError(
            f"cu_seqlens needs batch size B == 1 (documents packed along the sequence), got B={q.shape[0]}"
        )
    Nq, Nk = q.shape[1], k.shape[1]
    w = document_mask(Nq, Nk, cu_seqlens=cu_seqlens, is_causal=is_causal, window_size=window_size, device=q.device)[
        None, None
    ]
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
    cu_seqlens: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Key multiplicities (H, N, N) of LongNet dilated attention (Eq. 10 of the paper).

    Group g, head j: positions p with p mod r_g == j mod r_g (segments start at multiples of
    w_g and w_g % r_g == 0, so the in-segment offset test reduces to that) attend to the
    selected keys of their own segment. Summing the groups' 0/1 masks gives the multiset union
    whose single softmax equals the LSE-weighted merge of the per-group outputs.

    cu_seqlens: p is the position within its document and keys come from the same document
    (:func:`document_mask`): the weights of each document run alone, placed on the diagonal.
    """
    cfg = DilatedConfig(segment_lengths, dilation_rates, head_mode)
    allowed = document_mask(seq_len, seq_len, cu_seqlens=cu_seqlens, is_causal=is_causal, device=device)
    if cu_seqlens is None:
        pos = torch.arange(seq_len, device=allowed.device)
    else:
        _, pos = document_positions(cu_seqlens.to(allowed.device), seq_len)
    counts = torch.zeros(num_heads, seq_len, seq_len, dtype=torch.float64, device=allowed.device)
    for g in range(cfg.num_groups):
        # clamped to N (same selection, documents being no longer than N): no int64 overflow or
        # work from lengths and rates beyond N
        w, r = cfg.group_extent(g, seq_len)
        same_segment = ((pos[:, None] // w) == (pos[None, :] // w)) & allowed
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
    cu_seqlens: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LongNet dilated attention as one softmax over the multiset union of the groups' keys.

    Returns out (B, N, H, D) and the merged lse L(p) (B, H, N); unselected or fully padded
    (position, head) pairs give out 0 and lse -inf. With cu_seqlens (B == 1) the result is the
    concatenation of this function run on each document alone.
    """
    if cu_seqlens is not None and q.shape[0] != 1:
        raise ValueError(
            f"cu_seqlens needs batch size B == 1 (documents packed along the sequence), got B={q.shape[0]}"
        )
    N, H = q.shape[1], q.shape[2]
    w = dilated_weights(
        N,
        H,
        segment_lengths,
        dilation_rates,
        is_causal=is_causal,
        head_mode=head_mode,
        cu_seqlens=cu_seqlens,
        device=q.device,
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
    window_size: tuple[int, int] | None = None,
    cu_seqlens: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the active (query block, key block) tiles of ``block_mask`` (H or 1, nq, nk).

    Inside the tiles, the token masks of :func:`document_mask` (is_causal, window_size,
    cu_seqlens with B == 1) and key_padding_mask (B, Nk) also apply. A query row with no
    active key outputs 0 with lse -inf.
    """
    if cu_seqlens is not None and q.shape[0] != 1:
        raise ValueError(
            f"cu_seqlens needs batch size B == 1 (documents packed along the sequence), got B={q.shape[0]}"
        )
    Nq, Nk = q.shape[1], k.shape[1]
    w = block_sparse_weights(block_mask.to(q.device), block_size, Nq, Nk)[None]
    w = w & document_mask(Nq, Nk, cu_seqlens=cu_seqlens, is_causal=is_causal, window_size=window_size, device=q.device)
    pad = _padding_weights(key_padding_mask)
    if pad is not None:
        w = w & pad
    return attention_from_weights(q, k, v, w, softmax_scale=softmax_scale, dtype=dtype)
