"""Pure PyTorch dilated attention: any device, any float dtype (float64 included), plain autograd.

Per group g = (w, r) (clamped to N, :meth:`attn_core.config.DilatedConfig.group_extent`) and
per offset o that some head of the group has (o = j mod r < N): the sequence is padded up to a
multiple of w and viewed as (B, segments, w / r, r, H, D); rows ``[:, :, :, o]`` are the
positions s + o + t*r that heads with offset o select. Those heads (sharing the offset, so one
gather serves them all) attend within their segment (max-subtracted softmax normalised by its
sum, :func:`attn_core.blocks.softmax_with_lse`); the results are placed back and the groups
merged with :func:`attn_core.merge.merge_partials`. Every step is an ordinary autograd op, so
gradients are exact, including through the merge weights.

Memory per (group, offset) is O(B * segments * heads * (w / r)^2): it scales with the segment
lengths, never with N^2 (nor with lengths or rates configured beyond N). Positions past N
(padding of a short last segment) are masked keys and their query rows are dropped. Padded keys
are zeroed before use, so their values (even NaN or inf) never reach the output or the gradients.

Dropout (``dropout_p > 0``) is applied to each group's attention probabilities before the merge;
the merge uses the undropped lse. Since the merged probability of key k in group g is
exp(lse_g - L) * p_g(k), this drops every (group, key) entry of the merged attention
independently with probability p and rescales survivors by 1 / (1 - p), like dropout on the
probabilities of ordinary attention.
"""

from __future__ import annotations

import torch
from torch.nn.functional import dropout

from ..blocks import acc_dtype, drop_padded_keys, softmax_with_lse
from ..config import DilatedCall
from ..merge import merge_partials
from ..packing import document_segments

NAME = "reference"


def unsupported_reasons(call: DilatedCall) -> list[str]:
    """The reference path takes every validated call (any device, any float dtype)."""
    return []


def _pad_rows(t: torch.Tensor, padded_len: int, value: float | bool = 0) -> torch.Tensor:
    # Pad dim 1 (the sequence) of a (B, N, ...) tensor up to padded_len.
    extra = padded_len - t.shape[1]
    if extra == 0:
        return t
    fill = torch.full((t.shape[0], extra, *t.shape[2:]), value, dtype=t.dtype, device=t.device)
    return torch.cat([t, fill], dim=1)


def _segment_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_masked: torch.Tensor,
    *,
    is_causal: bool,
    scale: float,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention within dilated segments.

    q, k, v: (B, S, h, T, D) in the accumulation dtype (S segments, h heads, T selected rows);
    key_masked: (B, S, T) bool, True = key not attendable. Returns out (B, S, h, T, D) and
    lse (B, S, h, T); rows with no attendable key give out 0, lse -inf.
    """
    s = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, S, h, T, T)
    masked = key_masked[:, :, None, None, :]
    if is_causal:
        T = q.shape[-2]
        # Selected rows are in position order, so causal on positions is causal on row index.
        later = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
        masked = masked | later
    s = s.masked_fill(masked, float("-inf"))  # masked_fill's backward zeroes masked entries
    p, lse = softmax_with_lse(s)
    if dropout_p > 0.0:
        p = dropout(p, p=dropout_p, training=True)
    return torch.matmul(p, v), lse


def dilated_attention(call: DilatedCall) -> torch.Tensor:
    """out (B, N, H, D) in q's dtype; see the module docstring for the algorithm."""
    if call.cu_seqlens is not None:
        return _packed_dilated_attention(call)
    B, N, H, Hkv, D = call.shape
    cfg = call.config
    heads_per_kv = H // Hkv
    ad = acc_dtype(call.q.dtype)
    qa = call.q.to(ad)
    pad = call.key_padding_mask
    # padded keys' values are never read: a NaN or inf there must not reach out or the gradients
    ka, va = (call.k.to(ad), call.v.to(ad)) if pad is None else drop_padded_keys(call.k.to(ad), call.v.to(ad), pad)
    if pad is None:
        pad = torch.zeros(B, N, dtype=torch.bool, device=qa.device)

    outs: list[torch.Tensor] = []
    lses: list[torch.Tensor] = []
    for g in range(cfg.num_groups):
        by_offset = cfg.heads_by_offset(g, H, N)
        if not by_offset:
            continue
        # clamped to N (same selection): cost follows N, never the configured w, r
        w, r = cfg.group_extent(g, N)
        segments = -(-N // w)
        padded = segments * w
        rows = w // r
        # (B, segments, rows, r, H|Hkv, D): [:, s, t, o] is position s*w + t*r + o.
        qg = _pad_rows(qa, padded).reshape(B, segments, rows, r, H, D)
        kg = _pad_rows(ka, padded).reshape(B, segments, rows, r, Hkv, D)
        vg = _pad_rows(va, padded).reshape(B, segments, rows, r, Hkv, D)
        # Keys past N are masked like padding; their query rows are cut off below.
        padg = _pad_rows(pad, padded, True).reshape(B, segments, rows, r)

        out_parts: list[torch.Tensor] = []  # (B, segments, rows, h, D) per offset in use
        lse_parts: list[torch.Tensor] = []
        slots: list[int] = []  # where each part's heads go in the (offset, head) axis of size r * H
        for o, head_ids in by_offset:
            hq = torch.tensor(head_ids, device=qa.device)
            hkv = torch.div(hq, heads_per_kv, rounding_mode="floor")  # GQA: kv head j // (H // Hkv)
            # (B, segments, h, rows, D): the heads sharing offset o, gathered once
            qs = qg[:, :, :, o].index_select(3, hq).transpose(2, 3)
            ks = kg[:, :, :, o].index_select(3, hkv).transpose(2, 3)
            vs = vg[:, :, :, o].index_select(3, hkv).transpose(2, 3)
            o_s, lse_s = _segment_attention(
                qs,
                ks,
                vs,
                padg[:, :, :, o],
                is_causal=call.is_causal,
                scale=call.softmax_scale,
                dropout_p=call.dropout_p,
            )
            out_parts.append(o_s.transpose(2, 3))
            lse_parts.append(lse_s.transpose(2, 3))
            slots.extend(o * H + j for j in head_ids)
        # one out-of-place index_copy per group: (offset, head) pairs no head selects stay 0 / -inf
        idx = torch.tensor(slots, device=qa.device)
        out_g = torch.zeros(B, segments, rows, r * H, D, dtype=ad, device=qa.device)
        out_g = out_g.index_copy(3, idx, torch.cat(out_parts, dim=3))
        lse_g = torch.full((B, segments, rows, r * H), float("-inf"), dtype=ad, device=qa.device)
        lse_g = lse_g.index_copy(3, idx, torch.cat(lse_parts, dim=3))
        outs.append(out_g.reshape(B, padded, H, D)[:, :N])
        lses.append(lse_g.reshape(B, padded, H)[:, :N].transpose(1, 2))  # (B, H, N)

    if not outs:  # N == 0 (for N >= 1 head 0 selects position 0): an empty output, still in the graph
        return call.q * 0
    out, _ = merge_partials(outs, lses)
    return out.to(call.q.dtype)


def _document_blocks(
    cu_seqlens: torch.Tensor, w: int, r: int, o: int
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The (segment, offset o) blocks of every document for segment length w and rate r.

    cu_seqlens: int64 (num_docs + 1,) on the CPU. Block = segment s of document i: rows t at
    packed positions c[i] + s*w + o + t*r that lie inside the segment and the document. Returns,
    per bucket of blocks with rows in (2^(k-1), 2^k], CPU tensors (positions, valid, taken):
    positions int64 and valid bool (blocks, P), P the bucket's most rows, and taken the flat
    indices of the valid entries. Rows past a block's end are not valid (their position is 0, a
    placeholder that is masked as a key and dropped as a query).
    """
    _, seg_start, seg_len = document_segments(cu_seqlens, w)  # empty documents have no segment
    rows = torch.clamp(-(-(seg_len - o) // r), min=0)  # positions o, o + r, ... below seg_len
    block_start = seg_start + o
    buckets = []
    low, high = 0, 1
    most = int(rows.max()) if rows.numel() else 0
    while low < most:
        in_bucket = (rows > low) & (rows <= high)
        if bool(in_bucket.any()):
            bucket_rows = rows[in_bucket]
            t = torch.arange(int(bucket_rows.max()))
            valid = t[None, :] < bucket_rows[:, None]
            positions = torch.where(valid, block_start[in_bucket, None] + t[None, :] * r, 0)
            buckets.append((positions, valid, torch.nonzero(valid.flatten()).squeeze(1)))
        low, high = high, 2 * high
    return buckets


def _packed_dilated_attention(call: DilatedCall) -> torch.Tensor:
    """out (1, N, H, D): each document's dilated attention, segments starting at its start."""
    _, N, H, Hkv, D = call.shape
    cfg = call.config
    heads_per_kv = H // Hkv
    ad = acc_dtype(call.q.dtype)
    device = call.q.device
    q, k, v = call.q[0].to(ad), call.k.to(ad), call.v.to(ad)
    pad = call.key_padding_mask
    if pad is not None:  # padded keys' values are never read (NaN or inf there stays out)
        k, v = drop_padded_keys(k, v, pad)
    k, v = k[0], v[0]
    pad_row = pad[0] if pad is not None else torch.zeros(N, dtype=torch.bool, device=device)
    cu = call.cu_seqlens.to("cpu", torch.int64)  # the one host read: block geometry is built on the CPU

    outs: list[torch.Tensor] = []
    lses: list[torch.Tensor] = []
    for g in range(cfg.num_groups):
        # clamped to N: the same selection in every document (none is longer than N)
        w, r = cfg.group_extent(g, N)
        out_parts: list[torch.Tensor] = []  # (selected rows * heads, D) per (offset, bucket)
        lse_parts: list[torch.Tensor] = []
        pos_parts: list[torch.Tensor] = []  # the rows' packed positions, one per row and head
        head_parts: list[torch.Tensor] = []
        for o, head_ids in cfg.heads_by_offset(g, H, N):
            hq = torch.tensor(head_ids, device=device)
            hkv = torch.div(hq, heads_per_kv, rounding_mode="floor")  # GQA: kv head j // (H // Hkv)
            for positions_cpu, valid_cpu, taken_cpu in _document_blocks(cu, w, r, o):
                # index tensors only, so that no step on the device reads back to the host
                positions, valid, taken = positions_cpu.to(device), valid_cpu.to(device), taken_cpu.to(device)
                selected = positions_cpu.flatten()[taken_cpu].to(device)  # (rows,) packed positions
                # (1, blocks, h, P, D): the heads sharing offset o, gathered once per bucket
                qs = q.index_select(1, hq)[positions].transpose(1, 2)[None]
                ks = k.index_select(1, hkv)[positions].transpose(1, 2)[None]
                vs = v.index_select(1, hkv)[positions].transpose(1, 2)[None]
                o_s, lse_s = _segment_attention(
                    qs,
                    ks,
                    vs,
                    (pad_row[positions] | ~valid)[None],
                    is_causal=call.is_causal,
                    scale=call.softmax_scale,
                    dropout_p=call.dropout_p,
                )
                h = len(head_ids)
                o_rows = o_s[0].transpose(1, 2).reshape(-1, h, D).index_select(0, taken)  # (rows, h, D)
                lse_rows = lse_s[0].transpose(1, 2).reshape(-1, h).index_select(0, taken)
                out_parts.append(o_rows.reshape(-1, D))  # (rows * h, D), row-major: row, then head
                lse_parts.append(lse_rows.reshape(-1))
                pos_parts.append(selected.repeat_interleave(h))
                head_parts.append(hq.repeat(selected.numel()))
        if not out_parts:
            continue
        # one out-of-place index_put per group: (position, head) pairs no block selects stay 0 / -inf
        index = (torch.cat(pos_parts), torch.cat(head_parts))
        out_g = torch.zeros(N, H, D, dtype=ad, device=device).index_put(index, torch.cat(out_parts))
        lse_g = torch.full((N, H), float("-inf"), dtype=ad, device=device).index_put(index, torch.cat(lse_parts))
        outs.append(out_g[None])
        lses.append(lse_g.t()[None])  # (1, H, N)

    if not outs:  # N == 0, or only empty documents: an empty output, still in the graph
        return call.q * 0
    out, _ = merge_partials(outs, lses)
    return out.to(call.q.dtype)
